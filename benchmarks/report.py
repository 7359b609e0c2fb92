"""The run report on a big output: time, HTML size and peak memory of `warren report`.

    python benchmarks/report.py --rows 1000000 [--keep DIR]

Synthesises a run output folder in the runner's layout (run.json, NN-stage folders with kept and
rejected shards and manifests) with `rows` rows through five stages that leave score columns and
rejections behind, like a Bunny-style run: image_filter (width, height, aspect_ratio; two
thresholds), cluster (cluster_id, cos_to_centroid), semdedup (component_size; duplicates naming the
kept row in `duplicate_of`, with their `similarity`), clip_score (a 40-60% rank window) and a
centroid rank window (both writing `<column>_rank`); every manifest records its thresholds as the
runner does. Every 300th row carries a
small JPEG (a few thousand images in all); embeddings are left out, since the report never reads
them (it reads only the columns it needs). Then runs `warren report` on it in a subprocess and
prints seconds, HTML size and the subprocess's peak RSS. The issue's bar: under 60 s and 20 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.stages.base import reason_key
from warren.stages.schema import IMAGE_TYPE, rank_column

ROOT = Path(__file__).resolve().parents[1]

ROWS_PER_FILE = 65_536
IMAGE_EVERY = 300  # --image-every 1 gives every row an image (the HTML size of a real run)


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.repeat(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 8, axis=0).repeat(8, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _write(folder: Path, table: pa.Table, prefix: str = "part") -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        piece = table.slice(start, ROWS_PER_FILE)
        name = f"{prefix}-{i:05d}.parquet"
        # The runner's own shard settings (stages.shards.write_table_atomic).
        pq.write_table(piece, folder / name, compression="zstd", row_group_size=4096)
        files.append(
            {"name": name, "rows": piece.num_rows, "bytes": (folder / name).stat().st_size}
        )
    return files


def _stage(
    out: Path,
    index: int,
    name: str,
    params: dict,
    table: pa.Table,
    reject_mask: np.ndarray,
    reasons: list[str],
    seconds: float,
    thresholds: list[dict],
) -> tuple[pa.Table, dict]:
    """Write one stage folder; return its kept rows (the next stage's input) and run.json entry.
    `thresholds` is what the runner records from Stage.thresholds()."""
    folder = out / f"{index:02d}-{name}"
    kept = table.filter(pa.array(~reject_mask))
    rejected = table.filter(pa.array(reject_mask)).append_column(
        "reason", pa.array(reasons, pa.string())
    )
    files = _write(folder, kept)
    rejected_files = _write(folder / "rejected", rejected) if rejected.num_rows else []
    counts: dict[str, int] = {}
    for r in reasons:
        counts[reason_key(r)] = counts.get(reason_key(r), 0) + 1
    manifest = {
        "stage": name,
        "folder": folder.name,
        "version": "1",
        "kind": "global",
        "params": params,
        "thresholds": thresholds,
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "rejected": rejected.num_rows,
        "reasons": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "files": files,
        "rejected_files": rejected_files,
        "seconds": seconds,
        "status": "computed",
        "completed_at": "2026-01-01T00:00:00+00:00",
        "schema": str(table.schema),
    }
    (folder / "_manifest.json").write_text(json.dumps(manifest, indent=2))
    entry = {k: manifest[k] for k in ("folder", "status", "rows_in", "kept", "rejected", "reasons")}
    entry.update(name=name, seconds=seconds, kept_share=kept.num_rows / max(1, table.num_rows))
    return kept, entry


def _threshold(param: str, kind: str, column: str, value: float, descending: bool = True) -> dict:
    return {
        "param": param,
        "kind": kind,
        "column": column,
        "value": value,
        "descending": descending,
    }


def _window(column: str, lo: float, hi: float) -> list[dict]:
    """A descending rank window's recorded thresholds."""
    return [_threshold("lo", "rank_lo", column, lo), _threshold("hi", "rank_hi", column, hi)]


def _window_mask(
    values: np.ndarray, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rejected mask, descending rank share, rank) of a rank window, highest first."""
    order = np.argsort(-values, kind="stable")
    position = np.empty(len(values), np.int64)
    position[order] = np.arange(len(values))
    rank = position / len(values)
    return (rank < lo) | (rank >= hi), rank, position


def synthesise(out: Path, rows: int, seed: int = 0, image_every: int = IMAGE_EVERY) -> None:
    rng = np.random.default_rng(seed)
    ids = np.array([f"row-{i:08d}" for i in range(rows)], dtype=object)
    images: list = [None] * rows
    for i in range(0, rows, image_every):
        images[i] = [{"bytes": _jpeg(i), "path": None}]
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "images": pa.array(images, pa.list_(IMAGE_TYPE)),
            "caption": pa.array([f"a synthetic caption number {i}" for i in range(rows)]),
            "source": pa.array(np.where(rng.random(rows) < 0.7, "laion", "cc3m"), pa.string()),
        }
    )
    stages = []
    table, entry = _stage(
        out, 0, "ingest", {"format": "parquet"}, table, np.zeros(rows, bool), [], 30.0, []
    )
    stages.append(entry)

    n = table.num_rows
    width = rng.integers(32, 2048, n).astype(np.int32)
    height = rng.integers(32, 2048, n).astype(np.int32)
    aspect = np.maximum(width / height, height / width).astype(np.float32)
    table = table.append_column("width", pa.array(width)).append_column("height", pa.array(height))
    table = table.append_column("aspect_ratio", pa.array(aspect))
    small = (width < 200) | (height < 200)
    wide = ~small & (aspect > 3.0)
    reasons = [
        f"image_filter: too small ({w}x{h})" if s else f"image_filter: aspect ratio ({a:.2f})"
        for w, h, a, s in zip(
            width[small | wide],
            height[small | wide],
            aspect[small | wide],
            small[small | wide],
            strict=True,
        )
    ]
    params = {"min_width": 200, "min_height": 200, "max_aspect_ratio": 3.0, "max_width": 0}
    thresholds = [
        _threshold("min_width", "min", "width", 200),
        _threshold("min_height", "min", "height", 200),
        _threshold("max_aspect_ratio", "max", "aspect_ratio", 3.0),
    ]  # max_width 0 is off: not recorded
    table, entry = _stage(
        out, 1, "image_filter", params, table, small | wide, reasons, 120.0, thresholds
    )
    stages.append(entry)

    n = table.num_rows
    clusters = rng.zipf(1.3, n) % 1000
    cos = np.clip(rng.normal(0.3, 0.15, n), -1, 1).astype(np.float32)
    table = table.append_column("cluster_id", pa.array(clusters.astype(np.int64)))
    table = table.append_column("cos_to_centroid", pa.array(cos))
    table, entry = _stage(
        out, 2, "cluster", {"n_clusters": 1000}, table, np.zeros(n, bool), [], 300.0, []
    )
    stages.append(entry)

    n = table.num_rows
    dup = rng.random(n) < 0.1
    kept_idx = np.flatnonzero(~dup)
    of = rng.choice(kept_idx, dup.sum())
    size = np.ones(n, np.int64)
    np.add.at(size, of, 1)
    size[np.flatnonzero(dup)] = size[of]
    ids_here = np.asarray(table.column("id").to_pylist(), dtype=object)
    cos_dup = rng.uniform(0.86, 1.0, len(of))
    reasons = [
        f"semdedup: duplicate (of {ids_here[k]}, cos {c:.3f}, component of {s})"
        for k, c, s in zip(of, cos_dup, size[of], strict=True)
    ]
    duplicate_of = np.full(n, None, dtype=object)
    duplicate_of[dup] = ids_here[of]
    similarity = np.full(n, np.nan, np.float32)
    similarity[dup] = cos_dup
    table = table.append_column("component_size", pa.array(size))
    table = table.append_column("duplicate_of", pa.array(duplicate_of, pa.string()))
    table = table.append_column("similarity", pa.array(similarity, from_pandas=True))
    params = {"rule": "components", "threshold": 0.86, "eps": 0.07, "keep": "middle"}
    thresholds = [_threshold("eps", "max", "max_cos_earlier", 0.93)]  # a rule="earlier" line
    table, entry = _stage(out, 3, "semdedup", params, table, dup, reasons, 600.0, thresholds)
    stages.append(entry)

    n = table.num_rows
    score = np.clip(rng.normal(0.3, 0.05, n), -1, 1).astype(np.float32)
    mask, rank, position = _window_mask(score, 0.4, 0.6)
    reasons = [
        f"clip_score: {'above' if r < 0.4 else 'below'} window 40-60% (rank {100 * r:.1f}%, "
        f"clip_score {s:.4f})"
        for r, s in zip(rank[mask], score[mask], strict=True)
    ]
    table = table.append_column("clip_score", pa.array(score))
    table = table.append_column(rank_column("clip_score"), pa.array(position))
    params = {"threshold": -1.0, "lo": 0.4, "hi": 0.6, "image_column": "image_emb"}
    window = _window("clip_score", 0.4, 0.6)
    table, entry = _stage(out, 4, "clip_score", params, table, mask, reasons, 200.0, window)
    stages.append(entry)

    cos = table.column("cos_to_centroid").to_numpy()
    mask, rank, position = _window_mask(cos, 0.15, 0.35)
    reasons = [
        f"centroid_window: {'above' if r < 0.15 else 'below'} window 15-35% by cos_to_centroid"
        for r in rank[mask]
    ]
    table = table.append_column(rank_column("cos_to_centroid"), pa.array(position))
    params = {"column": "cos_to_centroid", "lo": 0.15, "hi": 0.35, "descending": True}
    window = _window("cos_to_centroid", 0.15, 0.35)
    table, entry = _stage(out, 5, "centroid_window", params, table, mask, reasons, 100.0, window)
    stages.append(entry)

    run = {
        "pipeline": "synthetic_bunny",
        "input": {"format": "parquet", "uri": "synthetic"},
        "output": str(out),
        "finished_at": "2026-01-01T00:00:00+00:00",
        "seconds": 1350.0,
        "stages": stages,
        "final": {"folder": stages[-1]["folder"], "rows": stages[-1]["kept"]},
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--image-every", type=int, default=IMAGE_EVERY, help="one row in N carries a JPEG"
    )
    parser.add_argument("--keep", help="build the output here and keep it (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="warren-report-bench-"))
    try:
        if not (out / "run.json").exists():
            t0 = time.perf_counter()
            synthesise(out, args.rows, image_every=args.image_every)
            print(f"synthesised {args.rows:,} rows in {time.perf_counter() - t0:.1f} s: {out}")
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "warren.pipelines.cli", "report", str(out)], check=True
        )
        seconds = time.perf_counter() - t0
        size = (out / "report.html").stat().st_size
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
        print(
            f"warren report: {seconds:.1f} s, HTML {size / 2**20:.2f} MiB, peak RSS {peak:.0f} MiB"
        )
        ok = seconds < 60 and size < 20 * 2**20
        print("within the issue's bar (< 60 s, < 20 MB)" if ok else "OVER the issue's bar")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
