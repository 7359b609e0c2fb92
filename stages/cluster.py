"""cluster: spherical k-means on an embedding column (faiss), then every row assigned to a centroid.

Two passes over the data, neither holding the dataset:

1. `fit`: a seeded sample (`sample_fraction` of the rows, at most `max_train_rows`) of the
   embeddings is gathered and k-means is trained on it in one Ray task (on a GPU when the cluster
   has one and faiss was built with CUDA: the `gpu` extra);
2. `transform`: each row is assigned to its most similar centroid (inner product of unit vectors),
   which writes `cluster_id` and `cos_to_centroid`. In the runner this happens as the rows are
   written (the stage `fits`), so the embeddings are read once to train and once to write.

The number of clusters defaults to rows / `rows_per_cluster` (Bunny: 100,000 clusters for 2B
images, about 20k a cluster), at least 1, at most the number of training rows. Rows without an
embedding are rejected (`cluster: missing embedding`), and so are rows of the clusters listed in
`exclude_clusters` (Bunny dropped one cluster of "no image" placeholders).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import GlobalContext, GlobalStage, param, put_column, reject

#: Rows x clusters similarities computed at once when assigning (float32: 4 bytes each).
ASSIGN_CELLS = 4_000_000


@dataclasses.dataclass(frozen=True)
class ClusterParams:
    column: str = param("image_emb", "embedding column to cluster (L2-normalised)")
    n_clusters: int = param(0, "number of clusters; 0: rows / rows_per_cluster, at least 1")
    rows_per_cluster: int = param(20_000, "rows per cluster when n_clusters is 0 (Bunny: ~20k)")
    sample_fraction: float = param(1.0, "share of rows k-means is trained on")
    max_train_rows: int = param(
        1_000_000, "cap on the training sample (gathered on the driver: rows x dim x 4 bytes)"
    )
    niter: int = param(20, "k-means iterations")
    nredo: int = param(1, "k-means restarts; the one with the best objective is kept")
    seed: int = param(0, "seed of the sample and of k-means")
    exclude_clusters: list = param(
        [], "cluster ids whose rows are rejected (e.g. a placeholder-image cluster)"
    )


#: Rows converted to float32 or float64 at once: a block's whole matrix in float64 is hundreds of
#: MB of fresh memory, which costs more to touch than to compute with on a small machine.
CHUNK_ROWS = 4096


def embeddings_of(
    table: pa.Table, column: str, dtype: type | None = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(matrix of the rows that have an embedding, boolean mask of those rows). The matrix is
    float32, or with `dtype` None in the column's own type (float16 stays float16)."""
    col = table.column(column).combine_chunks()
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    dim = col.type.list_size
    if not valid.any():
        return np.zeros((0, dim), dtype or np.float32), valid
    emb = _matrix(col if valid.all() else col.filter(pa.array(valid)))
    return (emb if dtype is None else emb.astype(dtype)), valid


def _sample_embeddings(batch: pa.Table, column: str, fraction: float, seed: int) -> pa.Table:
    """The rows of the sample with their ids, sample keys (a seeded hash of the id) and
    embeddings, in the column's own type (float16 stays float16: half the bytes to the driver)."""
    col = batch.column(column).combine_chunks()
    ids = batch.column("id").combine_chunks()
    if col.null_count:  # a filter copies its column: only when some row is left out
        has = pc.is_valid(col)
        col, ids = col.filter(has), ids.filter(has)
    keys = np.array([_unit_hash(i, seed) for i in ids.to_pylist()], dtype=np.float64)
    # Keyed by id, never by block or arrival: the same rows are drawn whatever Ray does.
    table = pa.table({"key": pa.array(keys, pa.float64()), "id": ids, "emb": col})
    keep = keys < fraction
    return table if keep.all() else table.filter(pa.array(keep))


