"""semdedup: near-duplicate removal inside embedding clusters (SemDeDup and Bunny's coreset rule).

A global stage downstream of a clustering stage: every row carries `cluster_id` and
`cos_to_centroid`, and near duplicates are searched only inside a cluster. Rows are grouped by
`cluster_id` by `stages.shuffle.map_groups` (plain Ray tasks over zero-copy Arrow slices), so each
cluster meets in one task and is decided by plain numpy functions (`semdedup_cluster`,
`components_cluster`) that are usable, and tested, without Ray.

Two rules (`rule`):

- `semdedup` (SemDeDup, Abbas et al. 2023): the items of a cluster are put in order by their
  distance to the centroid (`keep="hard"`: farthest first, i.e. ascending `cos_to_centroid`;
  `"easy"`: nearest first; `"random"`: a seeded shuffle), ties broken by id. An item is removed when
  its largest cosine similarity to any EARLIER item in that order, removed or not (as in the
  reference implementation), exceeds `1 - eps`. The reason names the earlier item it is most similar
  to (`semdedup: duplicate (of <id>, cos 0.931)`); items whose similarities tie within 1e-5 count as
  equally similar and the earliest is named, so identical copies always name the first copy whatever
  the BLAS summation order. The largest similarity is kept in `max_cos_earlier` (float32; null for
  the first item of a cluster), so `eps` can be studied later without recomputing.
- `components` (Bunny's coreset): two items are linked when their cosine similarity exceeds
  `threshold`; in every connected component one item is kept by `keep`: `"middle"` (the item at the
  median `cos_to_centroid` of its component; for an even count the lower middle in ascending order,
  ties by id), `"far"` (smallest `cos_to_centroid`), `"near"` (largest), `"random"` (seeded) or
  `"first"` (the smallest id; what the copy-detection recipe keeps). With `k` > 0 an item is linked
  only to those of its k nearest neighbours (faiss, exact inner product) above the threshold, as
  Llama 3 deduplicates SSCD descriptors: nearest-neighbour search inside k-means clusters, then
  connected components; k = 0 links every pair above it. The
  others are rejected as `semdedup: duplicate (of <kept id>, cos <to it>, component of <n>)`; every row gets its
  component's size in `component_size` (int64).

Similarity is computed blockwise: a cluster of n items is cut into blocks of `block_size` rows and
only the tiles of the lower triangle are computed, one `block_size x block_size` tile at a time; no
n x n matrix is ever built. For `semdedup` the tiles are float32 (numpy matmul, i.e. BLAS) and a
running maximum (and the item it came from) is carried across the tiles of a row block. For
`components` a tile only screens for candidate pairs, those within the tile's rounding error of
the threshold or above, in bfloat16 where the CPU does that faster than float32 (AVX512-BF16,
AMX: 3x on a 20k-row cluster here) and in float32 elsewhere, or in float32 on a GPU when the
cluster has one (each task then holds a share of one, `GlobalContext.gpu_share`, and tiles of
4096 rows); each candidate pair is then linked
on its own float64 cosine, so the links do not depend on the screen, the tiling or the CPU. The
links of each tile are merged at once into a vectorised union-find, so the edge list held at any
time is bounded by one tile. Memory per task: the cluster's embeddings in
float32 (4 * n * d bytes), one tile (4 * block_size^2 bytes, plus the tile's boolean masks and
pairs), and O(n) bookkeeping.

A removed item gets the id of the item named in its reason in `duplicate_of` and their cosine in
`similarity` (float32; both null on kept rows and on rows rejected for another reason). The
per-cluster numpy functions live in `stages.cluster_dedup`.

Rows whose embedding is null are rejected as `semdedup: missing embedding`, rows without
`cluster_id` or `cos_to_centroid` as `semdedup: missing cluster`; neither takes part in any
comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import (
    GlobalContext,
    GlobalStage,
    Threshold,
    param,
    params_to_dict,
    put_column,
    reject,
    stable_hash,
)
from warren.stages.cluster_dedup import (
    KEEP_CHOICES,
    ComponentDecision,
    SemDedupDecision,
    components_cluster,
    linked_components,
    max_cos_to_earlier,
    processing_order,
    random_keys,
    semdedup_cluster,
    similarity_tile,
    union_pairs,
    unit_rows,
)
from warren.stages.duplicates import PROVENANCE_COLUMNS, put_duplicates
from warren.stages.schema import column_type
from warren.stages.shuffle import map_groups

RULES = ("semdedup", "components")
DEFAULT_KEEP = {"semdedup": "hard", "components": "middle"}
STAT_COLUMN = {"semdedup": "max_cos_earlier", "components": "component_size"}
STAT_TYPE = {"semdedup": pa.float32(), "components": pa.int64()}
CLUSTER_COLUMN = "cluster_id"
CENTROID_COLUMN = "cos_to_centroid"


@dataclasses.dataclass(frozen=True)
class SemDedupParams:
    rule: str = param(
        "semdedup",
        "'semdedup' (SemDeDup: remove items too similar to an earlier item in centroid order) or "
        "'components' (Bunny: keep one item per connected component of near duplicates)",
    )
    column: str = param("image_emb", "embedding column (fixed_size_list, L2-normalised)")
    # a threshold at 1 - eps on max_cos_earlier (SemDedup.thresholds draws it there)
    eps: float = param(
        0.07,
        "rule semdedup: an item is removed when its max cosine to an earlier item > 1 - eps",
        threshold="max",
        column="max_cos_earlier",
    )
    threshold: float = param(
        0.86, "rule components: two items are linked when their cosine similarity > threshold"
    )
    keep: str = param(
        "auto",
        "which item survives; rule semdedup: 'hard' (far from the centroid first), 'easy' (near "
        "first) or 'random'; rule components: 'middle' (median cos_to_centroid), 'far', 'near', "
        "'random' or 'first' (smallest id); 'auto': 'hard' for semdedup, 'middle' for components",
    )
    seed: int = param(0, "seed for keep='random' (combined with the cluster id)")
    k: int = param(
        0,
        "rule components: link an item only to those of its k nearest neighbours (faiss, exact) "
        "above the threshold, as Llama 3's copy-detection dedup; 0 links every pair above it",
    )
    block_size: int = param(
        512,
        "rows per similarity block; memory per task holds one block_size^2 float32 tile. Small "
        "blocks skip more of the upper triangle (512: about 1.7x faster than 4096 on 3k-row "
        "clusters, benchmarks/dedup.py)",
    )


# ---------------------------------------------------------------------------------------------
# Arrow: one cluster's rows in, the same rows out with decisions


def _embedding_matrix(column: pa.Array, name: str) -> np.ndarray:
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(
            f"semdedup: column '{name}' has type {column.type}, expected fixed_size_list<float16>"
        )
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), dim)


def dedup_cluster_table(group: pa.Table, params: SemDedupParams, drop: bool = False) -> pa.Table:
    """Decide one cluster's rows (all sharing a `cluster_id`): every row comes back, duplicates
    marked rejected, with the rule's statistic column added. With `drop` the embedding column is
    left out (`GlobalContext.decisions_only`): the runner takes only the decisions, and a
    checkpointed partition then holds no embeddings."""
    for name in ("id", params.column, CLUSTER_COLUMN, CENTROID_COLUMN):
        if name not in group.column_names:
            raise ValueError(
                f"semdedup: input has no column '{name}'"
                + (" (run the clustering stage first)" if name != "id" else "")
            )
    rule = params.rule
    keep = resolved_keep(params)
    n = group.num_rows
    stat = np.zeros(n, dtype=np.float32 if rule == "semdedup" else np.int64)
    has_stat = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    # the removed duplicates: position in `group`, the kept row's id, their cosine
    dup_rows: list[int] = []
    dup_of: list[str] = []
    dup_cos: list[float] = []

    emb_col = group.column(params.column).combine_chunks() if n else None
    has_emb = pc.is_valid(emb_col).to_numpy(zero_copy_only=False) if n else np.zeros(0, dtype=bool)
    cluster = group.column(CLUSTER_COLUMN)
    centroid = group.column(CENTROID_COLUMN)
    has_cluster = np.zeros(n, dtype=bool)
    if n:
        has_cluster = (
            pc.and_(pc.is_valid(cluster), pc.is_valid(centroid))
            .combine_chunks()
            .to_numpy(zero_copy_only=False)
        )
    for i in np.flatnonzero(~has_emb):
        reasons[i] = "semdedup: missing embedding"
    for i in np.flatnonzero(has_emb & ~has_cluster):
        reasons[i] = "semdedup: missing cluster (no cluster_id or cos_to_centroid)"

    live = np.flatnonzero(has_emb & has_cluster)
    if live.size:
        take = pa.array(live)
        emb = _embedding_matrix(emb_col.take(take), params.column)
        cos = centroid.take(take).to_numpy().astype(np.float64)
        ids = group.column("id").take(take).to_pylist()
        cluster_id = int(cluster.take(take)[0].as_py())
        if rule == "semdedup":
            d = semdedup_cluster(
                emb,
                cos,
                ids,
                eps=params.eps,
                keep=keep,
                seed=params.seed,
                cluster_id=cluster_id,
                block_size=params.block_size,
            )
            for k in np.flatnonzero(d.removed):
                reasons[live[k]] = (
                    f"semdedup: duplicate (of {ids[d.duplicate_of[k]]}, "
                    f"cos {d.max_cos_earlier[k]:.3f})"
                )
                dup_rows.append(int(live[k]))
                dup_of.append(ids[d.duplicate_of[k]])
                dup_cos.append(float(d.max_cos_earlier[k]))
            stat[live] = d.max_cos_earlier
            has_stat[live] = d.duplicate_of >= 0
        else:
            c = components_cluster(
                emb,
                cos,
                ids,
                threshold=params.threshold,
                keep=keep,
                seed=params.seed,
                cluster_id=cluster_id,
                block_size=params.block_size,
                k=params.k,
            )
            removed = np.flatnonzero(c.removed)
            # The kept item may be linked only through others, so its cosine can be below the
            # threshold; the reason gives it all the same: it is what a user checks first.
            x = unit_rows(emb[np.r_[removed, c.kept[removed]]])
            cos_kept = np.einsum("ij,ij->i", x[: len(removed)], x[len(removed) :])
            for k, cos_k in zip(removed, cos_kept, strict=True):
                reasons[live[k]] = (
                    f"semdedup: duplicate (of {ids[c.kept[k]]}, cos {cos_k:.3f}, "
                    f"component of {c.component_size[k]})"
                )
                dup_rows.append(int(live[k]))
                dup_of.append(ids[c.kept[k]])
                dup_cos.append(float(cos_k))
            stat[live] = c.component_size
            has_stat[live] = True

    out = put_column(group, STAT_COLUMN[rule], pa.array(stat, type=STAT_TYPE[rule], mask=~has_stat))
    out = put_duplicates(out, dup_rows, dup_of, dup_cos)
    rejected = np.array([r is not None for r in reasons], dtype=bool)
    out = reject(out, rejected, [r or "" for r in reasons])
    return out.drop_columns([params.column]) if drop else out


def resolved_keep(params: SemDedupParams) -> str:
    return DEFAULT_KEEP[params.rule] if params.keep == "auto" else params.keep


class SemDedup(GlobalStage):
    """Near duplicates inside embedding clusters: SemDeDup's eps rule or Bunny's components rule."""

    name = "semdedup"
    version = "2"
    Params = SemDedupParams

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column, CLUSTER_COLUMN, CENTROID_COLUMN)

    def added_columns(self) -> dict[str, Any]:
        names = (STAT_COLUMN[self.params.rule], *PROVENANCE_COLUMNS)
        return {name: column_type(name) for name in names}

    def thresholds(self) -> list[Threshold]:
        """Rule semdedup keeps a row whose `max_cos_earlier` is at most 1 - eps: a line there.
        The components rule links pairs, a relation no one column of a row shows: no line."""
        if self.params.rule != "semdedup":
            return []
        return [Threshold("eps", "max", STAT_COLUMN["semdedup"], 1.0 - self.params.eps)]

    def check_params(self) -> None:
        p = self.params
        if p.rule not in RULES:
            raise ValueError(f"semdedup: rule must be one of {RULES}, got {p.rule!r}")
        choices = KEEP_CHOICES[p.rule]
        if p.keep != "auto" and p.keep not in choices:
            raise ValueError(
                f"semdedup: keep must be 'auto' or one of {choices} for rule {p.rule!r}, "
                f"got {p.keep!r}"
            )
        if not 0.0 < p.eps < 1.0:
            raise ValueError(f"semdedup: eps must be in (0, 1), got {p.eps!r}")
        if not -1.0 < p.threshold < 1.0:
            raise ValueError(f"semdedup: threshold must be in (-1, 1), got {p.threshold!r}")
        if isinstance(p.block_size, bool) or not isinstance(p.block_size, int) or p.block_size < 1:
            raise ValueError(f"semdedup: block_size must be a positive int, got {p.block_size!r}")
        if isinstance(p.seed, bool) or not isinstance(p.seed, int):
            raise ValueError(f"semdedup: seed must be an int, got {p.seed!r}")
        if not p.column:
            raise ValueError("semdedup: column must name the embedding column")
        if isinstance(p.k, bool) or not isinstance(p.k, int) or p.k < 0:
            raise ValueError(f"semdedup: k must be an int >= 0, got {p.k!r}")
        if p.k and p.rule != "components":
            raise ValueError("semdedup: k is for rule components (nearest neighbours linked)")

    @property
    def params_hash(self) -> str:
        # k came later: at its default (every pair linked) the hash is the one runs had before,
        # so their cached outputs stay valid.
        if self.params.k:
            return super().params_hash
        params = params_to_dict(self.params)
        del params["k"]
        return stable_hash({"params": params, "version": self.version})

    def run(self, ds, ctx: GlobalContext):
        return map_groups(
            ds,
            CLUSTER_COLUMN,
            dedup_cluster_table,
            (self.params, ctx.decisions_only),
            num_partitions=ctx.partitions(),
            num_rows=ctx.num_rows,
            num_cpus=ctx.num_cpus,
            checkpoint=ctx.checkpoint,
            # The components rule's pair screen runs on a GPU where the task has one.
            num_gpus=ctx.gpu_share() if self.params.rule == "components" else 0.0,
        )


__all__ = [
    "ComponentDecision",
    "SemDedup",
    "SemDedupDecision",
    "SemDedupParams",
    "components_cluster",
    "dedup_cluster_table",
    "linked_components",
    "max_cos_to_earlier",
    "processing_order",
    "random_keys",
    "semdedup_cluster",
    "similarity_tile",
    "union_pairs",
]
