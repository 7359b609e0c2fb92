"""The numbers behind a stage's charts, reading only the Parquet columns they need: score values
of kept and rejected rows, rejection reasons, cluster sizes and duplicate-group sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warren.pipelines.report.stage_view import StageView
from warren.stages.run_layout import ShardFile
from warren.stages.schema import REASON_COLUMN

DUPLICATE_OF = "duplicate_of"


@dataclasses.dataclass
class StageStats:
    kept: dict[str, np.ndarray]  # score column -> values (NaN for null)
    rejected: dict[str, np.ndarray]
    reasons: np.ndarray  # one reason per rejected row, in the rejected files' order (object array)
    cluster_sizes: dict[str, np.ndarray]  # cluster column -> sizes of its clusters
    duplicate_groups: np.ndarray | None  # sizes of duplicate groups (kept row + its copies)


def read_columns(stage: StageView, path: str, columns: Sequence[str]) -> pa.Table:
    """The given columns of one shard (those it has); nothing else is read."""
    with stage.loc.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])


def _numeric_columns(
    stage: StageView, files: Sequence[ShardFile], columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each column over the files as float64; NaN for nulls and for shards without the column."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for shard in files:
        table = read_columns(stage, shard.path, columns) if columns else None
        for c in columns:
            if table is not None and c in table.column_names:
                values = pc.fill_null(table.column(c).cast(pa.float64()), np.nan)
                parts[c].append(values.to_numpy())
            else:
                parts[c].append(np.full(shard.rows, np.nan))
    return {c: np.concatenate(p) if p else np.array([]) for c, p in parts.items()}


def _reasons(stage: StageView) -> np.ndarray:
    out: list[str] = []
    for shard in stage.rejected:
        out.extend(
            read_columns(stage, shard.path, [REASON_COLUMN]).column(REASON_COLUMN).to_pylist()
        )
    return np.asarray(out, dtype=object)


def duplicate_group_sizes(stage: StageView) -> np.ndarray | None:
    """Sizes of the duplicate groups the stage resolved (the kept row plus the rejected rows whose
    `duplicate_of` names it), from the rejected rows' `duplicate_of` column; None when no rejected
    row has one (not a dedup stage, or an output written before the column existed)."""
    kept_ids: list[str] = []
    for shard in stage.rejected:
        table = read_columns(stage, shard.path, [DUPLICATE_OF])
        if DUPLICATE_OF in table.column_names:
            kept_ids.extend(v for v in table.column(DUPLICATE_OF).to_pylist() if v is not None)
    if not kept_ids:
        return None
    _, copies = np.unique(np.asarray(kept_ids, dtype=object), return_counts=True)
    return copies + 1


def stage_stats(stage: StageView) -> StageStats:
    scores = stage.score_columns()
    clusters = stage.cluster_columns()
    kept = _numeric_columns(stage, stage.kept, scores + clusters)
    rejected = _numeric_columns(stage, stage.rejected, scores + clusters)
    cluster_sizes = {}
    for c in clusters:
        ids = np.concatenate([kept.pop(c), rejected.pop(c)])
        ids = ids[np.isfinite(ids)]
        cluster_sizes[c] = np.unique(ids, return_counts=True)[1] if len(ids) else np.array([])
    return StageStats(kept, rejected, _reasons(stage), cluster_sizes, duplicate_group_sizes(stage))
