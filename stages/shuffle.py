"""shuffle: run a function on every group of rows that share a key, in parallel Ray tasks.

What a global stage such as `semdedup` needs: every row of a cluster in one place, each cluster
decided on its own. Ray Data's `groupby(key).map_groups(fn)` does this with its general hash
shuffle, which on a small machine costs many times the work it feeds (100k rows of 768-d
float16 embeddings on 2 cores: 5-14 s through `groupby(...).map_groups` with an identity function,
0.2 s through the tasks below), so the partitioning is done here with plain Ray tasks and
zero-copy Arrow slices:

1. the input blocks are cut into `S` contiguous runs; one task per run concatenates its blocks,
   orders the rows by `key mod P` and returns `P` slices, one per partition (S x P objects);
2. one task per partition concatenates its slices from every run, sorts them by key (nulls last,
   as one group of their own; within a group by input position, else by id) and calls `fn(group, *fn_args)` on each group;
3. the partitions' results become the output Dataset (`ray.data.from_arrow_refs`).

Memory per task: a run (about `rows / S` rows) in step 1, a partition (about `rows / P` rows, and
at least the largest group) in step 2. `fn` must return a table with the same columns for every
group, the empty group included.

With a `checkpoint` folder, each partition's result is also written there once computed, and a
later call with the same partitioning (a run resumed after a kill) reads the finished partitions
back instead of computing them again; when every partition is there, nothing is split at all.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import POSITION_COLUMN
from warren.stages.shards import Location, write_table_atomic

ROWS_PER_SPLIT_TASK = 200_000


def _fill(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Nulls replaced by the type's zero (callers keep the validity mask apart)."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        zero = pa.scalar("", t)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        zero = pa.scalar(b"", t)
    else:
        zero = pa.scalar(0, t)
    return pc.fill_null(col, zero)


def _partition_of(table: pa.Table, key: str, parts: int) -> np.ndarray:
    col = table.column(key)
    if pa.types.is_integer(col.type):
        values = _fill(col).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.mod(values, parts)
    # Strings and bytes: CRC-32, which (unlike Python's hash) is the same in every process.
    raw = _fill(col).to_pylist()
    return np.array(
        [zlib.crc32(v.encode() if isinstance(v, str) else bytes(v)) % parts for v in raw],
        dtype=np.int64,
    )


def _concat(tables: tuple[pa.Table, ...]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _split(key: str, parts: int, *tables: pa.Table) -> list[pa.Table] | pa.Table:
    table = _concat(tables)
    part = _partition_of(table, key, parts)
    order = np.argsort(part, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    slices = [table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]
    return slices if parts > 1 else slices[0]


def group_bounds(keys: pa.ChunkedArray | pa.Array) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal keys in a column sorted with nulls last."""
    n = len(keys)
    if not n:
        return []
    valid = pc.is_valid(keys).to_numpy(zero_copy_only=False)
    values = _fill(keys).to_numpy(zero_copy_only=False)
    change = np.flatnonzero((values[1:] != values[:-1]) | (valid[1:] != valid[:-1])) + 1
    starts = np.r_[0, change]
    stops = np.r_[change, n]
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def _reduce(
    key: str, fn: Callable[..., pa.Table], fn_args: tuple, whole: bool, *tables: pa.Table
) -> pa.Table:
    table = _concat(tables)
    if not table.num_rows:
        return fn(table, [], *fn_args) if whole else fn(table, *fn_args)
    # Nulls last (the default); within a group rows come in input order (or by id), whatever
    # order the runs arrived in, so a group's decisions and floats are the same in every run.
    ties = [c for c in (POSITION_COLUMN, "id") if c in table.column_names and c != key]
    order = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in [key, *ties]])
    table = table.take(order)
    bounds = group_bounds(table.column(key))
    if whole:
        return fn(table, bounds, *fn_args)
    outs = [fn(table.slice(a, b - a), *fn_args) for a, b in bounds]
    return pa.concat_tables(outs, promote_options="default")


def _reduce_saved(
    saved: Location,
    key: str,
    fn: Callable[..., pa.Table],
    fn_args: tuple,
    whole: bool,
    *tables: pa.Table,
) -> pa.Table:
    out = _reduce(key, fn, fn_args, whole, *tables)
    write_table_atomic(out, saved)
    return out


def _load_saved(saved: Location) -> pa.Table:
    import pyarrow.parquet as pq

    with saved.fs.open_input_file(saved.path) as f:
        return pq.read_table(f)


def map_groups(
    ds: Any,
    key: str,
    fn: Callable[..., pa.Table],
    fn_args: tuple = (),
    *,
    num_partitions: int,
    num_rows: int,
    num_cpus: float,
    whole_partitions: bool = False,
    checkpoint: Location | None = None,
    num_gpus: float = 0.0,
) -> Any:
    """A Dataset of `fn(group, *fn_args)` for every group of rows of `ds` sharing `key`.

    With `whole_partitions`, `fn(partition, bounds, *fn_args)` is called once per partition
    instead, with the partition sorted by key and the (start, stop) rows of each of its groups:
    for many tiny groups (exact duplicates are mostly groups of one) a call per group costs far
    more than the work. Each partition's task holds `num_gpus` of a GPU (`fn` then sees it)."""
    import ray

    parts = max(1, int(num_partitions))
    saved: list[Location | None] = [None] * parts
    if checkpoint is not None:
        saved = [checkpoint.join(f"{fn.__name__}-{parts}-{i:06d}.parquet") for i in range(parts)]
    results: list[Any] = [None] * parts
    load = ray.remote(_load_saved)
    for i, loc in enumerate(saved):
        if loc is not None and loc.exists():
            results[i] = load.remote(loc)
    todo = [i for i in range(parts) if results[i] is None]
    if todo:
        refs = ds.to_arrow_refs()
        if not refs:
            return ds
        runs = max(int(num_cpus) * 2, math.ceil(num_rows / ROWS_PER_SPLIT_TASK))
        runs = max(1, min(len(refs), runs))
        split = ray.remote(_split).options(num_returns=parts)
        bounds = np.linspace(0, len(refs), runs + 1).round().astype(int)
        pieces = []
        for r in range(runs):
            out = split.remote(key, parts, *refs[bounds[r] : bounds[r + 1]])
            pieces.append(out if parts > 1 else [out])
        gpus = {"num_gpus": num_gpus} if num_gpus > 0 else {}
        reduce = ray.remote(_reduce).options(**gpus)
        reduce_saved = ray.remote(_reduce_saved).options(**gpus)
        for i in todo:
            inputs = [p[i] for p in pieces]
            if saved[i] is None:
                results[i] = reduce.remote(key, fn, fn_args, whole_partitions, *inputs)
            else:
                results[i] = reduce_saved.remote(
                    saved[i], key, fn, fn_args, whole_partitions, *inputs
                )
    return ray.data.from_arrow_refs(results)
