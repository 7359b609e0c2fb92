"""Near-duplicate decisions inside one cluster of embeddings, in plain numpy (usable, and tested,
without Ray): SemDeDup's rule (`semdedup_cluster`) and Bunny's connected components
(`components_cluster`); `stages.semdedup` is the stage that runs them on every cluster. The rules,
the order items are visited in and the memory bounds are described there.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import numpy as np

KEEP_CHOICES: dict[str, tuple[str, ...]] = {
    "semdedup": ("hard", "easy", "random"),
    "components": ("middle", "far", "near", "random", "first"),
}
#: Similarities closer than this are ties when naming the most similar earlier item.
TIE_TOL = 1e-5


class SemDedupDecision(NamedTuple):
    """Per item, in input order."""

    removed: np.ndarray  # bool
    max_cos_earlier: np.ndarray  # float32, NaN for the first item in processing order
    duplicate_of: np.ndarray  # int64 index of the most similar earlier item, -1 for the first


class ComponentDecision(NamedTuple):
    """Per item, in input order."""

    removed: np.ndarray  # bool
    kept: np.ndarray  # int64 index of the item kept in this item's component (itself if kept)
    component_size: np.ndarray  # int64


def similarity_tile(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between two blocks of unit rows: one float32 BLAS matmul."""
    return a @ b.T


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows as contiguous float32, renormalised (float16 storage leaves norms ~1e-3 off 1)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"semdedup: embeddings must be a 2-d array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def id_ranks(ids) -> np.ndarray:
    """Rank of each id in ascending string order (equal ids: by position)."""
    ids = np.asarray(ids, dtype=str)
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    return ranks


def random_keys(ids, seed: int, cluster_id: int) -> np.ndarray:
    """A seeded random rank per item that depends on (seed, cluster id, ids), not on row order."""
    entropy = [int(seed) % 2**64, int(cluster_id) % 2**64]
    perm = np.random.default_rng(np.random.SeedSequence(entropy)).permutation(len(ids))
    return perm[id_ranks(ids)]


def processing_order(
    cos_to_centroid: np.ndarray, ids, keep: str = "hard", seed: int = 0, cluster_id: int = 0
) -> np.ndarray:
    """SemDeDup's order: positions of the items, the ones to keep preferentially first.

    `hard`: ascending cos_to_centroid (farthest from the centroid first); `easy`: descending;
    ties by id. `random`: a seeded shuffle (see `random_keys`).
    """
    cos = np.asarray(cos_to_centroid, dtype=np.float64)
    if keep == "random":
        return np.argsort(random_keys(ids, seed, cluster_id), kind="stable")
    ranks = id_ranks(ids)
    if keep == "hard":
        return np.lexsort((ranks, cos))
    if keep == "easy":
        return np.lexsort((ranks, -cos))
    raise ValueError(f"semdedup: keep must be one of {KEEP_CHOICES['semdedup']}, got {keep!r}")


