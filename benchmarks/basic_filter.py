"""Basic filter throughput: the whole `basic_filter` chain on the demo pool scaled up to 100k rows.

    python benchmarks/basic_filter.py --rows 100000

The pool: the 658 demo rows (pipelines/demo_data/demo.parquet) each copied about rows / 658 times,
every copy a new image, as web pools have many near copies of popular images: a random crop
(70-100% of each side), a horizontal flip half the time, a resize to 0.8-1.6 times, a JPEG
re-encode at quality 70-95, and the caption with one of a few suffixes ("", " photo", ...). So
the filters see as many distinct images and captions as rows, and the duplicate stages see real
near-duplicate groups. It is built once with all CPUs and cached under `--cache` (default
~/.cache/warren/bench), since generating it costs longer than some stages.

Printed: the chain's rows/s (rows / the sum of its stages' own seconds from their manifests, and
including the ingest copy), and each stage's seconds, share of the chain's time, rows/s of its
own input, and rows kept. The run uses the recipe's real thresholds except the image size floor,
which the demo images (about 160 px) would fail: `--min-side` (default 64) sets it.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from warren.pipelines.basic_filter import pipeline as basic_filter
from warren.pipelines.recipe import DEMO_DATA
from warren.pipelines.runner import Pipeline, Runner, ensure_ray
from warren.stages.schema import conform

SUFFIXES = ["", " photo", " image", ", high quality", " (illustration)"]
SHARD_ROWS = 5000


def _variant(args: tuple[bytes, int]) -> bytes | None:
    data, seed = args
    rng = np.random.default_rng(seed)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
    except Exception:  # the demo pool's planted broken images stay broken
        return data
    w, h = im.size
    cw, ch = max(8, int(w * rng.uniform(0.7, 1.0))), max(8, int(h * rng.uniform(0.7, 1.0)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.8, 1.6)
    im = im.resize((max(8, int(cw * scale)), max(8, int(ch * scale))))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.getvalue()


def build_pool(folder: Path, rows: int) -> None:
    demo = pq.read_table(DEMO_DATA, columns=["id", "images", "caption", "source"]).to_pylist()
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for start in range(0, rows, SHARD_ROWS):
            idx = range(start, min(rows, start + SHARD_ROWS))
            bases = [demo[i % len(demo)] for i in idx]
            jobs = [
                ((b["images"][0]["bytes"] if b["images"] else b""), i)
                for b, i in zip(bases, idx, strict=True)
            ]
            images = pool.map(_variant, jobs, chunksize=64)
            table = pa.table(
                {
                    "id": [f"{b['id']}-{i}" for b, i in zip(bases, idx, strict=True)],
                    "images": [[{"bytes": img, "path": None}] for img in images],
                    "caption": [
                        None if b["caption"] is None else b["caption"] + SUFFIXES[i % len(SUFFIXES)]
                        for b, i in zip(bases, idx, strict=True)
                    ],
                    "source": [b["source"] for b in bases],
                }
            )
            pq.write_table(conform(table), folder / f"part-{start // SHARD_ROWS:05d}.parquet")
    (folder / "_done").write_text(str(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "warren" / "bench"))
    args = parser.parse_args()
    pool = Path(args.cache) / f"basic_filter-{args.rows}"
    if not (pool / "_done").exists():
        shutil.rmtree(pool, ignore_errors=True)
        t = time.perf_counter()
        build_pool(pool, args.rows)
        print(f"built the pool ({args.rows:,} rows) in {time.perf_counter() - t:.0f} s: {pool}")
    recipe = basic_filter()
    stages = [
        type(s)(s.params, stage_name=s.name, min_width=args.min_side, min_height=args.min_side)
        if s.name == "image_filter"
        else s
        for s in recipe.stages
    ]
    out = Path(tempfile.mkdtemp(prefix="warren-bench-basic-"))
    try:
        ensure_ray(os.cpu_count())
        t = time.perf_counter()
        Runner(Pipeline("basic_filter", stages), str(pool), str(out), progress=False).run()
        wall = time.perf_counter() - t
        run = json.loads((out / "run.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steps = run["stages"]
    chain = [s for s in steps if s["name"] != "ingest"]
    chain_seconds = sum(s["seconds"] for s in chain)
    print(
        f"basic_filter on {args.rows:,} rows ({os.cpu_count()} CPUs): chain "
        f"{chain_seconds:.1f} s = {args.rows / chain_seconds:,.0f} rows/s; with the ingest copy "
        f"{chain_seconds + steps[0]['seconds']:.1f} s; wall {wall:.1f} s (Ray start included)"
    )
    print(f"  {'stage':<16} {'seconds':>8} {'share':>7} {'rows in':>9} {'rows/s':>9} {'kept':>9}")
    for s in steps:
        share = s["seconds"] / chain_seconds if s["name"] != "ingest" else float("nan")
        print(
            f"  {s['name']:<16} {s['seconds']:>8.1f} {100 * share:>6.1f}% {s['rows_in']:>9,} "
            f"{s['rows_in'] / max(s['seconds'], 1e-9):>9,.0f} {s['kept']:>9,}"
        )


if __name__ == "__main__":
    main()