def _unit_hash(text: str, seed: int) -> float:
    import hashlib

    h = hashlib.blake2b(f"{seed}\x1f{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def _key_order(tables: list[pa.Table], n: int) -> np.ndarray:
    """Row numbers (over `tables` in turn) of the `n` rows with the smallest (key, id)."""
    keys = pa.concat_tables([t.select(["key", "id"]) for t in tables])
    order = pc.sort_indices(keys, sort_keys=[("key", "ascending"), ("id", "ascending")])
    return order.to_numpy().astype(np.int64)[:n]


def _rows_in_order(tables: list[pa.Table], order: np.ndarray, dtype: type | None) -> np.ndarray:
    """The embeddings of rows `order` (row numbers over `tables` in turn) as one matrix in that
    order, in `dtype` (None: the column's own type). Filled table by table, so no concatenated
    copy of the tables is made on the way (a sample is up to millions of rows)."""
    starts = np.cumsum([0] + [t.num_rows for t in tables])
    block = np.searchsorted(starts, order, side="right") - 1
    by_block = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[by_block], np.arange(len(tables) + 1))
    first = _matrix(tables[0].column("emb"))
    out = np.empty((len(order), first.shape[1]), dtype or first.dtype)
    for b, t in enumerate(tables):
        at = by_block[bounds[b] : bounds[b + 1]]
        if len(at):
            out[at] = _matrix(t.column("emb"))[order[at] - starts[b]]
    return out


def _smallest_keys(tables: list[pa.Table], n: int) -> pa.Table:
    """The `n` rows of `tables` with the smallest (key, id), in that order, as one table."""
    order = _key_order(tables, n)
    emb = _rows_in_order(tables, order, None)
    ids = pa.concat_tables([t.select(["key", "id"]) for t in tables]).take(pa.array(order))
    flat = pa.array(emb.reshape(-1))
    return ids.append_column("emb", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))


def _matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column without nulls as a (rows, dim) matrix in its own float type."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    values = col.values.slice(col.offset * col.type.list_size, len(col) * col.type.list_size)
    return values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def sample_tables(ds, column: str, fraction: float, seed: int, max_rows: int) -> list[pa.Table]:
    """The blocks of a seeded sample of a column's embeddings (`key`, `id`, `emb`), on the driver
    as Ray hands them over; at most about 2 x `max_rows` rows are held, the rows with the
    smallest keys.

    The sample depends on the ids only: a row is drawn when a seeded hash of its id (its key) is
    below `fraction`, and beyond `max_rows` the rows with the smallest (key, id) are kept, which
    neither block order nor block boundaries change. Embeddings keep the column's own type
    (float16 stays float16: half the bytes of float32)."""
    sample = ds.select_columns(["id", column]).map_batches(
        _sample_embeddings, fn_args=(column, fraction, seed), batch_format="pyarrow"
    )
    tables: list[pa.Table] = []
    rows = 0
    for batch in sample.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not batch.num_rows:
            continue
        tables.append(batch)
        rows += batch.num_rows
        if rows > 2 * max_rows:  # keep the driver near max_rows rows, sorting seldom
            tables = [_smallest_keys(tables, max_rows)]
            rows = tables[0].num_rows
    return tables


def gather_sample(ds, column: str, fraction: float, seed: int, max_rows: int) -> np.ndarray:
    """The sample of `sample_tables` as one matrix on the driver, rows in (key, id) order (k-means
    sums its points in that order), in the column's own float type."""
    tables = sample_tables(ds, column, fraction, seed, max_rows)
    if not tables:
        return np.zeros((0, 0), np.float32)
    return _rows_in_order(tables, _key_order(tables, max_rows), None)


