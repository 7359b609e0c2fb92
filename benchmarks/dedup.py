"""Clustering and near-duplicate removal at scale, against the matrix products they cannot avoid.

    python benchmarks/dedup.py --rows 1000000 --dim 768 --clusters 1000

Builds `rows` float16 unit embeddings around `clusters` centres with planted near-duplicate groups,
clusters them with the `cluster` stage's k-means (faiss, trained on `--train-rows`), then runs each
dedup rule cluster by cluster with the `semdedup` stage's functions (the code a Ray task runs per
cluster), single process. Prints seconds and peak RSS for each step, and the ratio of each rule's
time to two floors at this machine's measured float32 GEMM rate: the matrix products the issue
names (the sum over clusters of n_c^2 * d multiply-adds) and the stricter half of it that a
lower-triangle-only computation needs (n_c^2 * d / 2).

With `--ray`, the `semdedup` stage itself also runs on a local Ray over the same rows (cluster ids
and centroid cosines already assigned): groupby shuffle, per-cluster tasks and all, i.e. what a
pipeline pays.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from warren.stages.cluster import train_kmeans
from warren.stages.semdedup import components_cluster, semdedup_cluster


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
    ap.add_argument("--ray", action="store_true", help="also time the stage on a local Ray")
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
    floor_s = float((sizes.astype(np.float64) ** 2).sum()) * args.dim / rate
    half_s = floor_s / 2
    largest = int(sizes.max())
    print(
        f"clusters: largest {largest:,} rows, median {int(np.median(sizes)):,}; "
        f"GEMM floor (sum n_c^2 d) {floor_s:.1f} s, lower triangle only {half_s:.1f} s"
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
            f"{secs / floor_s:.2f}x the GEMM floor ({secs / half_s:.2f}x the lower-triangle floor), "
            f"peak RSS {peak_rss_gib():.2f} GiB "
            f"(input alone {base_rss:.2f} GiB; largest cluster in float32 {largest * args.dim * 4 / 2**30:.2f} GiB)"
        )

    if args.ray:
        run_through_ray(emb, labels, cos, ids, args, floor_s)


def run_through_ray(emb, labels, cos, ids, args, floor_s: float) -> None:
    """The semdedup stage on a local Ray: Arrow blocks in, groupby cluster, one task a cluster."""
    import pyarrow as pa
    import ray

    from warren.stages.base import GlobalContext
    from warren.stages.semdedup import SemDedup

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    blocks = []
    for start in range(0, args.rows, 50_000):
        e = emb[start : start + 50_000]
        flat = pa.array(e.reshape(-1), pa.float16())
        blocks.append(
            pa.table(
                {
                    "id": pa.array(ids[start : start + 50_000].tolist(), pa.string()),
                    "image_emb": pa.FixedSizeListArray.from_arrays(flat, args.dim),
                    "cluster_id": pa.array(labels[start : start + 50_000]),
                    "cos_to_centroid": pa.array(cos[start : start + 50_000]),
                }
            )
        )
    ds = ray.data.from_arrow(blocks).materialize()
    del blocks
    ctx = GlobalContext(
        num_rows=args.rows, num_shards=ds.num_blocks(), num_cpus=ray.cluster_resources()["CPU"]
    )
    for rule, kw in (("semdedup", {"eps": 0.07}), ("components", {"threshold": 0.86})):
        stage = SemDedup(rule=rule, block_size=args.block_size, **kw)
        t0 = time.perf_counter()
        removed = 0
        for b in (
            stage.run(ds, ctx)
            .select_columns(["_reject"])
            .iter_batches(batch_format="pyarrow", batch_size=None)
        ):
            removed += b.num_rows - b.column("_reject").null_count
        secs = time.perf_counter() - t0
        print(
            f"semdedup stage on Ray, rule {rule}: {secs:.1f} s, removed {removed:,}, "
            f"{secs / floor_s:.2f}x the GEMM floor (driver peak RSS {peak_rss_gib():.2f} GiB)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