def max_cos_to_earlier(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row i of unit rows `x`: max over j < i of x_i . x_j, and the j it came from.

    Computed tile by tile over the lower triangle. Row 0 gets NaN and -1. Among earlier items whose
    similarity ties the best within TIE_TOL, the earliest is named.
    """
    n = len(x)
    best = np.full(n, -np.inf, dtype=np.float32)
    named = np.full(n, -1, dtype=np.int64)
    named_val = np.full(n, -np.inf, dtype=np.float32)
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        rows = slice(r0, r1)
        for c0 in range(0, r1 - 1, block_size):
            c1 = min(c0 + block_size, r1 - 1)
            sims = similarity_tile(x[rows], x[c0:c1])
            if c1 > r0:  # the tile crosses the diagonal: only j < i counts
                later = np.arange(c0, c1)[None, :] >= np.arange(r0, r1)[:, None]
                sims[later] = -np.inf
            tile_max = sims.max(axis=1)
            with np.errstate(invalid="ignore"):
                first = np.argmax(sims >= (tile_max - TIE_TOL)[:, None], axis=1) + c0
            np.maximum(best[rows], tile_max, out=best[rows])
            better = tile_max > named_val[rows] + TIE_TOL
            named[rows] = np.where(better, first, named[rows])
            named_val[rows] = np.where(better, tile_max, named_val[rows])
    best[named < 0] = np.nan
    return best, named


def semdedup_cluster(
    emb: np.ndarray,
    cos_to_centroid: np.ndarray,
    ids,
    *,
    eps: float = 0.07,
    keep: str = "hard",
    seed: int = 0,
    cluster_id: int = 0,
    block_size: int = 512,
) -> SemDedupDecision:
    """SemDeDup on one cluster: `emb` (n, d), `cos_to_centroid` (n,), `ids` (n,) in any order."""
    x = unit_rows(emb)
    n = len(x)
    order = processing_order(cos_to_centroid, ids, keep, seed, cluster_id)
    best, named = max_cos_to_earlier(x[order], block_size)
    max_cos = np.full(n, np.nan, dtype=np.float32)
    max_cos[order] = best
    duplicate_of = np.full(n, -1, dtype=np.int64)
    duplicate_of[order] = np.where(named >= 0, order[np.maximum(named, 0)], -1)
    with np.errstate(invalid="ignore"):
        removed = max_cos.astype(np.float64) > 1.0 - eps
    return SemDedupDecision(removed, max_cos, duplicate_of)


def _compress(parent: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def union_pairs(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of a[k] and b[k] for every k, in place, vectorised.

    `parent` must be fully compressed (every node points at its root, a root at itself) and is left
    so. Roots hook onto the smaller root, so a set's root is its smallest member.
    """
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            return
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        _compress(parent)


#: A bf16 tile's similarities of unit rows are within 0.0123 of the exact ones: each input rounded
#: to 8 significant bits moves a dot product by at most (2u + u^2) |x| |y| with u = 2^-8, the
#: float32 accumulation by d * 2^-24 (d <= 4096), and the bf16 result by u of its value. Pairs
#: the screen passes are decided exactly; the margin leaves room over that bound.
BF16_MARGIN = 0.02
#: Candidate pairs decided one by one (in float64) per tile; a tile with more is recomputed whole
#: in float64 (a cluster of near-identical items makes every pair a candidate).
PAIRS_ONE_BY_ONE = 2048


@functools.cache
def bf16_is_faster() -> bool:
    """Whether torch's bfloat16 matmul beats numpy's float32 on this CPU by 1.5x, timed once per
    process on a tile. CPUs with AVX512-BF16 or AMX run it several times faster; others emulate
    it, slower than float32. Both screens give the same links, so the choice changes only time."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    a = np.random.default_rng(0).standard_normal((512, 768), dtype=np.float32)
    b = torch.from_numpy(a).to(torch.bfloat16)

    def best(fn) -> float:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(lambda: b @ b.T) * 1.5 < best(lambda: a @ a.T)


def _above_exactly(x: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Which pairs (a[k], b[k]) of rows have a float64 dot product above `threshold`."""
    out = np.empty(len(a), dtype=bool)
    for lo in range(0, len(a), PAIRS_ONE_BY_ONE):
        xa = x[a[lo : lo + PAIRS_ONE_BY_ONE]].astype(np.float64)
        xb = x[b[lo : lo + PAIRS_ONE_BY_ONE]].astype(np.float64)
        out[lo : lo + PAIRS_ONE_BY_ONE] = np.einsum("ij,ij->i", xa, xb) > threshold
    return out


#: Rows per tile on a GPU, whatever `block_size` says: a 512-row tile is far too small to keep a GPU
#: busy, and a 4096^2 float32 tile is 64 MB of its memory.
GPU_BLOCK = 4096


def _float32_margin(dim: int) -> float:
    # Any order of summing d float32 products is within d * 2^-24 of the exact unit dot product
    # (Higham's gamma_d); doubled for margin.
    return 2.0 * dim * 2.0**-24


def linked_components(
    x: np.ndarray,
    threshold: float,
    block_size: int,
    screen: str | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Component label (its smallest member) of each unit row, linking pairs whose cosine (the
    float64 dot product of the float32 rows) is above `threshold`.

    Each lower-triangle tile is screened for candidate pairs, those within the screen's error
    bound of the threshold or above, and only the candidates are decided exactly. The screen is
    a bfloat16 matmul where this CPU runs it faster than float32 (`bf16_is_faster`; `screen`
    "bf16" or "float32" forces one). Every link is decided on its own pair's float64 cosine, so
    the links are the same with either screen and in any tiling, up to float64's rounding of a
    cosine (about 1e-16; a tile with many candidates is scored by one float64 matmul).

    With `device` (a torch device; by default "cuda" when this process sees a GPU and the cluster
    spans more than one tile) both the float32 screen and the float64 decisions run there
    (`linked_on_device`)."""
    from warren.stages.models import default_device

    n = len(x)
    if device is None and screen is None and n > block_size and default_device() == "cuda":
        device = "cuda"
    if device is not None:
        return linked_on_device(x, threshold, max(block_size, GPU_BLOCK), device)
    if screen is None:
        screen = "bf16" if n > block_size and bf16_is_faster() else "float32"
    if screen == "bf16":
        return _linked_with_torch(x, threshold, block_size, "cpu", bf16=True)
    parent = np.arange(n, dtype=np.int64)
    floor = threshold - _float32_margin(x.shape[1])
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        for c0 in range(0, r0 + 1, block_size):
            c1 = min(c0 + block_size, r1)
            near = similarity_tile(x[r0:r1], x[c0:c1]) > floor
            if c0 == r0:  # diagonal tile: each pair once, no self pairs
                near = np.tril(near, k=-1)
            i, j = np.nonzero(near)
            if not i.size:
                continue
            if i.size > PAIRS_ONE_BY_ONE:
                tile = x[r0:r1].astype(np.float64) @ x[c0:c1].astype(np.float64).T
                linked = tile[i, j] > threshold
            else:
                linked = _above_exactly(x, i + r0, j + c0, threshold)
            if linked.any():
                union_pairs(parent, i[linked] + r0, j[linked] + c0)
    return parent


def knn_linked(x: np.ndarray, threshold: float, k: int, chunk: int = 8192) -> np.ndarray:
    """Component label (its smallest member) of each unit row, linking each row to those of its
    `k` nearest neighbours (faiss, exact inner-product search) whose cosine, computed again in
    float64, is above `threshold`: Llama 3's copy-detection dedup, nearest-neighbour search and
    connected components. Memory: the rows, and n * (k + 1) neighbour ids."""
    import faiss

    n = len(x)
    parent = np.arange(n, dtype=np.int64)
    if n < 2:
        return parent
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x32.shape[1])
    index.add(x32)
    _, neighbours = index.search(x32, min(k + 1, n))  # + 1: a row is its own nearest
    a = np.repeat(np.arange(n, dtype=np.int64), neighbours.shape[1])
    b = neighbours.ravel().astype(np.int64)
    valid = (b >= 0) & (b != a)
    a, b = a[valid], b[valid]
    for lo in range(0, len(a), chunk):
        ca, cb = a[lo : lo + chunk], b[lo : lo + chunk]
        cos = np.einsum("ij,ij->i", x32[ca].astype(np.float64), x32[cb].astype(np.float64))
        linked = cos > threshold
        if linked.any():
            union_pairs(parent, ca[linked], cb[linked])
    return parent


def linked_on_device(x: np.ndarray, threshold: float, block_size: int, device: str) -> np.ndarray:
    """`linked_components` with torch on `device`: each tile screened in float32 (TF32 off, so the
    float32 error bound holds), its candidates decided on their float64 cosine on the device;
    only the linked pairs come back to the host for the union-find."""
    return _linked_with_torch(x, threshold, block_size, device, bf16=False)


def _linked_with_torch(
    x: np.ndarray, threshold: float, block_size: int, device: str, bf16: bool
) -> np.ndarray:
    """The tile loop in torch: screened in bfloat16 (`bf16`, BF16_MARGIN) or float32, candidates
    decided on their float64 cosine, one by one or, above PAIRS_ONE_BY_ONE, by the tile's
    float64 matmul. float32 rows convert to float64 exactly, so only the candidates' rows are
    converted."""
    import torch

    n = len(x)
    parent = np.arange(n, dtype=np.int64)
    if not n:
        return parent
    # TF32 rounds inputs to 10 bits: far outside the float32 bound the margin is made for.
    torch.backends.cuda.matmul.allow_tf32 = False
    x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    xs = x32.to(torch.bfloat16) if bf16 else x32
    floor = threshold - (BF16_MARGIN if bf16 else _float32_margin(x.shape[1]))
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        for c0 in range(0, r0 + 1, block_size):
            c1 = min(c0 + block_size, r1)
            near = xs[r0:r1] @ xs[c0:c1].T > floor
            if c0 == r0:  # diagonal tile: each pair once, no self pairs
                near = torch.tril(near, diagonal=-1)
            i, j = torch.nonzero(near, as_tuple=True)
            if not i.numel():
                continue
            if i.numel() > PAIRS_ONE_BY_ONE:
                tile = x32[r0:r1].double() @ x32[c0:c1].double().T
                linked = tile[i, j] > threshold
            else:
                linked = (x32[i + r0].double() * x32[j + c0].double()).sum(dim=1) > threshold
            if bool(linked.any()):
                a = (i[linked] + r0).cpu().numpy().astype(np.int64)
                b = (j[linked] + c0).cpu().numpy().astype(np.int64)
                union_pairs(parent, a, b)
    return parent


def components_cluster(
    emb: np.ndarray,
    cos_to_centroid: np.ndarray,
    ids,
    *,
    threshold: float = 0.86,
    keep: str = "middle",
    seed: int = 0,
    cluster_id: int = 0,
    block_size: int = 512,
    k: int = 0,
) -> ComponentDecision:
    """Bunny's rule on one cluster: one item kept per connected component of near duplicates.
    With `k` > 0 an item is linked only to those of its k nearest neighbours above the threshold
    (`knn_linked`), else to every item above it (`linked_components`)."""
    x = unit_rows(emb)
    n = len(x)
    labels = knn_linked(x, threshold, k) if k > 0 else linked_components(x, threshold, block_size)
    cos = np.asarray(cos_to_centroid, dtype=np.float64)
    if keep == "random":
        keys: tuple[np.ndarray, ...] = (random_keys(ids, seed, cluster_id),)
    elif keep in ("middle", "far"):
        keys = (id_ranks(ids), cos)
    elif keep == "near":
        keys = (id_ranks(ids), -cos)
    elif keep == "first":
        keys = (id_ranks(ids),)
    else:
        raise ValueError(
            f"semdedup: keep must be one of {KEEP_CHOICES['components']}, got {keep!r}"
        )
    order = np.lexsort((*keys, labels))  # grouped by component, each in keep order
    grouped = labels[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if n else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, n]).astype(np.int64)
    pick = starts + ((sizes - 1) // 2 if keep == "middle" else 0)
    member_of = np.repeat(np.arange(len(starts)), sizes)
    kept = np.empty(n, dtype=np.int64)
    kept[order] = order[pick][member_of]
    component_size = np.empty(n, dtype=np.int64)
    component_size[order] = sizes[member_of]
    return ComponentDecision(kept != np.arange(n), kept, component_size)
