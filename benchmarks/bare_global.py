"""cluster and semdedup as a capable user would script them without warren: the baseline that
counts the stage's own compute as well as its read -> write floor.

For a stage whose decision is heavy arithmetic (k-means over every embedding; cosine similarity
of every pair inside each cluster) the plain read -> write floor leaves out work no runner can
skip: on 2 cores semdedup's pair screen alone takes longer than copying its input. These
functions do the same arithmetic with the stage's own numeric functions (so the comparison is of
everything around them, not of two implementations of the maths), on every core, and nothing
else:

1. read the stage's narrow columns (id and embedding, plus cluster and centroid cosine for
   semdedup) from every file with pyarrow, a thread per core;
2. compute: cluster trains faiss k-means (`train_kmeans`, all cores) on the rows the stage would
   train on; semdedup sorts the rows by cluster and decides each cluster
   (`dedup_cluster_table`) in a process per core;
3. read -> decide -> write each file in a process per core (cluster assigns each row its nearest
   centroid there), with the settings warren writes with.

Processes, each with one BLAS thread, as Ray runs its workers: threads would share one GIL over
the numpy bookkeeping, and each would start a BLAS thread per core.

Each returns the seconds of the three steps and their total. No checkpoints, no resume, no
progress, no rejected-row folder, no Ray: the least a correct script does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warren.stages.base import GlobalStage
from warren.stages.shards import parquet_write_options

FILE, ROW = "_bare_file", "_bare_row"


def _cores() -> int:
    return os.cpu_count() or 1


@contextlib.contextmanager
def _processes() -> Iterator[ProcessPoolExecutor]:
    """A process per core, each with one BLAS/OpenMP thread (as Ray runs its workers): the
    variables are read when a child imports numpy, so they are set before the children start."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: "1" for k in names})
    try:
        with ProcessPoolExecutor(_cores(), get_context("spawn")) as pool:
            yield pool
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _own(table: pa.Table) -> pa.Table:
    """A copy holding only its own rows: a pickled slice would carry its parent's whole buffers."""
    return table.take(pa.array(np.arange(table.num_rows)))


def read_narrow(files: list[str], columns: list[str]) -> pa.Table:
    """`columns` of every file, with each row's file and row number."""

    def one(i_f: tuple[int, str]) -> pa.Table:
        i, f = i_f
        t = pq.read_table(f, columns=columns)
        n = t.num_rows
        t = t.append_column(FILE, pa.array(np.full(n, i, np.int32)))
        return t.append_column(ROW, pa.array(np.arange(n, dtype=np.int64)))

    with ThreadPoolExecutor(_cores()) as pool:
        return pa.concat_tables(list(pool.map(one, enumerate(files))))


def _write_one(path: str, out: str, decide: Callable[[pa.Table, Any], pa.Table], arg: Any) -> None:
    table = decide(pq.read_table(path), arg)
    pq.write_table(table, out, **parquet_write_options(table))


def write_files(
    files: list[str], scratch: Path, decide: Callable[[pa.Table, Any], pa.Table], args: list
) -> None:
    """Read each whole file, `decide(table, args[i])`, write the result as warren writes a shard;
    a process per core."""
    scratch.mkdir(parents=True, exist_ok=True)
    outs = [str(scratch / f"{i:06d}.parquet") for i in range(len(files))]
    try:
        with _processes() as pool:
            list(pool.map(_write_one, files, outs, [decide] * len(files), args))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _timed(steps: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    steps[name] = now - start
    return now


def _assign_file(table: pa.Table, arg: tuple) -> pa.Table:
    from warren.stages.cluster import assign

    column, centroids, exclude = arg
    return assign(table, column, centroids, exclude)


def bare_cluster(files: list[str], stage: GlobalStage, scratch: Path) -> dict[str, float]:
    import faiss

    from warren.stages.cluster import embeddings_of, train_kmeans

    p = stage.params
    steps: dict[str, float] = {}
    start = t = time.perf_counter()
    narrow = read_narrow(files, [p.column])
    t = _timed(steps, "narrow", t)
    x, _ = embeddings_of(narrow, p.column, dtype=np.float32)
    n_train = min(len(x), int(round(len(x) * p.sample_fraction)), p.max_train_rows)
    if n_train < len(x):  # the stage draws its own seeded sample of the same size
        x = x[np.sort(np.random.default_rng(p.seed).choice(len(x), n_train, replace=False))]
    faiss.omp_set_num_threads(_cores())
    centroids = train_kmeans(x, stage.n_clusters_for(narrow.num_rows), p.niter, p.seed, p.nredo)
    del x, narrow
    t = _timed(steps, "compute", t)
    arg = (p.column, centroids, list(p.exclude_clusters))
    write_files(files, scratch, _assign_file, [arg] * len(files))
    _timed(steps, "wide", t)
    steps["total"] = time.perf_counter() - start
    return steps


def _decide_clusters(groups: list[pa.Table], params) -> list[pa.Table]:
    from warren.stages.semdedup import dedup_cluster_table

    return [dedup_cluster_table(g, params, True) for g in groups]


def _put_decisions(table: pa.Table, decided: pa.Table) -> pa.Table:
    assert decided.num_rows == table.num_rows, "bare semdedup lost rows"
    for c in decided.column_names:
        col = decided.column(c)
        if c in table.column_names:
            table = table.set_column(table.column_names.index(c), c, col)
        else:
            table = table.append_column(c, col)
    return table


def bare_semdedup(files: list[str], stage: GlobalStage, scratch: Path) -> dict[str, float]:
    from warren.stages.semdedup import CENTROID_COLUMN, CLUSTER_COLUMN

    p = stage.params
    steps: dict[str, float] = {}
    start = t = time.perf_counter()
    narrow = read_narrow(files, ["id", p.column, CLUSTER_COLUMN, CENTROID_COLUMN])
    t = _timed(steps, "narrow", t)
    keys = pc.fill_null(narrow.column(CLUSTER_COLUMN), -1).to_numpy()
    order = np.argsort(keys, kind="stable")  # by cluster, then file and row
    cuts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1], True])
    groups = [narrow.take(pa.array(order[a:b])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    del narrow
    # Largest clusters first, dealt round-robin: each process gets about the same pair count.
    groups.sort(key=lambda g: -g.num_rows)
    cores = _cores()
    deals = [groups[k::cores] for k in range(cores)]
    with _processes() as pool:
        decided = [d for out in pool.map(_decide_clusters, deals, [p] * cores) for d in out]
    del groups, deals
    decided = pa.concat_tables(decided, promote_options="default")
    decided = decided.take(pc.sort_indices(decided, [(FILE, "ascending"), (ROW, "ascending")]))
    offsets = np.searchsorted(decided.column(FILE).to_numpy(), np.arange(len(files) + 1))
    keep = [
        c
        for c in decided.column_names
        if c not in ("id", CLUSTER_COLUMN, CENTROID_COLUMN, FILE, ROW)
    ]
    decided = decided.select(keep)
    per_file = [
        _own(decided.slice(a, b - a)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    t = _timed(steps, "compute", t)
    write_files(files, scratch, _put_decisions, per_file)
    _timed(steps, "wide", t)
    steps["total"] = time.perf_counter() - start
    return steps


BARE: dict[str, Callable[[list[str], GlobalStage, Path], dict[str, float]]] = {
    "cluster": bare_cluster,
    "semdedup": bare_semdedup,
}
