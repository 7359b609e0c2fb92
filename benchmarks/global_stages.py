"""Global stages at size: what goes through Ray's object store, and time against the I/O floor.

    python benchmarks/global_stages.py --rows 20000 --payload-kb 50

A pool of `--rows` rows, each with its own image (a random 64x64 JPEG, padded with random bytes
to `--payload-kb`, so no two rows share bytes and the images decode), a 768-d float16 image
embedding and a text embedding (near duplicates planted), a source and a perplexity, goes
through the runner with every global stage that needs no model: cluster, semdedup, clip_score
(windowed), rank_window, ppl_filter, balance, exact_dedup, phash_dedup and sample.

For each stage it prints:
- `store`: the bytes created in Ray's object store while the stage ran (Ray's own counter,
  `cumulative_created_bytes` of every node's object store);
- `narrow`: the size of the columns the stage decides on (id and its decision columns, from the
  input's Parquet metadata, uncompressed), and `wide`: the size of its whole input rows;
- `seconds` and `floor`: the stage's time, and the time of a plain pyarrow read -> write of the
  same input files on every core (a thread per core; pyarrow releases the GIL), written with the
  settings warren writes with, and their ratio.

The same script runs against an older checkout (its runner has the same entry points), which is
how the figures before a change are measured.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines import runner as runner_module
from warren.pipelines.runner import Pipeline, Runner
from warren.stages.balance import Balance
from warren.stages.base import GlobalStage
from warren.stages.clip_score import ClipScore
from warren.stages.cluster import Cluster
from warren.stages.exact_dedup import ExactDedup
from warren.stages.perplexity import PplFilter
from warren.stages.phash_dedup import PhashDedup
from warren.stages.schema import IMAGE_TYPE, conform
from warren.stages.select import RankWindow, Sample
from warren.stages.semdedup import SemDedup
from warren.stages.shards import parquet_write_options

DIM = 768


def _jpeg(rng: np.random.Generator, size_kb: int) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    # Bytes after the JPEG's end marker: decoders ignore them, the content hash does not.
    return data + rng.bytes(max(0, size_kb * 1024 - len(data)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_pool(folder: Path, rows: int, per_shard: int, payload_kb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, DIM))
    folder.mkdir(parents=True)
    for s, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        emb = centres[rng.integers(0, 64, n)] + 0.8 * rng.normal(size=(n, DIM))
        # A tenth of the rows are near copies of another row of the shard.
        dup = rng.choice(n, n // 10, replace=False)
        emb[dup] = emb[rng.integers(0, n, len(dup))] + 0.02 * rng.normal(size=(len(dup), DIM))
        emb = _unit(emb)
        text = _unit(emb + 1.5 * rng.normal(size=(n, DIM)))

        def column(x: np.ndarray) -> pa.Array:
            flat = pa.array(x.astype(np.float16).ravel(), pa.float16())
            return pa.FixedSizeListArray.from_arrays(flat, DIM)

        table = pa.table(
            {
                "id": [f"g-{k:09d}" for k in range(start, start + n)],
                "images": pa.array(
                    [[{"bytes": _jpeg(rng, payload_kb), "path": None}] for _ in range(n)],
                    pa.list_(IMAGE_TYPE),
                ),
                "caption": [f"a picture number {k}" for k in range(start, start + n)],
                "source": [f"src{k % 4}" for k in range(start, start + n)],
                "ppl": pa.array(rng.lognormal(3, 1, n).astype(np.float32)),
                "image_emb": column(emb),
                "text_emb": column(text),
            }
        )
        pq.write_table(conform(table), folder / f"shard-{s:05d}.parquet", row_group_size=2048)


def stages(rows: int) -> list[GlobalStage]:
    return [
        Cluster(n_clusters=max(2, rows // 2000), niter=10),
        SemDedup(),
        ClipScore(lo=0.0, hi=0.95),
        RankWindow(column="cos_to_centroid", lo=0.0, hi=0.97),
        PplFilter(keep_lowest=0.97),
        Balance(cap=rows),
        ExactDedup(key="image"),
        PhashDedup(),
        Sample(n=int(rows * 0.7)),
    ]


def store_bytes() -> int:
    """Bytes ever created in the object stores of the cluster's live nodes (Ray's counter)."""
    import ray
    import ray._private.internal_api as internal

    total = 0
    for node in ray.nodes():
        if node.get("Alive"):
            stats = internal.node_stats(node["NodeManagerAddress"], node["NodeManagerPort"])
            total += stats.store_stats.cumulative_created_bytes
    return total


def column_sizes(files: list[str]) -> tuple[dict[str, int], int]:
    """Uncompressed bytes per top-level column (and in all) over `files`, from Parquet metadata."""
    sizes: dict[str, int] = {}
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                top = col.path_in_schema.split(".", 1)[0]
                key = "images.bytes" if col.path_in_schema.endswith(".bytes") else top
                sizes[key] = sizes.get(key, 0) + col.total_uncompressed_size
    return sizes, sum(sizes.values())


def narrow_bytes(stage: GlobalStage, sizes: dict[str, int]) -> int:
    names = {"id"}
    columns = stage.decision_columns() if hasattr(stage, "decision_columns") else ()
    for c in columns:
        names.add("images" if c.startswith("images") else c)
    total = sum(sizes.get(n, 0) for n in names)
    if "images" in columns:
        total += sizes.get("images.bytes", 0)
    return total


def floor_seconds(files: list[str], scratch: Path) -> float:
    """A plain read -> write of `files` on every core, written as warren writes its shards (zstd,
    row groups of 4096, embeddings without dictionary encoding): pyarrow's defaults (snappy,
    dictionary-encoded float16 vectors) cost about 1.4x as much on the same files, which would
    flatter every ratio."""
    scratch.mkdir(parents=True, exist_ok=True)

    def copy(i_f: tuple[int, str]) -> None:
        i, f = i_f
        table = pq.read_table(f)
        pq.write_table(table, scratch / f"{i:06d}.parquet", **parquet_write_options(table))

    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(copy, enumerate(files)))
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--payload-kb", type=int, default=50)
    ap.add_argument("--rows-per-shard", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--prune",
        action="store_true",
        help="delete each stage's shards once the stage after it ran (a big pool then fits)",
    )
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="warren-global-bench-"))
    pool, out = work / "pool", work / "out"
    t0 = time.perf_counter()
    make_pool(pool, args.rows, args.rows_per_shard, args.payload_kb, args.seed)
    print(f"pool: {args.rows:,} rows x {args.payload_kb} KB in {time.perf_counter() - t0:.1f} s")

    measured: list[dict] = []
    run_global = runner_module.EXECUTORS[GlobalStage]

    def measuring(runner, stage, loc, upstream):
        files = [f.path for f in upstream.kept]
        before, start = store_bytes(), time.perf_counter()
        result = run_global(runner, stage, loc, upstream)
        seconds = time.perf_counter() - start
        sizes, wide = column_sizes(files)
        measured.append(
            {
                "stage": stage,
                "rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
                "wide": wide,
                "narrow": narrow_bytes(stage, sizes),
                "floor": floor_seconds(files, work / "floor"),
                "seconds": seconds,
                "store": store_bytes() - before,
            }
        )
        if args.prune and upstream.index > 0:
            # The stage before is read by no one now: its shards go, so that a big pool fits.
            for f in files:
                os.remove(f)
        return result

    runner_module.EXECUTORS[GlobalStage] = measuring
    try:
        runner = Runner(
            Pipeline("global_bench", stages(args.rows)),
            str(pool),
            str(out),
            input_format="parquet",
            progress=False,
        )
        runner.run()
    finally:
        runner_module.EXECUTORS[GlobalStage] = run_global

    mib = 1 << 20
    print(
        f"\n{'stage':<14}{'rows':>9}{'wide MiB':>10}{'narrow MiB':>12}{'store MiB':>11}"
        f"{'store/wide':>11}{'seconds':>9}{'floor s':>9}{'ratio':>7}"
    )
    for m in measured:
        rows, wide, narrow, floor = m["rows"], m["wide"], m["narrow"], m["floor"]
        print(
            f"{m['stage'].name:<14}{rows:>9,}{wide / mib:>10.1f}{narrow / mib:>12.1f}"
            f"{m['store'] / mib:>11.1f}{m['store'] / max(wide, 1):>11.3f}"
            f"{m['seconds']:>9.1f}{floor:>9.1f}{m['seconds'] / max(floor, 1e-9):>7.2f}"
        )
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
