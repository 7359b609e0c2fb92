"""image_based: DataComp's image-based clustering filter.

DataComp (Gadre et al. 2023) keeps the pool samples whose image lies in a cluster that some image
of a reference set (ImageNet-1k's training images) falls into: k-means on the pool's image
embeddings, each reference embedding assigned to its nearest centroid, and the rows of the clusters
so chosen kept. Their best baseline intersects it with the CLIP-score top 30%.

The reference embeddings are read from Parquet (`reference`: a file, folder or URI) with an
embedding column (`reference_column`, `image_emb` by default) made by the same model as the pool's,
for instance the output of warren's `embed` stage run on an image folder (`--input-format
image_folder`). With no `reference` the stage is off: every row passes and `near_reference` is
true.

Every row gets `image_cluster` (its cluster, int64) and `near_reference` (bool). With
`reject=True` the rows of unchosen clusters are rejected as
`image_based: no reference image nearest (cluster 12)`; with `reject=False` they are only marked,
so that another filter can rank the whole pool first and `require` can apply the mark afterwards:
that is how `pipelines/datacomp_filter.py` computes DataComp's intersection exactly.

k-means is the one `stages.cluster` uses (faiss, spherical, seeded, trained on a sample of at most
`max_train_rows`; on a GPU when there is one). DataComp used 100,000 clusters; the count here is
capped at rows / 40 so that every centroid has data to be fitted on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from warren.stages.base import GlobalContext, GlobalStage, param, put_column, reject
from warren.stages.cluster import embeddings_of, fit_kmeans, nearest_centroids
from warren.stages.shards import Location

MIN_ROWS_PER_CLUSTER = 40


@dataclasses.dataclass(frozen=True)
class ImageBasedParams:
    reference: str = param(
        "",
        "Parquet file, folder or URI of reference embeddings, e.g. ImageNet-1k train images "
        "embedded with the same model (empty: the filter is off)",
    )
    reference_column: str = param("image_emb", "embedding column of the reference Parquet")
    column: str = param("image_emb", "pool embedding column to cluster")
    n_clusters: int = param(100_000, "k-means clusters (DataComp: 100,000), at most rows / 40")
    max_train_rows: int = param(1_000_000, "cap on the k-means training sample")
    niter: int = param(20, "k-means iterations")
    nredo: int = param(1, "k-means restarts; the one with the best objective is kept")
    seed: int = param(0, "seed of the sample and of k-means")
    reject: bool = param(
        True, "reject rows of unchosen clusters; false: only mark them in near_reference"
    )


def read_reference(uri: str, column: str) -> np.ndarray:
    """The reference embeddings as unit float32 rows; a clear error when there are none."""
    import pyarrow.dataset as pads

    try:
        loc = Location.of(uri)
        dataset = pads.dataset(loc.path, filesystem=loc.fs, format="parquet")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"image_based: cannot read reference {uri!r}: {exc}") from exc
    if column not in dataset.schema.names:
        raise ValueError(
            f"image_based: reference {uri!r} has no column {column!r} "
            f"(columns: {', '.join(dataset.schema.names)}); give --image_based.reference_column"
        )
    table = dataset.to_table(columns=[column])
    if not pa.types.is_fixed_size_list(table.schema.field(column).type):
        raise ValueError(
            f"image_based: reference column {column!r} has type "
            f"{table.schema.field(column).type}, expected a fixed-size list of floats"
        )
    emb, _ = embeddings_of(table, column)
    if not len(emb):
        raise ValueError(f"image_based: reference {uri!r} holds no {column!r} embeddings")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def chosen_clusters(centroids: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Sorted ids of the clusters that are some reference embedding's nearest centroid."""
    if reference.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"image_based: reference embeddings have {reference.shape[1]} dimensions, the pool's "
            f"{centroids.shape[1]}; embed both with the same model"
        )
    chosen = set()
    for start in range(0, len(reference), 8192):  # bounded memory for large reference sets
        chosen.update((reference[start : start + 8192] @ centroids.T).argmax(axis=1).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def mark(batch: pa.Table, params: ImageBasedParams, centroids, chosen) -> pa.Table:
    n = batch.num_rows
    cluster = np.full(n, -1, dtype=np.int64)
    near = np.ones(n, dtype=bool)
    valid = np.ones(n, dtype=bool)
    if centroids is not None:
        emb, valid = embeddings_of(batch, params.column)
        if len(emb):
            # The same cluster for a row in any batch (a float32 matmul is not batch-invariant).
            cluster[valid] = nearest_centroids(emb, centroids)[0]
        near = valid & np.isin(cluster, chosen)
    out = batch
    for name, arr in (
        ("image_cluster", pa.array(cluster, pa.int64(), mask=cluster < 0)),
        ("near_reference", pa.array(near, pa.bool_())),
    ):
        out = put_column(out, name, arr)
    out = reject(out, ~valid, "image_based: missing embedding")
    if params.reject:
        out = reject(
            out,
            valid & ~near,
            [f"image_based: no reference image nearest (cluster {c})" for c in cluster],
        )
    return out


class ImageBased(GlobalStage):
    """DataComp's image-based filter: keep clusters that reference images (ImageNet) fall into."""

    name = "image_based"
    version = "1"
    Params = ImageBasedParams
    adds = ("image_cluster", "near_reference")
    fits = True

    def required_columns(self) -> tuple[str, ...]:
        # Without a reference the stage is off and reads no embedding.
        return (self.params.column,) if self.params.reference else ()

    def check_params(self) -> None:
        p = self.params
        if min(p.n_clusters, p.max_train_rows, p.niter, p.nredo) < 1:
            raise ValueError(
                "image_based: n_clusters, max_train_rows, niter and nredo must be >= 1"
            )

    def fit(self, ds, ctx: GlobalContext) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(centroids, chosen cluster ids), or (None, None) when the filter is off."""
        p = self.params
        if not p.reference:
            return None, None
        reference = read_reference(p.reference, p.reference_column)
        k = max(1, min(p.n_clusters, ctx.num_rows // MIN_ROWS_PER_CLUSTER))
        centroids = fit_kmeans(ds, p.column, 1.0, p.seed, p.max_train_rows, k, p.niter, p.nredo)
        if centroids is None:  # no row has an embedding: mark rejects them all
            return np.zeros((1, reference.shape[1]), np.float32), np.zeros(0, np.int64)
        return centroids, chosen_clusters(centroids, reference)

    def transform(self, table: pa.Table, state: tuple, drop: bool = False) -> pa.Table:
        return mark(table, self.params, *state)
