"""sscd: Meta's SSCD copy-detection descriptors of each row's first image, in `sscd_emb`.

SSCD (Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) maps an
image and its copies (crops, re-encodes, resizes, flips, colour changes, overlays) to nearby
unit vectors, where CLIP maps images of the same subject together; Llama 3 deduplicates its
image-text pairs on them. The model is one of Meta's published TorchScript files, `sscd_disc_mixup`
by default (a ResNet-50, 512-d descriptors), downloaded once into warren's weights cache; offline it
must be there already, or `--sscd.model sscd:/path/to/model.torchscript.pt`
(`stages.models.SscdModel`). Images go in as the SSCD README's batch preprocessing does them
(`skew_320`: 320x320 bilinear, ImageNet normalisation), decoded by `stages.images.decode_image` as
every stage sees them.

This is `embed` with another model and column: the same decoding pool one sub-batch ahead of the
model, the same embedding store (descriptors are computed once per image and model, whatever the
recipe or output folder), the same rejections (`sscd: no image`, `sscd: undecodable image (...)`).
Adds `sscd_emb` (fixed_size_list<float16>[512], unit norm) and `sscd_model` (the spec).

Copies are then grouped by `semdedup` on `sscd_emb` with `rule=components`, `k` nearest
neighbours and `keep=first`, inside k-means clusters of `sscd_emb` (`cluster`): see
pipelines/llama3_pretrain.py.
"""

from __future__ import annotations

import dataclasses

from warren.stages.base import param
from warren.stages.embed import Embed, EmbedParams

DEFAULT_MODEL = "sscd:sscd_disc_mixup"


@dataclasses.dataclass(frozen=True)
class SscdParams(EmbedParams):
    model: str = param(
        DEFAULT_MODEL,
        "sscd:<name> (sscd_disc_mixup, sscd_disc_large, ...; downloaded once) or "
        "sscd:<TorchScript file or URL>",
    )
    texts: bool = param(False, "SSCD embeds images only: must stay off")


class Sscd(Embed):
    """SSCD copy-detection descriptors of each row's first image (`sscd_emb`)."""

    name = "sscd"
    version = "1"
    Params = SscdParams
    image_output = "sscd_emb"
    model_output = "sscd_model"

    def check_params(self) -> None:
        super().check_params()
        if self.params.texts:
            raise ValueError(f"{self.name}: SSCD has no text tower: texts must be off")
        if not self.params.model.startswith("sscd:"):
            raise ValueError(f"{self.name}: model must be an sscd: spec, got {self.params.model!r}")


__all__ = ["DEFAULT_MODEL", "Sscd", "SscdParams"]
