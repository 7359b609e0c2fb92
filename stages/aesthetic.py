"""aesthetic: LAION-Aesthetics v2's aesthetic score, from the image embeddings already on the row.

Model. The LAION-Aesthetics v2 predictor (christophschuhmann/improved-aesthetic-predictor,
`sac+logos+ava1-l14-linearMSE.pth`, which made the LAION-Aesthetics v2 subsets): five linear layers
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between them in training, no activations) over the
L2-normalised CLIP ViT-L/14 image embedding, fitted to human 1-10 ratings (SAC, LAION-Logos, AVA).
It reads `image_emb` as `embed` wrote it (unit norm), so there is no second pass over the images:
run `embed` with CLIP ViT-L/14 (`--embed.model open_clip:ViT-L-14:openai`) first. Embeddings of
another width are refused at the first batch, naming the flag; the embedding store serves
ViT-L/14 vectors that any recipe computed before.

`--aesthetic.model` is the weights file: the default URL is downloaded once into warren's weights
cache (`stages.model_fetch.weights_file`; offline, a clear error), or a local `.pth` (a state dict
with the predictor's keys, `layers.0.weight` ... `layers.7.bias`), or `hf:ORG/REPO/FILE`. `demo` is
a predictor of the same layers with seeded random weights, as wide as the embeddings: it lets the
demo recipe run offline with the demo CLIP, and its scores mean nothing.

Score and threshold. `aesthetic_score` (float32, about 1-10); a row without an embedding gets null
and is rejected (`aesthetic: missing embedding`). `min_score` rejects rows below it
(`aesthetic: below min_score (aesthetic_score 4.12 < 5)`); LAION-Aesthetics v2's subsets are
scores >= 4.5, 5, 6 and 6.5. Exact rank windows on the score are `rank_window` with
`column=aesthetic_score`, as for any score.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from warren.stages.base import BatchStage, Resources, param, put_column, reject
from warren.stages.cluster import embeddings_of

RULE = "aesthetic"
SCORE_COLUMN = "aesthetic_score"
#: The LAION-Aesthetics v2 predictor's weights (about 3.7 MB).
DEFAULT_MODEL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)
DEMO = "demo"
#: The predictor's layers after the input: widths of its linear layers, in order.
HIDDEN = (1024, 128, 64, 16, 1)


def predictor(width: int) -> Any:
    """The predictor's layers (torch), input `width`: the module the published weights load into,
    keys `layers.0` ... `layers.7` (dropout at 1, 3 and 5)."""
    import torch

    layers: list[torch.nn.Module] = []
    dims = (width, *HIDDEN)
    for k, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        layers.append(torch.nn.Linear(a, b))
        if k < 3:
            layers.append(torch.nn.Dropout((0.2, 0.2, 0.1)[k]))
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(*layers)
    return model


def load_predictor(spec: str, width: int, flag: str) -> Any:
    """The predictor for `spec` (see the module's doc), in eval mode, on the CPU."""
    import torch

    from warren.stages.model_fetch import weights_file

    if spec == DEMO:
        torch.manual_seed(0)
        return predictor(width).eval()
    path = weights_file(spec, flag)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for files that are not state dicts
        raise ValueError(f"{RULE}: {path} is not a torch state dict ({exc}); give {flag}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    first = state.get("layers.0.weight") if isinstance(state, dict) else None
    if first is None:
        raise ValueError(
            f"{RULE}: {path} holds no LAION aesthetic predictor (no layers.0.weight); give {flag}"
        )
    model = predictor(int(first.shape[1]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{RULE}: {path} does not fit the predictor's layers ({exc})") from exc
    return model.eval()


@dataclasses.dataclass(frozen=True)
class AestheticParams:
    model: str = param(
        DEFAULT_MODEL,
        "the LAION-Aesthetics v2 predictor's weights: URL, local .pth, hf:ORG/REPO/FILE, or "
        "'demo' (seeded random weights, for the offline demo)",
    )
    image_column: str = param("image_emb", "CLIP ViT-L/14 image embeddings (L2-normalised)")
    min_score: float = param(
        0.0,
        "reject rows whose aesthetic_score is below this (LAION-Aesthetics v2: 4.5, 5, 6, 6.5); "
        "0 only scores",
        threshold="min",
        column=SCORE_COLUMN,
        off=0.0,
    )


class Aesthetic(BatchStage):
    """LAION-Aesthetics v2 score from the stored CLIP ViT-L/14 image embeddings."""

    name = RULE
    version = "1"
    Params = AestheticParams
    uses_model = True
    # Five small matrix products per batch: no GPU is worth asking for.
    resources = Resources(num_cpus=1.0, num_gpus=0.0, batch_size=4096)
    adds = (SCORE_COLUMN,)

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._model: Any = None

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.image_column,)

    def check_params(self) -> None:
        if not self.params.model.strip():
            raise ValueError(f"{self.name}: model must name the predictor's weights")
        if self.params.min_score < 0:
            raise ValueError(f"{self.name}: min_score must be >= 0 (0 is off)")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # each worker loads its own in setup()
        return state

    def setup(self) -> None:
        if self.params.model != DEMO:  # the demo predictor takes its width from the data
            self._model = load_predictor(self.params.model, 0, f"--{self.name}.model")

    def scores(self, emb: np.ndarray) -> np.ndarray:
        """Aesthetic scores of unit-norm embeddings (rows of `emb`)."""
        import torch

        width = emb.shape[1]
        if self._model is None:
            self._model = load_predictor(self.params.model, width, f"--{self.name}.model")
        expected = self._model.layers[0].in_features
        if width != expected:
            raise ValueError(
                f"{self.name}: the predictor takes {expected}-d image embeddings (CLIP ViT-L/14), "
                f"{self.params.image_column} is {width}-d: embed with --embed.model "
                "open_clip:ViT-L-14:openai first, or give --aesthetic.model for this width"
            )
        with torch.inference_mode():
            out = self._model.layers(torch.from_numpy(np.ascontiguousarray(emb, np.float32)))
        return out[:, 0].numpy()

    def process(self, batch: pa.Table) -> pa.Table:
        emb, ok = embeddings_of(batch, self.params.image_column)
        score = np.full(batch.num_rows, np.nan, np.float32)
        if ok.any():
            score[ok] = self.scores(emb)
        out = put_column(batch, SCORE_COLUMN, pa.array(score, pa.float32(), mask=~ok))
        if not ok.all():
            out = reject(out, ~ok, f"{self.name}: missing embedding")
        # 0 is "off" (the threshold's `off` value), whatever a predictor scores.
        low = ok & (score < self.params.min_score) if self.params.min_score > 0 else ok & False
        if not low.any():
            return out
        reasons: list[str | None] = [None] * batch.num_rows
        for i in np.flatnonzero(low):
            reasons[i] = (
                f"{self.name}: below min_score ({SCORE_COLUMN} {score[i]:.3g} < "
                f"{self.params.min_score:g})"
            )
        return reject(out, low, reasons)


__all__ = ["DEFAULT_MODEL", "Aesthetic", "AestheticParams", "load_predictor", "predictor"]
