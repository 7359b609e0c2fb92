"""Clustering and near-duplicate removal at scale, against the matrix products they cannot avoid.

    python benchmarks/dedup.py --rows 1000000 --dim 768 --clusters 1000

Builds `rows` float16 unit embeddings around `clusters` centres with planted near-duplicate groups,
clusters them with the `cluster` stage's k-means (faiss, trained on `--train-rows`), then runs each
dedup rule cluster by cluster with the `semdedup` stage's functions (the code a Ray task runs per
cluster), single process. Prints seconds and peak RSS for each step, and the ratio of each rule's
time to its floor: the sum over clusters of n_c^2 * d multiply-adds at this machine's measured
float32 GEMM rate (both rules only need the lower triangle, so the floor counts n_c^2 / 2).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.cluster import train_kmeans  # noqa: E402
from stages.semdedup import components_cluster, semdedup_cluster  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gemm_rate(dim: int) -> float:
    """Multiply-adds per second of a float32 matrix product of the shape the dedup tiles use."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, dim), dtype=np.float32)
    b = rng.standard_normal((4096, dim), dtype=np.float32)
    a @ b.T
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b.T
    return reps * 4096 * 4096 * dim / (time.perf_counter() - t0)


def make_embeddings(rows: int, dim: int, clusters: int, dup_share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((rows, dim), dtype=np.float16)
    chunk = 50_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        lab = rng.integers(0, clusters, n)
        x = (
            centres[lab]
            + 0.9 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim) * 1.2
        )
        # planted near duplicates: a share of rows copy the row before them, plus a little noise
        dup = rng.random(n) < dup_share
        dup[0] = False
        src = np.flatnonzero(dup) - 1
        x[dup] = x[src] + 0.02 * rng.standard_normal((len(src), dim), dtype=np.float32) / np.sqrt(
            dim
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + n] = x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument(
        "--train-rows", type=int, default=0, help="k-means sample (default: 64 per cluster)"
    )
    ap.add_argument("--dup-share", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rate = gemm_rate(args.dim)
    print(f"float32 GEMM: {rate / 1e9:.1f} G multiply-adds/s")
    t0 = time.perf_counter()
    emb = make_embeddings(args.rows, args.dim, args.clusters, args.dup_share, args.seed)
    print(
        f"generated {args.rows:,} x {args.dim} float16 ({emb.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )
    base_rss = peak_rss_gib()

    train_rows = args.train_rows or 64 * args.clusters
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    sample = emb[np.sort(rng.choice(args.rows, min(train_rows, args.rows), replace=False))].astype(
        np.float32
    )
    centroids = train_kmeans(sample, args.clusters, niter=20, seed=0)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = np.empty(args.rows, dtype=np.int64)
    cos = np.empty(args.rows, dtype=np.float32)
    for start in range(0, args.rows, 65_536):
        x = emb[start : start + 65_536].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ centroids.T
        labels[start : start + len(x)] = s.argmax(axis=1)
        cos[start : start + len(x)] = s[np.arange(len(x)), labels[start : start + len(x)]]
    assign_s = time.perf_counter() - t0
    print(
        f"k-means: train on {len(sample):,} rows {train_s:.1f} s, assign all rows {assign_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB"
    )

    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(args.clusters + 1))
    sizes = np.diff(bounds)
    floor_macs = float((sizes.astype(np.float64) ** 2).sum()) * args.dim / 2
    floor_s = floor_macs / rate
    largest = int(sizes.max())
    print(
        f"clusters: largest {largest:,} rows, median {int(np.median(sizes)):,}; "
        f"GEMM floor (sum n_c^2 d / 2) {floor_s:.1f} s"
    )
    ids = np.array([f"{i:09d}" for i in range(args.rows)], dtype=object)

    for rule, fn, kw in (
        ("semdedup eps=0.07", semdedup_cluster, {"eps": 0.07}),
        ("components t=0.86", components_cluster, {"threshold": 0.86}),
    ):
        removed = 0
        t0 = time.perf_counter()
        for c in range(args.clusters):
            rows = order[bounds[c] : bounds[c + 1]]
            if not len(rows):
                continue
            decision = fn(
                emb[rows], cos[rows], ids[rows], cluster_id=c, block_size=args.block_size, **kw
            )
            removed += int(decision.removed.sum())
        secs = time.perf_counter() - t0
        print(
            f"{rule}: {secs:.1f} s, removed {removed:,} ({100 * removed / args.rows:.1f}%), "
            f"{secs / floor_s:.2f}x the GEMM floor, peak RSS {peak_rss_gib():.2f} GiB "
            f"(input alone {base_rss:.2f} GiB; largest cluster in float32 {largest * args.dim * 4 / 2**30:.2f} GiB)"
        )


if __name__ == "__main__":
    main()