def fit_kmeans(
    ds,
    column: str,
    fraction: float,
    seed: int,
    max_rows: int,
    k: int,
    niter: int,
    nredo: int = 1,
) -> np.ndarray | None:
    """Centroids of k-means on the sample of `sample_tables` (None when no row has an embedding),
    trained in one Ray task, given a GPU when the cluster has one.

    The driver finds the sample's row order from its keys and hands the task the blocks as they
    came; the task builds the float32 training matrix in that order in one pass, so the sample is
    neither concatenated nor converted on the driver."""
    import ray

    tables = sample_tables(ds, column, fraction, seed, max_rows)
    if not tables:
        return None
    order = _key_order(tables, max_rows)
    embs = [t.select(["emb"]) for t in tables]
    if ray.cluster_resources().get("GPU", 0) >= 1:
        gpus, cpus = 1, 1
    else:
        # The task runs alone (the sample is gathered): all of one node's CPUs are its to use.
        gpus = 0
        cpus = max(
            [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")], default=1
        )
    task = ray.remote(num_gpus=gpus, num_cpus=max(1, cpus))(_train_on_blocks)
    return ray.get(task.remote(order, k, niter, seed, nredo, max(1, cpus), *embs))


def _train_on_blocks(
    order: np.ndarray, k: int, niter: int, seed: int, nredo: int, threads: int, *tables: pa.Table
) -> np.ndarray:
    import faiss

    # Ray starts workers with OMP_NUM_THREADS=1, and faiss's OpenMP keeps that whatever CPUs a
    # task is given: k-means would run on one core of the node.
    faiss.omp_set_num_threads(threads)
    return train_kmeans(_rows_in_order(list(tables), order, np.float32), k, niter, seed, nredo)


def train_kmeans(sample: np.ndarray, k: int, niter: int, seed: int, nredo: int = 1) -> np.ndarray:
    """Spherical k-means centroids (unit vectors), on the GPU when faiss can use one; with
    `nredo` > 1 the best of that many seeded restarts (Lloyd's iterations from a random start can
    merge two true clusters and split a third)."""
    import faiss

    # float16 samples convert here, in the task, rather than on the driver before the put.
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    k = max(1, min(k, len(sample)))
    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        verbose=False,
    )
    # faiss warns and subsamples above 256 points per centroid; we sampled on purpose already.
    km.cp.max_points_per_centroid = max(256, -(-len(sample) // k))
    km.train(sample)
    centroids = km.centroids.astype(np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids


#: On a GPU, similarities per chunk (rows x clusters float32: 1 GiB), and at most this many rows
#: (their float64 copy on the host: 400 MB at 768-d).
GPU_ASSIGN_CELLS = 1 << 28
GPU_CHUNK_ROWS = 65_536
#: Fewer centroids than this are scored on the CPU even where a GPU is at hand: the copy to the
#: device costs more than the matmul.
GPU_MIN_CENTROIDS = 256


def nearest_centroids(
    emb: np.ndarray, centroids: np.ndarray, device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each row's most similar centroid: the float64 answer, the same for a row
    in any batch, at float32's cost.

    A float32 matmul rounds a row's dot products differently depending on the other rows of the
    batch (BLAS blocking), so a near tie between two centroids could go either way with Ray's
    block boundaries. So the similarities are computed in float32 (half of float64's cost on a
    CPU, and what decides the cost of a pool's assignment at 100k clusters), and each row whose
    runner-up lies within twice float32's worst rounding error of its best is decided again in
    float64. Elsewhere the float32 winner is the float64 one. The cosine to the chosen centroid is
    computed in float64 for every row, one row at a time. `emb` may be float16: each value
    converts exactly. Rows go in chunks, to bound the rows x clusters matrix and the copies.

    With `device` (a torch device; by default "cuda" when this process sees a GPU and there are
    at least GPU_MIN_CENTROIDS centroids) the float32 similarities, their best and the count of
    near ties are computed there; only the rows with a near tie bring their similarities back to
    be decided in float64, so the answer is the same."""
    if device is None and len(centroids) >= GPU_MIN_CENTROIDS and len(emb):
        from warren.stages.models import default_device

        device = "cuda" if default_device() == "cuda" else None
    c32 = np.ascontiguousarray(centroids, dtype=np.float32)
    c64 = c32.astype(np.float64)
    # Any order of summing d products in float32 is within d * 2^-24 * sum|x_i c_i| <= d * 2^-24
    # * |x| * |c| of the exact dot product (Higham's gamma_d); doubled for margin.
    tol = 2.0 * c32.shape[1] * 2.0**-24 * float(np.linalg.norm(c64, axis=1).max(initial=0.0))
    best = np.empty(len(emb), dtype=np.int64)
    cos = np.empty(len(emb), dtype=np.float32)
    if device is not None:
        scorer = _DeviceScorer.of(centroids, c32, device)
        step = max(1, min(GPU_CHUNK_ROWS, GPU_ASSIGN_CELLS // max(1, len(c32))))
    else:
        step = max(1, min(CHUNK_ROWS, ASSIGN_CELLS // max(1, len(c32))))
    for lo in range(0, len(emb), step):
        x = emb[lo : lo + step]
        x64 = x.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
        if device is not None:
            b = scorer.best(x, x64, c64, 2 * tol * norms)
        else:
            sims = x.astype(np.float32) @ c32.T  # not normalised: the winner is the same
            b = sims.argmax(axis=1)
            if len(c32) > 1:
                _rescore_close(b, sims, x64, c64, 2 * tol * norms)
        best[lo : lo + step] = b
        cos[lo : lo + step] = np.einsum("ij,ij->i", x64, c64[b]) / np.maximum(norms, 1e-12)
    return best, cos


class _DeviceScorer:
    """The float32 part of `nearest_centroids` with torch on a device: the centroids go there once
    per centroid array (an apply task calls once per piece with the same state: 100k centroids
    are 300 MB to copy), each chunk's similarities stay there, and only rows with a near tie come
    back."""

    #: The last scorer made, with the centroid array it was made for (kept, so its id stays its).
    _last: tuple[np.ndarray, str, _DeviceScorer] | None = None

    @classmethod
    def of(cls, centroids: np.ndarray, c32: np.ndarray, device: str) -> _DeviceScorer:
        last = cls._last
        if last is not None and last[0] is centroids and last[1] == device:
            return last[2]
        scorer = cls(c32, device)
        cls._last = (centroids, device, scorer)
        return scorer

    def __init__(self, c32: np.ndarray, device: str) -> None:
        import torch

        # TF32 rounds inputs to 10 bits, far outside the float32 bound `tol` is made for.
        torch.backends.cuda.matmul.allow_tf32 = False
        self.torch = torch
        self.device = device
        self.c = torch.from_numpy(c32).to(device)

    def best(self, x: np.ndarray, x64: np.ndarray, c64: np.ndarray, margin: np.ndarray):
        torch = self.torch
        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        sims = xs @ self.c.T
        top, b = sims.max(dim=1)
        # The rows `_rescore_close` would find close, and maybe a few more (it decides again on
        # the host, exactly): the float32 cut is lowered by 1% of the margin, far more than the
        # cut's own rounding (2^-24 of the top value, against a margin of ~2^-13 of it).
        m = torch.from_numpy(1.01 * margin).to(self.device, torch.float64)
        cut = (top.double() - m).float()
        close = (sims >= cut[:, None]).sum(dim=1) > 1
        best = b.cpu().numpy().astype(np.int64)
        rows = torch.nonzero(close).flatten()
        if rows.numel() and len(c64) > 1:
            r = rows.cpu().numpy()
            sub = best[r]
            _rescore_close(sub, sims[rows].cpu().numpy(), x64[r], c64, margin[r])
            best[r] = sub
        return best


#: A row with more centroids than this within float32's error of its best (a zero vector, or
#: centroids that coincide) is re-scored against all of them in one float64 matmul.
MANY_CLOSE = 64


def _rescore_close(
    best: np.ndarray, sims: np.ndarray, x64: np.ndarray, c64: np.ndarray, margin: np.ndarray
) -> None:
    """Decide again in float64 each row of `best` (float32 winners of `sims`) that has another
    centroid within `margin` of its best: only those centroids are scored, one pair at a time
    (the same value in any batch); ties go to the lowest index, as argmax gives them."""
    top = sims[np.arange(len(best)), best].astype(np.float64)
    near = sims >= (top - margin)[:, None]
    counts = near.sum(axis=1)
    many = np.flatnonzero(counts > MANY_CLOSE)
    if len(many):
        best[many] = (x64[many] @ c64.T).argmax(axis=1)
    few = np.flatnonzero((counts > 1) & (counts <= MANY_CLOSE))
    if not len(few):
        return
    rows, cols = np.nonzero(near[few])
    vals = np.einsum("ij,ij->i", x64[few][rows], c64[cols])
    order = np.lexsort((cols, -vals, rows))  # by row, then the largest value, then the lowest id
    rows, cols = rows[order], cols[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    best[few[rows[first]]] = cols[first]


def assign(
    batch: pa.Table, column: str, centroids: np.ndarray, exclude: list, drop: bool = False
) -> pa.Table:
    """Nearest centroid by cosine for every row; rows without an embedding are rejected. With
    `drop` the embedding column is left out of the result (`GlobalContext.decisions_only`)."""
    emb, valid = embeddings_of(batch, column, dtype=None)
    n = batch.num_rows
    ids = np.full(n, -1, dtype=np.int64)
    cos = np.full(n, np.nan, dtype=np.float32)
    if len(emb):
        best, best_cos = nearest_centroids(emb, centroids)
        ids[valid] = best
        cos[valid] = best_cos
    out = batch
    for name, arr in (
        ("cluster_id", pa.array(ids, pa.int64(), mask=~valid)),
        ("cos_to_centroid", pa.array(cos, pa.float32(), mask=~valid)),
    ):
        out = put_column(out, name, arr)
    out = reject(out, ~valid, "cluster: missing embedding")
    if exclude:
        excluded = valid & np.isin(ids, np.asarray(exclude, dtype=np.int64))
        out = reject(out, excluded, [f"cluster: excluded cluster ({c})" for c in ids])
    return out.drop_columns([column]) if drop else out


class Cluster(GlobalStage):
    """Spherical k-means (faiss) on an embedding column; writes cluster_id and cos_to_centroid."""

    name = "cluster"
    version = "2"
    Params = ClusterParams
    adds = ("cluster_id", "cos_to_centroid")
    fits = True
    # At 100k centroids (a 2B pool) the assignment is the pool's largest arithmetic.
    transform_uses_gpu = True

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def check_params(self) -> None:
        p = self.params
        if p.n_clusters < 0 or min(p.rows_per_cluster, p.max_train_rows, p.niter, p.nredo) < 1:
            raise ValueError(
                "cluster: n_clusters >= 0, rows_per_cluster, max_train_rows, niter and nredo >= 1"
            )
        if not 0.0 < p.sample_fraction <= 1.0:
            raise ValueError(f"cluster: sample_fraction must be in (0, 1], got {p.sample_fraction}")

    def n_clusters_for(self, num_rows: int) -> int:
        if self.params.n_clusters:
            return self.params.n_clusters
        return max(1, num_rows // self.params.rows_per_cluster)

    def fit(self, ds, ctx: GlobalContext) -> np.ndarray:
        """The unit centroids (one zero row when no row has an embedding: all are rejected)."""
        p = self.params
        centroids = fit_kmeans(
            ds,
            p.column,
            p.sample_fraction,
            p.seed,
            p.max_train_rows,
            self.n_clusters_for(ctx.num_rows),
            p.niter,
            p.nredo,
        )
        if centroids is None:
            return np.zeros((1, ds.schema().field(p.column).type.list_size), np.float32)
        return centroids

    def transform(self, table: pa.Table, state: np.ndarray, drop: bool = False) -> pa.Table:
        return assign(table, self.params.column, state, list(self.params.exclude_clusters), drop)
