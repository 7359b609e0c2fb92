"""watermark: LAION's watermark probability per image, stored on the row, and a threshold.

Model. LAION's watermark detector (LAION-AI/LAION-5B-WatermarkDetection, `watermark_model_v1.pt`,
which gave LAION-5B its `pwatermark` column): timm's EfficientNet-B3 (`efficientnet_b3a`) with its
classifier replaced by Linear(1536, 625), ReLU, Dropout(0.3), Linear(625, 256), ReLU,
Linear(256, 2); softmax over the two outputs, class 0 being "watermark" (as LAION's inference script
reads it). Preprocessing is LAION's: resize to 256x256 (bilinear, aspect ratio not kept), scale to
[0, 1], normalise with ImageNet's mean and standard deviation. Images are decoded by
`stages.images.decode_image` as every stage sees them (transparency on white, EXIF orientation, the
first frame), at a reduced scale that keeps the shorter side >= 512; the per-image scoring, the row
maximum and the unreadable-image rule are `stages.image_scores`', as for `nsfw`.

`--watermark.model` is the weights file: the default URL is downloaded once into warren's weights
cache (`stages.model_fetch.weights_file`; offline, a clear error naming the flag), or a local file,
or `hf:ORG/REPO/FILE`, or `demo` (timm's tiny `test_efficientnet` under the same head with seeded
random weights: the offline demo runs, its scores mean nothing); `--watermark.arch` another timm backbone under the same head (the tests use
timm's tiny `test_efficientnet`). The model runs on the GPU when there is one.

Score and threshold. `watermark_prob` (float32, in [0, 1]): the maximum over a row's images; a row
without images gets null and is kept. A row is rejected when `watermark_prob > max_score`
(`watermark: watermarked (watermark_prob 0.9312 > 0.8)`); 0.8 is Data-Juicer's
`image_watermark_filter` default, and LAION-5B subsets are commonly cut at pwatermark < 0.8 or 0.5.
`max_score 1.0` only scores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from warren.stages.base import Resources, param
from warren.stages.image_scores import ImageScoreStage, session_threads
from warren.stages.images import DEFAULT_MAX_PIXELS

SCORE_COLUMN = "watermark_prob"
DEFAULT_MODEL = (
    "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"
)
DEFAULT_ARCH = "efficientnet_b3a"
#: `--watermark.model demo`: timm's tiny test EfficientNet under LAION's head, seeded random
#: weights, for the offline demo (its scores mean nothing).
DEMO = "demo"
DEMO_ARCH = "test_efficientnet"
SIDE = 256
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def detector(arch: str = DEFAULT_ARCH) -> Any:
    """LAION's detector, untrained: timm's `arch` with LAION's classifier head."""
    import timm
    import torch

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(model.num_features, 625),
        torch.nn.ReLU(),
        torch.nn.Dropout(p=0.3),
        torch.nn.Linear(625, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 2),
    )
    return model


@dataclasses.dataclass(frozen=True)
class WatermarkParams:
    model: str = param(
        DEFAULT_MODEL, "LAION's watermark detector weights: URL, local file or hf:ORG/REPO/FILE"
    )
    arch: str = param(DEFAULT_ARCH, "the timm backbone the weights were trained on")
    max_score: float = param(
        0.8,
        "reject rows whose watermark_prob is above this (equal passes); 0.8 as Data-Juicer; "
        "1.0 only scores",
        threshold="max",
        column=SCORE_COLUMN,
        off=1.0,
    )
    model_batch_size: int = param(32, "images per model call")
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "images claiming more pixels than this are unreadable (never decoded), as image_check",
    )


class Watermark(ImageScoreStage):
    """LAION's watermark probability per image (max over a row's images), `max_score` filter."""

    name = "watermark"
    version = "1"
    Params = WatermarkParams
    uses_model = True
    # EfficientNet-B3 at 256 px: a quarter of a GPU per actor keeps it busy; decoding dominates
    # on CPUs.
    resources = Resources(num_cpus=1.0, num_gpus=0.25, batch_size=256)
    adds = (SCORE_COLUMN,)
    score_column = SCORE_COLUMN
    verdict = "watermarked"
    decode_side = 2 * SIDE

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._model: Any = None

    def default_resources(self) -> Resources:
        from warren.stages.models import default_device

        resources = type(self).resources
        return resources if default_device() == "cuda" else resources.replace(num_gpus=0.0)

    def check_params(self) -> None:
        p = self.params
        if not 0.0 <= p.max_score <= 1.0:
            raise ValueError(f"{self.name}: max_score must be in [0, 1], got {p.max_score}")
        if p.model_batch_size < 1 or p.max_pixels < 1:
            raise ValueError(f"{self.name}: model_batch_size and max_pixels must be >= 1")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # each worker loads its own in setup()
        return state

    def loaded(self) -> bool:
        return self._model is not None

    def setup(self) -> None:
        import torch

        from warren.stages.model_fetch import weights_file
        from warren.stages.models import default_device

        flag = f"--{self.name}.model"
        self.device = default_device()
        self._threads = session_threads(0) or os.cpu_count() or 1
        if self.params.model == DEMO:
            torch.manual_seed(0)
            self._model = detector(DEMO_ARCH).eval().to(self.device)
            return
        path = weights_file(self.params.model, flag)
        model = detector(self.params.arch)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        except Exception as exc:  # torch raises several types for files of another kind
            raise ValueError(
                f"{self.name}: {path} is not a {self.params.arch} watermark detector "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); give {flag}"
            ) from exc
        self._model = model.eval().to(self.device)

    def preprocess(self, img: Any) -> np.ndarray:
        """LAION's preprocessing: 256x256 bilinear (torchvision's Resize on a PIL image), [0, 1],
        ImageNet normalisation, channels first."""
        from PIL import Image

        pixels = np.asarray(img.resize((SIDE, SIDE), Image.BILINEAR), np.float32) / 255.0
        return ((pixels - MEAN) / STD).transpose(2, 0, 1)

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self._model(torch.from_numpy(pixels).to(self.device))
            return torch.softmax(logits.float(), dim=1)[:, 0].cpu().numpy()


__all__ = ["DEFAULT_MODEL", "Watermark", "WatermarkParams", "detector"]
