"""Seeded selection within groups of rows, the machinery of `balance`: which rows of a group (a
source, or a source's text-only or multimodal pool) are its k kept ones, found exactly and
without holding the dataset.

A group's rows are ordered by a seeded uniform key of the id (`stages.select.uniform_key`: a
hash, the same in every run and process), ties by id; a group keeps its k first rows. The (key, id)
of the row at rank k, its cut-off, is found by distributed selection: the keys are uniform on
[0, 1), so rank k of n lies near k / n with a known spread (a Beta distribution), and a bracket of
`MARGIN` standard deviations around it needs no sample pass; one counting pass returns, per group,
the rows before its bracket and the (key, id) pairs inside it (about 2 * MARGIN * sqrt(n) pairs),
the cut-off row is read off those exactly, and a bracket that misses is widened and the pass
repeated. A map pass (`mark_groups`) then rejects every row at or after its group's cut-off.
Every pass reads only the columns it needs (`project`), so no image bytes are read to count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import reject
from warren.stages.select import uniform_key

NULL_NAME = "<null>"
TEXT, MULTIMODAL = "text-only", "multimodal"
# Standard deviations of a rank's key on each side of its bracket; a miss widens it 16 times.
MARGIN = 6.0

Cutoff = tuple[float, str]
# A cut-off that no row is before: the group keeps none of its rows.
KEEP_NONE: Cutoff = (-math.inf, "")
# A group is a source (None for null sources) or, with a text share, a (source, kind) pair.
Group = Any


def is_text_only(batch: pa.Table) -> np.ndarray:
    """Rows with no image (a null or empty `images` list, or no `images` column)."""
    if "images" not in batch.column_names:
        return np.ones(batch.num_rows, bool)
    lengths = pc.fill_null(pc.list_value_length(batch.column("images")), 0)
    return lengths.to_numpy(zero_copy_only=False) == 0


@dataclasses.dataclass(frozen=True)
class Grouping:
    """How rows fall into groups: by source, or by (source, kind) with `by_kind`."""

    source_column: str
    by_kind: bool = False

    def columns(self, by_kind: bool | None = None) -> list[str]:
        """The columns `groups` reads (with `by_kind` overriding the grouping's own)."""
        out = ["id", self.source_column]
        if self.by_kind if by_kind is None else by_kind:
            out.append("images")
        return out

    def groups(self, batch: pa.Table) -> tuple[np.ndarray, list[Group]]:
        """(group index per row; the groups the indices name)."""
        col = batch.column(self.source_column).combine_chunks().cast(pa.string())
        encoded = pc.dictionary_encode(col)
        sources: list[str | None] = encoded.dictionary.to_pylist()
        idx = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        idx[idx < 0] = len(sources)
        sources.append(None)
        names: list[Group] = list(sources)
        if self.by_kind:
            text = is_text_only(batch)
            idx = idx * 2 + text.astype(np.int64)
            names = [(s, kind) for s in sources for kind in (MULTIMODAL, TEXT)]
        return idx, names


def project(ds: Any, columns: list[str]) -> Any:
    """Only `columns` of `ds` (those it has): a counting pass then reads no image bytes, since
    Ray pushes the projection down into the Parquet read."""
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    wanted = [c for c in dict.fromkeys(columns) if c in names] or names[:1]
    return ds.select_columns(wanted) if names and wanted != names else ds


def _sizes_pass(batch: pa.Table, grouping: Grouping) -> pa.Table:
    """Rows per (source, kind)."""
    idx, names = dataclasses.replace(grouping, by_kind=True).groups(batch)
    counts = np.bincount(idx[idx >= 0], minlength=len(names))
    present = np.flatnonzero(counts)
    return pa.table(
        {
            "source": pa.array([names[i][0] for i in present], pa.string()),
            "kind": pa.array([names[i][1] for i in present], pa.string()),
            "n": pa.array(counts[present].astype(np.int64), pa.int64()),
        }
    )


def group_sizes(ds: Any, grouping: Grouping) -> dict[tuple[str | None, str], int]:
    """Rows per (source, kind) in one pass over `ds`."""
    sizes: dict[tuple[str | None, str], int] = {}
    counts = project(ds, grouping.columns(by_kind=True)).map_batches(
        _sizes_pass, fn_args=(grouping,), batch_format="pyarrow"
    )
    for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = (b.column(c).to_pylist() for c in ("source", "kind", "n"))
        for s, kind, n in zip(*cols, strict=True):
            sizes[(s, kind)] = sizes.get((s, kind), 0) + n
    return sizes


def before_cutoff(keys: np.ndarray, ids: np.ndarray, cut: Cutoff) -> np.ndarray:
    """Rows strictly before the cut-off row in (key, id) order."""
    ck, cid = cut
    return (keys < ck) | ((keys == ck) & (ids < cid))


def keys_and_ids(batch: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = batch.column("id").to_pylist()
    return uniform_key(ids, seed), np.array(ids, dtype=object)


def _count_pass(
    batch: pa.Table,
    grouping: Grouping,
    seed: int,
    brackets: Mapping[Group, list[tuple[int, float, float]]],
    numbers: Mapping[Group, int],
) -> pa.Table:
    """Per (group, rank) bracket [lo, hi]: rows of the group before it (counted) and inside it
    (listed with key and id). Groups travel as their number in `numbers`."""
    idx, names = grouping.groups(batch)
    keys, ids = keys_and_ids(batch, seed)
    out: dict[str, list] = {"group": [], "rank": [], "key": [], "id": [], "before": []}
    for j, g in enumerate(names):
        if g not in brackets:
            continue
        rows = idx == j
        if not rows.any():
            continue
        gk, gi = keys[rows], ids[rows]
        for rank, lo, hi in brackets[g]:
            inside = (gk >= lo) & (gk <= hi)
            n_in = int(inside.sum())
            out["group"] += [numbers[g]] * (n_in + 1)
            out["rank"] += [rank] * (n_in + 1)
            out["key"] += [math.nan, *gk[inside].tolist()]
            out["id"] += [None, *gi[inside].tolist()]
            out["before"] += [int((gk < lo).sum())] + [-1] * n_in
    return pa.table(
        {
            "group": pa.array(out["group"], pa.int64()),
            "rank": pa.array(out["rank"], pa.int64()),
            "key": pa.array(out["key"], pa.float64()),
            "id": pa.array(out["id"], pa.string()),
            "before": pa.array(out["before"], pa.int64()),
        }
    )


def _bracket(rank: int, n: int, margin: float) -> tuple[float, float]:
    """Keys around where the row of `rank` (0 = smallest) of n uniform keys lies."""
    if margin > 1e4:
        return -math.inf, math.inf
    p = (rank + 1) / (n + 1)  # mean of the (rank + 1)-th smallest of n uniforms
    spread = margin * (math.sqrt(p * (1 - p) / (n + 2)) + 1.0 / n)
    lo, hi = p - spread, p + spread
    return (-math.inf if lo <= 0 else lo), (math.inf if hi >= 1 else hi)


def find_group_cutoffs(
    ds: Any,
    grouping: Grouping,
    seed: int,
    ranks: Mapping[Group, list[int]],
    sizes: Mapping[Group, int],
) -> dict[Group, dict[int, Cutoff]]:
    """Per group, the (key, id) of its row at each rank in `ranks[group]` (0 = smallest key;
    each rank in [0, size)). A row is among a group's k smallest when it is strictly before the
    cut-off of rank k. Counting passes only: memory is bounded by a block and the brackets."""
    found: dict[Group, dict[int, Cutoff]] = {g: {} for g in ranks}
    todo = {g: sorted(set(rs)) for g, rs in ranks.items() if rs}
    for g, rs in todo.items():
        if not all(0 <= r < sizes[g] for r in rs):
            raise ValueError(f"ranks {rs} outside group {g!r} of {sizes[g]} rows")
    numbers = {g: i for i, g in enumerate(todo)}
    by_number = dict(enumerate(todo))
    margin = MARGIN
    while todo:
        brackets = {g: [(r, *_bracket(r, sizes[g], margin)) for r in rs] for g, rs in todo.items()}
        before: dict[tuple[Group, int], int] = {}
        inside: dict[tuple[Group, int], list[Cutoff]] = {}
        counts = project(ds, grouping.columns()).map_batches(
            _count_pass, fn_args=(grouping, seed, brackets, numbers), batch_format="pyarrow"
        )
        for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for num, r, k, rid, bef in zip(
                *(b.column(c).to_pylist() for c in ("group", "rank", "key", "id", "before")),
                strict=True,
            ):
                g = by_number[num]
                if bef >= 0:
                    before[(g, r)] = before.get((g, r), 0) + bef
                else:
                    inside.setdefault((g, r), []).append((k, rid))
        missed: dict[Group, list[int]] = {}
        for g, rs in todo.items():
            for r in rs:
                within = r - before.get((g, r), 0)
                listed = inside.get((g, r), [])
                if 0 <= within < len(listed):
                    found[g][r] = sorted(listed)[within]
                else:
                    missed.setdefault(g, []).append(r)
        todo = missed
        margin = max(margin * 16, 1.0)
    return found


def survivors_pass(
    batch: pa.Table, grouping: Grouping, seed: int, cuts: Mapping[str | None, Cutoff]
) -> pa.Table:
    """Rows per (source, kind) before their source's cut-off (every row of an uncut source)."""
    idx, names = grouping.groups(batch)
    keys, ids = keys_and_ids(batch, seed)
    counts = np.zeros(len(names), np.int64)
    for j, (source, _) in enumerate(names):
        rows = idx == j
        if not rows.any():
            continue
        cut = cuts.get(source)
        counts[j] = rows.sum() if cut is None else before_cutoff(keys[rows], ids[rows], cut).sum()
    present = np.flatnonzero(counts)
    return pa.table(
        {
            "source": pa.array([names[i][0] for i in present], pa.string()),
            "kind": pa.array([names[i][1] for i in present], pa.string()),
            "n": pa.array(counts[present], pa.int64()),
        }
    )


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What one group keeps: rules in the order they apply, as (cut-off, reason); a row at or
    after a rule's cut-off gets its reason (the first such rule)."""

    rules: tuple[tuple[Cutoff, str], ...]


def mark_groups(
    batch: pa.Table, grouping: Grouping, seed: int, plans: Mapping[Group, GroupPlan]
) -> pa.Table:
    """Reject each row at or after one of its group's cut-offs (the first such rule's reason)."""
    n = batch.num_rows
    out = reject(batch, np.zeros(n, bool), "")  # every output carries the _reject column
    idx, names = grouping.groups(batch)
    keys, ids = keys_and_ids(batch, seed)
    depth = max((len(p.rules) for p in plans.values()), default=0)
    for level in range(depth):
        mask = np.zeros(n, bool)
        reasons_at: list[str | None] = [None] * n
        for j, g in enumerate(names):
            plan = plans.get(g)
            if plan is None or level >= len(plan.rules):
                continue
            rows = np.flatnonzero(idx == j)
            if not len(rows):
                continue
            cut, reason = plan.rules[level]
            hit = rows[~before_cutoff(keys[rows], ids[rows], cut)]
            mask[hit] = True
            for i in hit.tolist():
                reasons_at[i] = reason
        if mask.any():
            out = reject(out, mask, reasons_at)
    return out
