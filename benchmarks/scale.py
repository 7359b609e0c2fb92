"""How cost grows: the Bunny recipe after embedding at several pool sizes, stage by stage.

    python benchmarks/scale.py --rows 100000 1000000 3000000 --json scale.json

For each size a pool is made as `embed` leaves it: an id, a caption, one image of `--payload-kb`
(a JPEG padded with random bytes), 768-d L2-normalised float16 image and text embeddings. The
image embeddings fall in natural groups (one per 5,000 rows), and a tenth of the rows are near
copies (cosine about 0.99) of another row, which the component dedup must link. The recipe's
stages after `embed` then run through the runner exactly as `bunny_pretrain` configures them:
cluster (k-means, 20k rows a cluster), semdedup (components above cosine 0.86, keep the middle),
clip_score (rank window 40-60%), centroid_window (15-35%) and sample (a hundredth of the pool).

For each stage it prints the rows in, wall seconds, the split between the decision (narrow
columns, `decide`) and its application to the wide rows (`apply`), the stage's read -> write floor
(a plain pyarrow copy of its input on every core, written as warren writes, `--floor`), for
cluster and semdedup the same work as a plain script (`bare`: their narrow read, their arithmetic
on every core and the read -> write, benchmarks/bare_global.py, `--bare`), the bytes through Ray's
object store,
and peak memory: the driver's RSS, the largest RSS of one Ray worker, and all workers together
(sampled every 0.2 s; shared object-store pages count in each process that maps them, so the sum
is an upper bound). With more than one size it fits t = a * rows^k per stage (least squares on the
logarithms) and prints k and the microseconds per row at the largest size.

Disk: a pool of 3M x 50 KB would be 150 GB per stage copy. With `--distinct-payloads K` (default
16) the padded images are K distinct blobs repeated over the rows and written with Parquet
dictionary encoding: on disk a row costs its index, in memory every row still carries its whole
payload, so every read materialises and every write hashes and encodes `--payload-kb` per row.
What this leaves out is the disk's own throughput, which a real pool adds to the apply step (and to
the floor). `--distinct-payloads 0` gives every row its own bytes. Each stage's input is deleted
once the next stage ran (the pool is not kept either), so a size needs about three copies of its
pool on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from bare_global import BARE
from cpu_split import is_ray_worker
from global_stages import _jpeg, _unit, column_sizes, floor_seconds, narrow_bytes, store_bytes

from warren.pipelines import run_global
from warren.pipelines import runner as runner_module
from warren.pipelines.bunny_pretrain import pipeline as bunny
from warren.pipelines.runner import Pipeline, Runner
from warren.stages.base import GlobalStage
from warren.stages.schema import IMAGE_TYPE, conform
from warren.stages.select import Sample

DIM = 768
ROWS_PER_GROUP = 5_000  # rows per natural group of image embeddings
SHARD_ROWS = 20_000


def _embedding_column(x: np.ndarray) -> pa.Array:
    flat = pa.array(x.astype(np.float16).ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, DIM)


def make_pool(folder: Path, rows: int, payload_kb: int, distinct: int, seed: int) -> None:
    """The pool as `embed` leaves it (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    groups = max(1, rows // ROWS_PER_GROUP)
    centres = rng.normal(size=(groups, DIM))
    blobs = [_jpeg(rng, payload_kb) for _ in range(distinct)]
    folder.mkdir(parents=True)
    for s, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        emb = _unit(centres[rng.integers(0, groups, n)] + 1.2 * rng.normal(size=(n, DIM)))
        # Near copies: another row plus noise of norm 0.1 (cosine about 0.995).
        copies = rng.choice(n, n // 10, replace=False)
        noise = rng.normal(size=(len(copies), DIM)) * (0.1 / math.sqrt(DIM))
        emb[copies] = _unit(emb[rng.integers(0, n, len(copies))] + noise)
        # Captions: the image's direction plus noise of norm 2-4 (CLIP-like cosines of 0.25-0.45).
        sigma = rng.uniform(2, 4, (n, 1)) / math.sqrt(DIM)
        text = _unit(emb + sigma * rng.normal(size=(n, DIM)))
        if distinct:
            pick = rng.integers(0, distinct, n)
            images = [[{"bytes": blobs[i], "path": None}] for i in pick]
        else:
            images = [[{"bytes": _jpeg(rng, payload_kb), "path": None}] for _ in range(n)]
        table = pa.table(
            {
                "id": [f"s-{k:010d}" for k in range(start, start + n)],
                "images": pa.array(images, pa.list_(IMAGE_TYPE)),
                "caption": [f"a photo, number {k}, of something" for k in range(start, start + n)],
                "image_emb": _embedding_column(emb),
                "text_emb": _embedding_column(text),
            }
        )
        pq.write_table(
            conform(table),
            folder / f"shard-{s:05d}.parquet",
            row_group_size=2048,
            dictionary_pagesize_limit=1 << 30,
        )


class PeakMemory:
    """Peak RSS of the driver, of the largest Ray worker and of all workers, sampled in a thread."""

    def __init__(self) -> None:
        self.driver = self.worker = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = []
            for p in me.children(recursive=True):
                if is_ray_worker(p):
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
            self.driver = max(self.driver, me.memory_info().rss)
            self.worker = max(self.worker, max(rss, default=0))
            self.workers = max(self.workers, sum(rss))
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def recipe_stages(rows: int) -> list[GlobalStage]:
    """bunny_pretrain's stages after `embed`, as the recipe sets them; the sample keeps 1%."""
    stages = bunny().stages
    after = [s for s in stages[[s.name for s in stages].index("embed") + 1 :]]
    return [Sample(n=max(1, rows // 100), seed=0) if s.name == "sample" else s for s in after]


def run_size(rows: int, args: argparse.Namespace, work: Path) -> list[dict]:
    pool, out = work / "pool", work / "out"
    t0 = time.perf_counter()
    make_pool(pool, rows, args.payload_kb, args.distinct_payloads, args.seed)
    print(f"\n{rows:,} rows x {args.payload_kb} KB: pool made in {time.perf_counter() - t0:.0f} s")

    measured: list[dict] = []
    run_stage = runner_module.EXECUTORS[GlobalStage]
    decide = run_global._decide
    timing: dict[str, float] = {}

    def timed_decide(*a, **k):
        start = time.perf_counter()
        try:
            return decide(*a, **k)
        finally:
            timing["decide"] = time.perf_counter() - start

    def measuring(runner, stage, loc, upstream):
        files = [f.path for f in upstream.kept]
        rejected = [f.path for f in upstream.rejected] if upstream.index > 0 else []
        if upstream.index == 0:
            shutil.rmtree(pool, ignore_errors=True)  # the ingest copy is what stages read
        timing.clear()
        before, start = store_bytes(), time.perf_counter()
        with PeakMemory() as mem:
            result = run_stage(runner, stage, loc, upstream)
        seconds = time.perf_counter() - start
        sizes, wide = column_sizes(files)
        m = {
            "rows": rows,
            "stage": stage.name,
            "rows_in": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
            "seconds": seconds,
            "decide": timing.get("decide", 0.0),
            "store": store_bytes() - before,
            "wide": wide,
            "narrow": narrow_bytes(stage, sizes),
            "driver_rss": mem.driver,
            "worker_rss": mem.worker,
            "workers_rss": mem.workers,
        }
        m["apply"] = seconds - m["decide"]
        if args.floor:
            m["floor"] = floor_seconds(files, work / "floor")
        if args.bare and stage.name in BARE:
            # In a process of its own: its arrays would stay in this one's RSS, the driver's
            # peak that the later stages report.
            with ProcessPoolExecutor(1, get_context("spawn")) as one:
                m["bare_steps"] = one.submit(BARE[stage.name], files, stage, work / "bare").result()
            m["bare"] = m["bare_steps"]["total"]
        measured.append(m)
        print(_row(m), flush=True)
        if upstream.index > 0:  # read by no one now: deleted, so that the next size fits
            for f in files + rejected:
                os.remove(f)
        return result

    print(_header())
    runner_module.EXECUTORS[GlobalStage] = measuring
    run_global._decide = timed_decide
    try:
        Runner(
            Pipeline("bunny_after_embed", recipe_stages(rows)),
            str(pool),
            str(out),
            input_format="parquet",
            progress=False,
        ).run()
    finally:
        runner_module.EXECUTORS[GlobalStage] = run_stage
        run_global._decide = decide
    return measured


def _header() -> str:
    return (
        f"{'stage':<16}{'rows in':>11}{'s':>8}{'decide':>8}{'apply':>8}{'floor':>8}{'/floor':>7}"
        f"{'bare':>7}{'/bare':>6}"
        f"{'store MiB':>10}{'narrow MiB':>11}{'driver GiB':>11}{'worker GiB':>11}{'all w GiB':>10}"
    )


def _row(m: dict) -> str:
    gib, mib = 1 << 30, 1 << 20
    floor, bare = m.get("floor"), m.get("bare")
    return (
        f"{m['stage']:<16}{m['rows_in']:>11,}{m['seconds']:>8.1f}{m['decide']:>8.1f}"
        f"{m['apply']:>8.1f}{floor if floor is not None else math.nan:>8.1f}"
        f"{m['seconds'] / floor if floor else math.nan:>7.2f}"
        f"{bare if bare is not None else math.nan:>7.1f}"
        f"{m['seconds'] / bare if bare else math.nan:>6.2f}{m['store'] / mib:>10.0f}"
        f"{m['narrow'] / mib:>11.0f}{m['driver_rss'] / gib:>11.2f}{m['worker_rss'] / gib:>11.2f}"
        f"{m['workers_rss'] / gib:>10.2f}"
    )


def fit(results: list[dict]) -> None:
    """t = a * rows_in^k per stage over the sizes run: k, and microseconds per row at the top."""
    print(f"\n{'stage':<16}{'k (t ~ rows^k)':>15}{'us/row at largest':>19}{'decide k':>10}")
    for stage in dict.fromkeys(m["stage"] for m in results):
        ms = sorted((m for m in results if m["stage"] == stage), key=lambda m: m["rows_in"])
        top = ms[-1]
        per_row = 1e6 * top["seconds"] / max(1, top["rows_in"])
        if len(ms) < 2:
            print(f"{stage:<16}{'-':>15}{per_row:>19.1f}{'-':>10}")
            continue
        x = np.log([max(1, m["rows_in"]) for m in ms])
        k = np.polyfit(x, np.log([m["seconds"] for m in ms]), 1)[0]
        kd = np.polyfit(x, np.log([max(m["decide"], 1e-3) for m in ms]), 1)[0]
        print(f"{stage:<16}{k:>15.2f}{per_row:>19.1f}{kd:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    ap.add_argument("--payload-kb", type=int, default=50)
    ap.add_argument("--distinct-payloads", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--bare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time cluster and semdedup as a plain script (benchmarks/bare_global.py)",
    )
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--one-size", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one_size:  # a child of the loop below: one size, its figures to --json
        work = Path(args.work) / f"{args.rows[0]}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            Path(args.json).write_text(json.dumps(run_size(args.rows[0], args, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    # Each size in a process of its own: peak memory is that size's, not the largest run so far
    # (a process's RSS never falls back, and Ray would keep its workers between sizes).
    results: list[dict] = []
    work = Path(args.work or tempfile.mkdtemp(prefix="warren-scale-"))
    for rows in args.rows:
        out = work / f"{rows}.json"
        flags = [f"--payload-kb={args.payload_kb}", f"--distinct-payloads={args.distinct_payloads}"]
        flags += [f"--seed={args.seed}", "--floor" if args.floor else "--no-floor"]
        flags += ["--bare" if args.bare else "--no-bare"]
        cmd = [sys.executable, __file__, "--one-size", "--rows", str(rows), *flags]
        subprocess.run([*cmd, "--work", str(work), "--json", str(out)], check=True)
        results.extend(json.loads(out.read_text()))
        if args.json:  # after every size, so a long run that stops keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    fit(results)


if __name__ == "__main__":
    main()
