"""phash_dedup's grouping: near-duplicate groups of perceptual hashes by multi-index hashing, one
kept row per group, and the marks on the rows (see `stages.phash_dedup` for the method and its
costs). Plain numpy and Arrow, usable without Ray: the stage runs these functions as Ray tasks.

A row's number in the hashed dataset is its block index << ROW_BITS | its row within the block.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import put_columns, reject
from warren.stages.cluster_dedup import union_pairs
from warren.stages.duplicates import put_duplicates

RULE = "phash_dedup"
HASH_COLUMN = "phash"
GROUP_SIZE_COLUMN = "phash_group_size"
DISTANCE_COLUMN = "phash_distance"
# A private column of the hashed blocks (width x height of the image at full resolution, for
# keep='largest'), dropped when the rows are marked.
PIXELS_COLUMN = "_phash_pixels"
ROW_BITS = 32
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.int32())])
BAND_SCHEMA = pa.schema(
    [("part", pa.int64()), ("key", pa.int64()), ("row", pa.int64()), ("hash", pa.int64())]
)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int32)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def bands(n_bits: int, max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` contiguous bands covering the n bits, widest first."""
    m = max_distance + 1
    widths = [n_bits // m + (1 if i < n_bits % m else 0) for i in range(m)]
    out, shift = [], n_bits
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


def band_value(hashes: np.ndarray, band: tuple[int, int]) -> np.ndarray:
    shift, width = band
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
    return (hashes >> np.uint64(shift)) & mask


def band_keys(hashes: np.ndarray, spec: list[tuple[int, int]]) -> list[np.ndarray]:
    """One int64 bucket key per band: band index in the high bits, the band's value below."""
    if len(spec) == 1:  # one band is the whole hash, which may use all 64 bits
        return [hashes.view(np.int64)]
    return [
        ((np.uint64(b) << np.uint64(ROW_BITS)) | band_value(hashes, band)).view(np.int64)
        for b, band in enumerate(spec)
    ]


def bucket_band(key: int, spec: list[tuple[int, int]]) -> int:
    return 0 if len(spec) == 1 else key >> ROW_BITS


class _Forest:
    """Union-find over a bucket's distinct hashes that records the edges that joined two sets."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def roots(self, idx: np.ndarray) -> np.ndarray:
        # Full compression before a vectorised look-up: a few passes of pointer jumping.
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent[:] = grand
        return parent[idx]


def bucket_edges(
    hashes: np.ndarray,
    rows: np.ndarray,
    band: int,
    spec: list[tuple[int, int]],
    max_distance: int,
    block_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spanning forest (a, b, distance) of the near-duplicate pairs of one bucket.

    `hashes` (uint64) and `rows` are the bucket's rows, all sharing band `band`'s value. Only pairs
    that agree on no earlier band are considered here (every other pair has an earlier bucket), so
    over all buckets each pair is considered once. Rows with identical hashes are joined to the
    first (smallest) row of that hash in band 0 only.
    """
    a_out: list[np.ndarray] = []
    b_out: list[np.ndarray] = []
    d_out: list[np.ndarray] = []
    order = np.lexsort((rows, hashes))
    hashes, rows = hashes[order], rows[order]
    distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rep = rows[first]  # each distinct hash's smallest row
    if band == 0:
        same = np.flatnonzero(rows != rep[inverse])
        a_out.append(rep[inverse[same]])
        b_out.append(rows[same])
        d_out.append(np.zeros(len(same), np.int32))
    k = len(distinct)
    forest = _Forest(k)
    earlier = spec[:band]
    for i0 in range(0, k, block_size):
        left = distinct[i0 : i0 + block_size]
        for j0 in range(i0, k, block_size):
            right = distinct[j0 : j0 + block_size]
            x = left[:, None] ^ right[None, :]
            near = popcount(x) <= max_distance
            if j0 == i0:
                near &= np.triu(np.ones(near.shape, dtype=bool), 1)
            for shift_width in earlier:
                near &= band_value(x, shift_width) != 0
            ia, ib = np.nonzero(near)
            if not ia.size:
                continue
            ia, ib = ia + i0, ib + j0
            ra, rb = forest.roots(ia), forest.roots(ib)
            apart = ra != rb
            for a, b in zip(ia[apart].tolist(), ib[apart].tolist(), strict=True):
                root_a, root_b = forest.find(a), forest.find(b)
                if root_a != root_b:
                    forest.parent[max(root_a, root_b)] = min(root_a, root_b)
                    a_out.append(np.array([rep[a]]))
                    b_out.append(np.array([rep[b]]))
                    d_out.append(popcount(np.array([distinct[a] ^ distinct[b]])))
    if not a_out:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
    return (
        np.concatenate(a_out).astype(np.int64),
        np.concatenate(b_out).astype(np.int64),
        np.concatenate(d_out).astype(np.int32),
    )


def as_uint64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64).view(np.uint64)


