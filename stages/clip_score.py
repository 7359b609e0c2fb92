"""clip_score: cosine similarity of each row's image and text embeddings, and the filters on it.

The score is written to `clip_score` on every row that has both embeddings (float32). Three
filters, each optional and combinable:

- an absolute threshold: keep `clip_score >= threshold` (DataComp, ViT-B/32: 0.28);
- a top fraction: `lo=0, hi=0.3` keeps the 30% highest scores (DataComp's CLIP filtering);
- a percentile window: `lo=0.4, hi=0.6` keeps ranks 40%-60% (Bunny).

Ranks are exact and global over the rows that have a score (ties broken by id; rank 0 is the
highest score), computed with the distributed sort of `stages.ranks`; the threshold does
not change the ranks. Rows without an embedding are rejected (`clip_score: missing embedding`).
Rows outside the window say which side and where they ranked:
`clip_score: below window 40-60% (rank 87.3%, clip_score 0.1012)`. With a window, every scored row
gets its exact rank in `clip_score_rank` (int64, 0 = the highest score; `stages.ranks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from warren.stages.base import GlobalContext, GlobalStage, Threshold, param, put_column, reject
from warren.stages.cluster import CHUNK_ROWS, embeddings_of
from warren.stages.schema import column_type, rank_column
from warren.stages.select import (
    mark_outside,
    mark_ranked,
    rank_rows,
    window_ranks,
    window_thresholds,
)


@dataclasses.dataclass(frozen=True)
class ClipScoreParams:
    image_column: str = param("image_emb", "image embedding column (L2-normalised)")
    text_column: str = param("text_emb", "text embedding column (L2-normalised)")
    threshold: float = param(
        -1.0,
        "keep clip_score >= this (DataComp ViT-B/32: 0.28); -1 keeps all",
        threshold="min",
        column="clip_score",
        off=-1.0,
    )
    # a window (0, 1) is no window: ClipScore.thresholds leaves it out
    lo: float = param(
        0.0,
        "keep ranks from this fraction (rank 0 = highest score)",
        threshold="rank_lo",
        column="clip_score",
    )
    hi: float = param(
        1.0,
        "keep ranks below this fraction (DataComp top 30%: lo 0, hi 0.3)",
        threshold="rank_hi",
        column="clip_score",
    )


def add_clip_score(
    batch: pa.Table, image_column: str, text_column: str, drop: bool = False
) -> pa.Table:
    """`clip_score`: the cosine of each row's image and text embeddings (null without both). With
    `drop` the two embedding columns are left out (`GlobalContext.decisions_only`)."""
    # In the columns' own type (float16 as embed stores them), converted chunk by chunk below.
    img, img_ok = embeddings_of(batch, image_column, dtype=None)
    txt, txt_ok = embeddings_of(batch, text_column, dtype=None)
    n = batch.num_rows
    both = img_ok & txt_ok
    score = np.full(n, np.nan, dtype=np.float32)
    if both.any():
        # embeddings_of returns the present rows only; align both to the rows having both.
        if not both[img_ok].all():
            img = img[both[img_ok]]
        if not both[txt_ok].all():
            txt = txt[both[txt_ok]]
        scored = np.empty(len(img), dtype=np.float32)
        for lo in range(0, len(img), CHUNK_ROWS):
            i = img[lo : lo + CHUNK_ROWS].astype(np.float32)
            t = txt[lo : lo + CHUNK_ROWS].astype(np.float32)
            # Stored as float16; renormalise so rounding does not move scores off the cosine.
            i /= np.maximum(np.linalg.norm(i, axis=1, keepdims=True), 1e-12)
            t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
            scored[lo : lo + CHUNK_ROWS] = np.einsum("ij,ij->i", i, t)
        score[both] = scored
    col = pa.array(score, pa.float32(), mask=~both)
    if drop:
        batch = batch.drop_columns(list(dict.fromkeys([image_column, text_column])))
    return put_column(batch, "clip_score", col)


def _scored(batch: pa.Table, image_column: str, text_column: str, drop: bool) -> pa.Table:
    """`add_clip_score`, unless `ClipScore.prepare` already scored the rows and left the
    embeddings behind."""
    if "clip_score" in batch.column_names and not {image_column, text_column} & set(
        batch.column_names
    ):
        return batch
    return add_clip_score(batch, image_column, text_column, drop)


def apply_threshold(batch: pa.Table, threshold: float, name: str) -> pa.Table:
    if threshold <= -1.0:
        return batch
    score = batch.column("clip_score").to_numpy(zero_copy_only=False)
    low = ~np.isnan(score) & (score < threshold)
    return reject(
        batch, low, [f"{name}: below threshold (clip_score {s:.4f} < {threshold})" for s in score]
    )


class ClipScore(GlobalStage):
    """Image-text cosine similarity, with an absolute threshold and an exact global rank window."""

    name = "clip_score"
    version = "1"
    Params = ClipScoreParams
    # The score is computed in the runner's narrow read task, so only it (not two embeddings a
    # row, 3 KB at 768-d float16) goes on to the ranks; a resumed run recomputes it (cheap).
    prepares = True
    keeps_prepared = False

    @property
    def windowed(self) -> bool:
        return (self.params.lo, self.params.hi) != (0.0, 1.0)

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.image_column, self.params.text_column)

    def added_columns(self) -> dict[str, Any]:
        # a window ranks every scored row and writes the ranks
        names = ["clip_score"] + [rank_column("clip_score")] * self.windowed
        return {name: column_type(name) for name in names}

    def thresholds(self) -> list[Threshold]:
        return window_thresholds(super().thresholds(), self.params.lo, self.params.hi)

    def check_params(self) -> None:
        p = self.params
        if not 0.0 <= p.lo < p.hi <= 1.0:
            raise ValueError(f"{self.name}: need 0 <= lo < hi <= 1, got lo={p.lo} hi={p.hi}")
        if not -1.0 <= p.threshold <= 1.0:
            raise ValueError(
                f"{self.name}: threshold must be a cosine in [-1, 1], got {p.threshold}"
            )

    def prepare(self, table: pa.Table) -> pa.Table:
        # Only the runner and `run_rows` prepare: the embeddings are left behind.
        return add_clip_score(table, self.params.image_column, self.params.text_column, drop=True)

    def run_rows(self, ds, ctx: GlobalContext):
        # `run` scores whole rows itself and, outside the runner, keeps their embeddings.
        return self.run(ds, ctx)

    def run(self, ds, ctx: GlobalContext):
        p = self.params
        scored = ds.map_batches(
            _scored,
            fn_args=(p.image_column, p.text_column, ctx.decisions_only),
            batch_format="pyarrow",
        )
        scored = scored.map_batches(
            apply_threshold, fn_args=(p.threshold, self.name), batch_format="pyarrow"
        )
        spec = ("column", "clip_score", True, 0)
        window = f"{100 * p.lo:g}-{100 * p.hi:g}%"
        reasons = (
            f"{self.name}: missing embedding",
            f"{self.name}: above window {window}",
            f"{self.name}: below window {window}",
        )
        if not self.windowed:
            return scored.map_batches(
                mark_outside, fn_args=(spec, None, None, reasons), batch_format="pyarrow"
            )
        scored, n = rank_rows(scored, spec)
        return scored.map_batches(
            mark_ranked,
            fn_args=(spec, *window_ranks(n, p.lo, p.hi), n, reasons),
            batch_format="pyarrow",
        )
