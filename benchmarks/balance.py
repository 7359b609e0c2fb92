"""Balance throughput: the `balance` stage through the runner vs. an in-memory sort in this process.

    python benchmarks/balance.py --rows 1000000 --sources 20

A synthetic mixture of `--rows` rows (id, source, caption, a tenth of them text-only by a null
`images`) over `--sources` sources whose sizes fall off as a power law (the largest about 100x
the smallest, as in instruction pools), written as 8 Parquet shards. Printed, in rows/s:

- the floor: a global stage through the runner that marks nothing (one read, one write);
- the stage through the runner for four settings: per-source cap; cap + size-tempered total;
  cap + total + text-only share; and concept balancing over a 2,000-entry vocabulary. The rate
  is rows / the stage's own seconds from its manifest (reads, every counting pass, the marking
  pass, writing kept and rejected shards);
- the baseline, the obvious single-process way for the cap + total setting: read the two columns
  it needs, hash every id to its key, and per source take the k smallest keys with numpy
  (argpartition), all in memory on the driver. It writes nothing, so it is a floor, not a peer;
  the ratio says what the stage's bounded memory and Ray passes cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines.runner import Pipeline, Runner, ensure_ray
from warren.stages.balance import Balance, balance_targets
from warren.stages.base import GlobalContext, GlobalStage, reject
from warren.stages.concept_balance import ConceptBalance
from warren.stages.schema import conform
from warren.stages.select import uniform_key

WORDS = [f"w{i}" for i in range(5000)]


def make_pool(folder: Path, rows: int, sources: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, sources + 1) ** 1.5
    names = np.array([f"src{i:02d}" for i in range(sources)])
    src = names[rng.choice(sources, rows, p=weights / weights.sum())]
    word_ids = rng.zipf(1.3, (rows, 8)) % len(WORDS)
    captions = [" ".join(WORDS[j] for j in row) for row in word_ids]
    text_only = rng.random(rows) < 0.1
    image = [{"bytes": b"\xff\xd8", "path": None}]
    images = [None if t else image for t in text_only]
    shard = -(-rows // 8)
    for s in range(8):
        sl = slice(s * shard, min(rows, (s + 1) * shard))
        table = pa.table(
            {
                "id": [f"r{i:09d}" for i in range(sl.start, sl.stop)],
                "images": images[sl],
                "caption": captions[sl],
                "source": src[sl].tolist(),
            }
        )
        pq.write_table(conform(table), folder / f"shard-{s}.parquet")
    uniq, counts = np.unique(src, return_counts=True)
    return dict(zip(uniq.tolist(), counts.tolist(), strict=True))


def baseline(folder: Path, cap: int, total: int, seed: int) -> float:
    start = time.perf_counter()
    table = pq.read_table(folder, columns=["id", "source"])
    ids = table.column("id").to_pylist()
    keys = uniform_key(ids, seed)
    src = np.array(table.column("source").to_pylist())
    sizes = {s: int((src == s).sum()) for s in np.unique(src)}
    targets = balance_targets(sizes, cap, total, 0.5)
    kept = 0
    for s, (_, k) in targets.items():
        rows = np.flatnonzero(src == s)
        if k < len(rows):
            rows = rows[np.argpartition(keys[rows], k)[:k]]
        kept += len(rows)
    assert kept == sum(k for _, k in targets.values())
    return time.perf_counter() - start


def _keep_all(batch: pa.Table) -> pa.Table:
    return reject(batch, np.zeros(batch.num_rows, bool), "")


class KeepAll(GlobalStage):
    """The floor: a global stage that reads, marks nothing and writes, in one pass."""

    name = "keep_all"

    def run(self, ds, ctx: GlobalContext):
        return ds.map_batches(_keep_all, batch_format="pyarrow")


def run_stage(pool: Path, work: Path, stage: GlobalStage, label: str, rows: int) -> float:
    out = work / f"out-{label}"
    runner = Runner(Pipeline(label, [stage]), str(pool), str(out), progress=False)
    reports = runner.run()
    report = reports[-1]
    assert report.rows_in == rows
    rate = rows / report.seconds
    print(f"  {label:<28} {report.seconds:7.1f} s  {rate:>10,.0f} rows/s  kept {report.kept:,}")
    shutil.rmtree(out)
    return report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warren-bench-balance-"))
    try:
        pool = work / "pool"
        pool.mkdir()
        t = time.perf_counter()
        sizes = make_pool(pool, args.rows, args.sources, args.seed)
        print(
            f"pool: {args.rows:,} rows, {len(sizes)} sources ({max(sizes.values()):,} to "
            f"{min(sizes.values()):,} rows), built in {time.perf_counter() - t:.1f} s"
        )
        cap = sorted(sizes.values())[-3]  # the two largest sources are capped
        total = args.rows // 4
        vocab = work / "vocab.txt"
        vocab.write_text("\n".join(WORDS[:2000]))
        ensure_ray(os.cpu_count())
        # a first tiny run pays Ray's start-up, so it is not counted against the stage
        Runner(
            Pipeline("warm", [Balance(cap=1)]),
            str(pool / "shard-0.parquet"),
            str(work / "w"),
            progress=False,
        ).run()
        print("stage through the runner:")
        floor = run_stage(pool, work, KeepAll(), "floor: read + write, no rule", args.rows)
        timings = {
            "cap": run_stage(pool, work, Balance(cap=cap), "cap", args.rows),
            "cap+total": run_stage(
                pool, work, Balance(cap=cap, total=total), "cap+total", args.rows
            ),
            "cap+total+text_share": run_stage(
                pool,
                work,
                Balance(cap=cap, total=total, text_share=0.05),
                "cap+total+share",
                args.rows,
            ),
            "concepts": run_stage(
                pool,
                work,
                ConceptBalance(concepts=str(vocab), concept_cap=args.rows // 500),
                "concepts",
                args.rows,
            ),
        }
        base = baseline(pool, cap, total, 0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"baseline, in memory on the driver (cap+total): {base:.1f} s, "
            f"{args.rows / base:,.0f} rows/s; driver peak RSS {peak:.2f} GiB"
        )
        print(f"ratio stage / baseline (cap+total): {timings['cap+total'] / base:.2f}x the time")
        print(
            "stage seconds beyond the read + write floor: "
            + ", ".join(f"{k} {v - floor:.1f} s" for k, v in timings.items())
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