def bucket_partition(
    table: pa.Table, spec: list[tuple[int, int]], max_distance: int, block_size: int
) -> pa.Table:
    """`bucket_edges` on every bucket of a partition of band rows (part, key, row, hash).

    Most buckets hold one row; they are skipped with numpy, so the Python work is proportional to
    the buckets that hold several rows, not to the rows.
    """
    if not table.num_rows:
        return EDGE_SCHEMA.empty_table()
    table = table.take(pc.sort_indices(table, [("key", "ascending")]))
    keys = table.column("key").to_numpy()
    hashes = as_uint64(table.column("hash"))
    rows = table.column("row").to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    stops = np.r_[starts[1:], len(keys)]
    outs = [EDGE_SCHEMA.empty_table()]
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        if e - s < 2:
            continue
        a, b, d = bucket_edges(
            hashes[s:e], rows[s:e], bucket_band(int(keys[s]), spec), spec, max_distance, block_size
        )
        if len(a):
            outs.append(pa.table([a, b, d], schema=EDGE_SCHEMA))
    return pa.concat_tables(outs)


def band_rows(
    block_index: int, block: pa.Table, spec: list[tuple[int, int]], parts: int = 1
) -> pa.Table:
    """The band rows of one hashed block: (partition, bucket key, row, hash) per band per hashed
    row. A partition holds whole buckets; it is the unit of the shuffle (see `PhashDedup.run`)."""
    hashes = block.column(HASH_COLUMN)
    valid = np.flatnonzero(pc.is_valid(hashes).to_numpy(zero_copy_only=False))
    if not valid.size:
        return BAND_SCHEMA.empty_table()
    values = as_uint64(hashes.take(pa.array(valid)))
    rows = (np.int64(block_index) << np.int64(ROW_BITS)) | valid.astype(np.int64)
    keys = np.concatenate(band_keys(values, spec))
    m = len(spec)
    # Spread buckets over partitions by a mix of the key (band values alone are not uniform).
    mixed = (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    return pa.table(
        [
            (mixed % np.uint64(parts)).astype(np.int64),
            keys,
            np.tile(rows, m),
            np.tile(values.view(np.int64), m),
        ],
        schema=BAND_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# groups and decisions


@dataclasses.dataclass
class Groups:
    """Rows that have a near duplicate, with their group's kept row (arrays aligned by node)."""

    rows: np.ndarray  # int64, sorted
    kept: np.ndarray  # int64 row kept in the node's group
    kept_id: list[str]
    distance: np.ndarray  # int32 Hamming distance to the kept row
    size: np.ndarray  # int64 rows in the group


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root index per node) of the graph with edges a[k] - b[k]; nodes sorted."""
    nodes = np.unique(np.concatenate([a, b]))
    parent = np.arange(len(nodes), dtype=np.int64)
    union_pairs(parent, np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    return nodes, parent


def choose_kept(
    nodes: np.ndarray,
    root: np.ndarray,
    ids: list[str],
    pixels: np.ndarray,
    hashes: np.ndarray,
    keep: str,
) -> Groups:
    """One kept row per component by `keep`; ties end on the row number, so exactly one wins."""
    id_rank = np.empty(len(ids), np.int64)
    id_rank[np.argsort(np.asarray(ids, dtype=object), kind="stable")] = np.arange(len(ids))
    size_key = -pixels if keep == "largest" else np.zeros_like(pixels)
    order = np.lexsort((nodes, id_rank, size_key, root))
    first_of_root = np.ones(len(order), dtype=bool)
    first_of_root[1:] = root[order][1:] != root[order][:-1]
    winner_of_root = np.empty(len(nodes), np.int64)
    winner_of_root[root[order][first_of_root]] = order[first_of_root]
    winner = winner_of_root[root]
    size = np.bincount(root, minlength=len(nodes))[root]
    distance = popcount(hashes ^ hashes[winner])
    return Groups(nodes, nodes[winner], [ids[w] for w in winner], distance, size.astype(np.int64))


def mark_block(
    block: pa.Table, decisions: pa.Table | None, rule: str = RULE, n_bits: int = 64
) -> pa.Table:
    """Write the group columns and reject the rows not kept; `decisions` holds (offset, kept, ...)
    for this block's rows that have a near duplicate; `rule` names the stage in reasons. A removed
    row's `duplicate_of` is the kept row's id, its `similarity` 1 - distance / `n_bits` (the bits
    of a hash)."""
    n = block.num_rows
    has_hash = pc.is_valid(block.column(HASH_COLUMN)).to_numpy(zero_copy_only=False)
    size = np.ones(n, np.int64)
    distance = np.zeros(n, np.int32)
    reasons: list[str | None] = [None] * n
    dup_rows: list[int] = []
    dup_of: list[str] = []
    if decisions is not None and decisions.num_rows:
        at = decisions.column("offset").to_numpy()
        size[at] = decisions.column("size").to_numpy()
        distance[at] = decisions.column("distance").to_numpy()
        kept = decisions.column("kept").to_numpy()
        for i, is_kept, kid, d in zip(
            at.tolist(),
            kept.tolist(),
            decisions.column("kept_id").to_pylist(),
            distance[at].tolist(),
            strict=True,
        ):
            if not is_kept:
                reasons[i] = f"{rule}: near duplicate (of {kid}, distance {d})"
                dup_rows.append(i)
                dup_of.append(kid)
    mask = np.array([r is not None for r in reasons], dtype=bool)
    out = put_columns(
        block.drop_columns([PIXELS_COLUMN]),
        {
            GROUP_SIZE_COLUMN: pa.array(size, pa.int64(), mask=~has_hash),
            DISTANCE_COLUMN: pa.array(distance, pa.int32(), mask=~has_hash),
        },
    )
    similarity = 1.0 - distance[np.asarray(dup_rows, np.int64)] / n_bits
    out = put_duplicates(out, dup_rows, dup_of, similarity)
    # Always written, even when nothing is rejected, so every block has the same schema.
    return reject(out, mask, reasons)


def node_info(block_index: int, block: pa.Table, offsets: np.ndarray) -> pa.Table:
    """id, pixels and hash of the given rows of one block (the rows that have a near duplicate)."""
    take = pa.array(offsets)
    return pa.table(
        {
            "row": (np.int64(block_index) << np.int64(ROW_BITS)) | offsets.astype(np.int64),
            "id": block.column("id").take(take),
            "pixels": block.column(PIXELS_COLUMN).take(take),
            "hash": block.column(HASH_COLUMN).take(take),
        }
    )


def decisions_by_block(groups: Groups) -> dict[int, pa.Table]:
    blocks = groups.rows >> ROW_BITS
    offsets = groups.rows & ((1 << ROW_BITS) - 1)
    out = {}
    for b in np.unique(blocks).tolist():
        sel = np.flatnonzero(blocks == b)
        out[b] = pa.table(
            {
                "offset": offsets[sel],
                "kept": groups.rows[sel] == groups.kept[sel],
                "kept_id": pa.array([groups.kept_id[i] for i in sel.tolist()], pa.string()),
                "distance": groups.distance[sel],
                "size": groups.size[sel],
            }
        )
    return out


def split_rows(rows: np.ndarray) -> dict[int, np.ndarray]:
    blocks = rows >> ROW_BITS
    return {b: (rows[blocks == b] & ((1 << ROW_BITS) - 1)) for b in np.unique(blocks).tolist()}


def groups_from(edges: pa.Table, infos: list[pa.Table], keep: str) -> Groups | None:
    if not edges.num_rows:
        return None
    nodes, root = components(edges.column("a").to_numpy(), edges.column("b").to_numpy())
    info = pa.concat_tables(infos).sort_by("row")
    if not np.array_equal(info.column("row").to_numpy(), nodes):
        raise RuntimeError(f"{RULE}: the hashed blocks changed between passes")
    return choose_kept(
        nodes,
        root,
        info.column("id").to_pylist(),
        info.column("pixels").to_numpy(),
        as_uint64(info.column("hash")),
        keep,
    )
