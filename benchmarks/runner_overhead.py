"""Runner overhead: a trivial batch stage through the runner vs. a plain pyarrow loop, same shards.

    python benchmarks/runner_overhead.py --rows 1000000 --payload-kb 50

Both sides do the same work per shard: read it, run the stage's `process`, split kept from
rejected, write both as Parquet. The runner adds Ray Data scheduling, the ledger and manifests.
Its ingest copy of the input is timed separately (it is a one-off per input, not per stage).

Two bare loops: the historical one (one thread, over the generated input shards), and the honest
one the target is measured against: over the very shards the stage reads (the ingest copy's
files), one file per thread on every CPU, as a user with a thread pool would write it (pyarrow
releases the GIL while it reads, compresses and writes).

Payloads are `--distinct-payloads` random blobs (incompressible, like JPEG bytes) repeated over the
rows, written with Parquet dictionary encoding so 1M x 50 KB fits on this disk; in memory every row
still carries its full 50 KB. Peak RSS is sampled every 50 ms over the driver and all its child
processes (Ray workers included; shared object-store pages are counted once per process that maps
them, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.base import BatchStage, param, reject
from warren.stages.ledger import split_rejected
from warren.stages.run_layout import open_run
from warren.stages.schema import IMAGE_TYPE, conform
from warren.stages.shards import Location, write_table_atomic


@dataclasses.dataclass(frozen=True)
class TrivialParams:
    max_chars: int = param(40, "reject captions longer than this")


class Trivial(BatchStage):
    """Caption length filter: the cheapest stage that still reads a column and rejects rows."""

    name = "trivial"
    Params = TrivialParams

    def process(self, batch: pa.Table) -> pa.Table:
        lengths = pc.utf8_length(batch.column("caption"))
        return reject(
            batch,
            pc.greater(lengths, self.params.max_chars).to_numpy(zero_copy_only=False),
            "trivial: long",
        )


class PeakRSS:
    def __init__(self) -> None:
        self.peak_tree = self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_tree = max(self.peak_tree, total)
                self.peak_driver = max(self.peak_driver, me.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._cpu0 = tree_cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu_s = tree_cpu_seconds() - self._cpu0


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every live descendant (Ray's
    raylet and workers included): on a machine others share, work done is steadier than wall time.
    A descendant that exited in between takes its seconds with it; Ray keeps its workers."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def make_shards(
    folder: Path, rows: int, per_shard: int, payload_kb: int, distinct: int, seed: int
) -> int:
    rng = np.random.default_rng(seed)
    payloads = [rng.bytes(payload_kb * 1024) for _ in range(distinct)]
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for s, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        idx = rng.integers(0, distinct, n)
        images = pa.array(
            [[{"bytes": payloads[i], "path": None}] for i in idx], pa.list_(IMAGE_TYPE)
        )
        caps = pa.array([("a cat " * int(k % 12)).strip() for k in range(start, start + n)])
        ids = pa.array([f"b-{k:08d}" for k in range(start, start + n)])
        table = conform(pa.table({"id": ids, "images": images, "caption": caps}))
        pq.write_table(
            table,
            folder / f"shard-{s:05d}.parquet",
            use_dictionary=True,
            dictionary_pagesize_limit=1 << 30,
            row_group_size=n,
        )
        written += n
    return written


def plain_loop(src: Path, dst: Path, stage: Trivial) -> int:
    out = Location.of(dst)
    out.join("rejected").mkdir()
    rows = 0
    for f in sorted(src.glob("*.parquet")):
        table = pq.read_table(f)
        kept, rejected = split_rejected(stage.process(table))
        write_table_atomic(kept, out.join(f"{f.stem}.parquet"))
        if rejected.num_rows:
            write_table_atomic(rejected, out.join("rejected", f"{f.stem}.parquet"))
        rows += table.num_rows
    return rows


def plain_loop_parallel(files: list[str], dst: Path, stage: Trivial, workers: int) -> int:
    """The bare loop over `files`, one file per task on `workers` threads."""
    out = Location.of(dst)
    out.join("rejected").mkdir()

    def one(path: str) -> int:
        name = path.rsplit("/", 1)[-1]
        table = pq.read_table(path)
        kept, rejected = split_rejected(stage.process(table))
        write_table_atomic(kept, out.join(name))
        if rejected.num_rows:
            write_table_atomic(rejected, out.join("rejected", name))
        return table.num_rows

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, files))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--payload-kb", type=int, default=50)
    ap.add_argument("--rows-per-shard", type=int, default=2_000)
    ap.add_argument("--distinct-payloads", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="warren-bench-"))
    src = work / "input"
    try:
        t0 = time.perf_counter()
        n = make_shards(
            src, args.rows, args.rows_per_shard, args.payload_kb, args.distinct_payloads, args.seed
        )
        print(
            f"generated {n:,} rows x {args.payload_kb} KB in {time.perf_counter() - t0:.1f} s -> {src}"
        )
        stage = Trivial()

        with PeakRSS() as rss:
            t0 = time.perf_counter()
            plain_loop(src, work / "plain", stage)
            plain_s = time.perf_counter() - t0
        print(
            f"plain pyarrow loop: {plain_s:.1f} s, {n / plain_s:,.0f} rows/s, "
            f"{rss.cpu_s:.1f} CPU s, peak RSS {rss.peak_driver / 2**30:.2f} GiB"
        )
        shutil.rmtree(work / "plain")

        def run_stage() -> None:
            Runner(
                Pipeline("bench", [stage]),
                str(src),
                str(work / "runner"),
                input_format="parquet",
                progress=False,
            ).run()

        with PeakRSS() as rss:
            t0 = time.perf_counter()
            run_stage()
            total_s = time.perf_counter() - t0
        run = open_run(str(work / "runner"))
        ingest_s = run.stages[0].manifest["seconds"]
        stage_s = run.stages[1].manifest["seconds"]
        print(
            f"runner: ingest copy {ingest_s:.1f} s, stage {stage_s:.1f} s ({n / stage_s:,.0f} rows/s), "
            f"whole run {total_s:.1f} s incl. Ray start; peak RSS driver {rss.peak_driver / 2**30:.2f} GiB, "
            f"driver+workers {rss.peak_tree / 2**30:.2f} GiB"
        )
        # Ray Data's own floor on the same shards: read them and count, nothing written.
        import pyarrow as pa
        import ray

        parts = run.stages[0].uris()
        t0 = time.perf_counter()
        ds = ray.data.read_parquet(parts, partitioning=None, include_paths=True)
        ds = ds.map_batches(
            lambda b: pa.table({"n": [b.num_rows]}), batch_format="pyarrow", batch_size=None
        )
        counted = sum(
            sum(b.column("n").to_pylist())
            for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
        )
        ray_s = time.perf_counter() - t0
        assert counted == n, (counted, n)
        print(
            f"Ray Data read + no-op map of the same rows (no writes): {ray_s:.1f} s ({n / ray_s:,.0f} rows/s)"
        )
        # The stage once more, alone (the ingest copy is reused), to count its CPU seconds.
        shutil.rmtree(work / "runner" / Path(run.stages[1].folder).name)
        with PeakRSS() as rss:
            run_stage()
        again_s = open_run(str(work / "runner")).stages[1].manifest["seconds"]
        stage_cpu = rss.cpu_s
        print(f"runner stage again, alone: {again_s:.1f} s, {stage_cpu:.1f} CPU s")
        workers = os.cpu_count() or 1
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            got = plain_loop_parallel(parts, work / "plain-parallel", stage, workers)
            par_s = time.perf_counter() - t0
        assert got == n, (got, n)
        shutil.rmtree(work / "plain-parallel")
        print(
            f"plain pyarrow loop over the stage's input shards ({len(parts)} files), "
            f"{workers} threads: {par_s:.1f} s, {n / par_s:,.0f} rows/s, {rss.cpu_s:.1f} CPU s"
        )
        print(
            f"ratio runner stage / plain loop over the same shards (CPU s): "
            f"{stage_cpu / rss.cpu_s:.2f}x"
        )
        print(f"ratio runner stage / plain loop, 1 thread (time): {stage_s / plain_s:.2f}x")
        print(
            f"ratio runner stage / plain loop over the same shards, {workers} threads (time): "
            f"{stage_s / par_s:.2f}x"
        )
        print(f"ratio runner stage / Ray Data read floor (time): {stage_s / ray_s:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
