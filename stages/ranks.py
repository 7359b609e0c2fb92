"""Exact global ranks, written as a column: what a window stage (`rank_window`, `clip_score` with a
window) records on every row it ranks, `<column>_rank` (stages.schema.rank_column; int64, 0 = the
first row in the stage's order, null for a row without a value).

The order is the one `stages.select` decides with: by key ascending (the value, negated when the
stage ranks highest first), ties broken by id, then by the row's place in the input. The wide rows
never move; only (row number, key, id) does, in plain Ray tasks (Ray Data's general sort costs
tens of seconds on a small machine for what these tasks do in well under one):

1. one task per input block lists its ranked rows as (row, key, id), the row number being the
   block's index << ROW_BITS | the row within the block, and cuts them into P ranges of keys
   (P - 1 boundaries are read off a seeded sample of the keys; equal keys fall in one range);
2. one task per range sorts its rows by (key, id, row) and numbers them; the ranges' sizes give
   each range's first rank;
3. one task per range adds that first rank and cuts its rows by input block;
4. one task per input block writes the rank column from its pieces.

Memory per task: a block, a range of narrow rows (about 24 bytes and an id per row); the driver
holds the sample (at most SAMPLE_KEYS keys) and one number per range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import put_column
from warren.stages.schema import RANK_TYPE

ROW_BITS = 32
#: Keys the range boundaries are chosen from; ranges of about equal size need far fewer.
SAMPLE_KEYS = 10_000
#: Narrow rows per range: enough ranges that each sorts quickly, few enough to schedule cheaply.
ROWS_PER_RANGE = 1_000_000
_NARROW = pa.schema([("row", pa.int64()), ("key", pa.float64()), ("id", pa.string())])
_RANKED = pa.schema([("row", pa.int64()), ("rank", pa.int64())])


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


def _narrow(block_index: int, block: pa.Table, keys_of: Any, spec: tuple) -> pa.Table:
    keys, valid, ids = keys_of(block, spec)
    offsets = np.flatnonzero(valid).astype(np.int64)
    rows = (np.int64(block_index) << np.int64(ROW_BITS)) | offsets
    return pa.table(
        [pa.array(rows, pa.int64()), pa.array(keys, pa.float64()), pa.array(ids, pa.string())],
        schema=_NARROW,
    )


def _sample(narrow: pa.Table, rate: float) -> np.ndarray:
    keys = narrow.column("key").to_numpy()
    # a fixed stride of the block's rows: deterministic, and enough to place the boundaries
    step = max(1, round(1 / rate)) if rate > 0 else len(keys) + 1
    return keys[::step]


def _cut(table: pa.Table, part: np.ndarray, parts: int) -> list[pa.Table]:
    order = np.argsort(part, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


def _by_range(narrow: pa.Table, boundaries: np.ndarray) -> list[pa.Table] | pa.Table:
    part = np.searchsorted(boundaries, narrow.column("key").to_numpy(), side="right")
    pieces = _cut(narrow, part, len(boundaries) + 1)
    return pieces if len(pieces) > 1 else pieces[0]


def _sort_range(*pieces: pa.Table) -> pa.Table:
    table = pa.concat_tables(pieces)
    order = pc.sort_indices(
        table, [("key", "ascending"), ("id", "ascending"), ("row", "ascending")]
    )
    return table.take(order).select(["row"])


def _rank_range(ordered: pa.Table, first: int, blocks: int) -> list[pa.Table] | pa.Table:
    rows = ordered.column("row").to_numpy()
    ranked = pa.table(
        [pa.array(rows, pa.int64()), pa.array(np.arange(first, first + len(rows)), pa.int64())],
        schema=_RANKED,
    )
    pieces = _cut(ranked, rows >> ROW_BITS, blocks)
    return pieces if blocks > 1 else pieces[0]


def _put_ranks(block_index: int, block: pa.Table, column: str, *pieces: pa.Table) -> pa.Table:
    n = block.num_rows
    rank = np.zeros(n, dtype=np.int64)
    has = np.zeros(n, dtype=bool)
    base = np.int64(block_index) << np.int64(ROW_BITS)
    for piece in pieces:
        at = piece.column("row").to_numpy() - base
        rank[at] = piece.column("rank").to_numpy()
        has[at] = True
    return put_column(block, column, pa.array(rank, RANK_TYPE, mask=~has))


def add_ranks(ds: Any, keys_of: Any, spec: tuple, column: str) -> tuple[Any, int]:
    """(`ds` with `column`, the number of ranked rows): `column` holds the exact rank of each row
    that `keys_of(block, spec)` gives a key (`stages.select.row_keys`' contract: keys of the valid
    rows, the mask, their ids), null for the others. Materialises `ds` (its blocks are the unit
    of the last pass)."""
    import ray

    blocks = ds.to_arrow_refs()
    if not blocks:
        return ds, 0
    narrow = [ray.remote(_narrow).remote(i, ref, keys_of, spec) for i, ref in enumerate(blocks)]
    sizes = ray.get([ray.remote(_num_rows).remote(r) for r in narrow])
    total = sum(sizes)
    parts = max(1, min(len(blocks), -(-total // ROWS_PER_RANGE)))
    boundaries = np.zeros(0)
    if parts > 1:
        rate = min(1.0, SAMPLE_KEYS / max(total, 1))
        sample = np.sort(
            np.concatenate(ray.get([ray.remote(_sample).remote(r, rate) for r in narrow]))
        )
        boundaries = np.unique(sample[(np.arange(1, parts) * len(sample)) // parts])
        parts = len(boundaries) + 1
    split = ray.remote(_by_range).options(num_returns=parts)
    cut = [split.remote(r, boundaries) for r in narrow]
    cut = [c if parts > 1 else [c] for c in cut]
    ordered = [ray.remote(_sort_range).remote(*[c[p] for c in cut]) for p in range(parts)]
    counts = ray.get([ray.remote(_num_rows).remote(o) for o in ordered])
    firsts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64).tolist()
    number = ray.remote(_rank_range).options(num_returns=len(blocks))
    ranked = [number.remote(o, f, len(blocks)) for o, f in zip(ordered, firsts, strict=True)]
    ranked = [r if len(blocks) > 1 else [r] for r in ranked]
    put = ray.remote(_put_ranks)
    ranked_ds = ray.data.from_arrow_refs(
        [put.remote(i, ref, column, *[r[i] for r in ranked]) for i, ref in enumerate(blocks)]
    )
    return ranked_ds, total
