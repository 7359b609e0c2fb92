"""phash_dedup: near-exact duplicate images (resized, re-encoded, slightly brightened copies) by a
perceptual hash and a Hamming-distance threshold, resolved over the whole dataset.

**Hash.** Each row's image is decoded by `stages.images.decode_image` (EXIF orientation applied,
transparency composited on white, first frame; an image whose shorter side is above
`HASH_DECODE_SIDE` is decoded at a reduced scale, never below it) and hashed by the `imagehash`
library (`hash`:
`phash`, the DCT hash, by default; `dhash`, `whash` or `average`), with `hash_size` 8, i.e. 64
bits. The hash is written to `phash` (int64): the bits of imagehash's hex string `str(h)` read as
an unsigned big-endian integer and stored in two's complement, so
`f"{v & (2**64 - 1):016x}" == str(h)` and `imagehash.hex_to_hash` gives the ImageHash back (smaller
`hash_size` values give hash_size^2 bits in the low bits). The column holds whichever `hash` was
chosen. Rows without an image, rows whose image has no bytes (stored by path) or cannot be decoded
(`image_check` rejects those), and, by default, rows with several images get a null `phash` and
pass untouched: an image SET is a near duplicate of another only if all of its images are, which a
single 64-bit hash cannot say (`multi_image="first"` hashes the first image instead).

**Distance.** Two rows are near duplicates when the Hamming distance of their hashes is at most
`max_distance`. The default, 4, is imagehash's own example cutoff (`hash0 - hash1 < 5` in its
README), the "5 or fewer of 64 bits" commonly given for pHash near duplicates; imagededup's
default of 10 aims at looser matches (crops), which pHash finds poorly anyway. Measured here on
scikit-image photographs: copies resized to 0.5x/0.75x, re-encoded as JPEG at quality 60-90 or
brightened by 10% are 0-2 bits from their original (a synthetic checkerboard up to 10), unrelated
photographs 20 bits or more apart; flat clip art is less separable (unrelated pairs at 0-6 bits
in the demo pool), so keep the threshold low for such data.

**Groups.** The groups are the connected components of the near-duplicate relation over the whole
dataset: a ~ b and b ~ c put a, b and c in one group even when a and c are farther apart than
`max_distance` (a chain of small edits is still one picture; the reason then states the larger
distance to the kept row). They are found without comparing all pairs and without holding the
dataset in one place, by multi-index hashing (Norouzi et al., "Fast search in Hamming space with
multi-index hashing", CVPR 2012): the n-bit hash is cut into m = `max_distance` + 1 contiguous
bands; two hashes within distance d differ in at most d bands, so by pigeonhole they agree exactly
on at least one. The passes:

1. hash: a map pass adds `phash` (blocks are then held in the object store, as for any shuffle);
2. bands: every hashed row emits m (band index, band value) bucket keys, and the buckets are
   spread over partitions by a mix of the key; `stages.shuffle.map_groups` brings each partition
   (whole buckets) to one task, which skips one-row buckets with numpy and, in each other bucket,
   compares the bucket's DISTINCT hashes (rows with identical hashes are joined to their first row
   without pairwise work) tile by tile (`block_size`^2 XOR + popcount at a time, so a huge bucket
   costs time, never memory beyond a tile), keeps the pairs within `max_distance` that agree on no
   earlier band (so each pair is considered in exactly one bucket) and returns only a spanning
   forest of them: at most (rows in the bucket - 1) edges, whatever the number of matching pairs;
3. the driver runs a union-find over the edges (at most m edges per row that has a near duplicate,
   none for the singletons, which are most rows), fetches id and size of those rows from their blocks, and picks one row to keep
   per group;
4. a map pass over the blocks marks the rows.

Cost: a bucket with k distinct hashes costs k^2 / 2 comparisons; with uniform hashes a bucket holds
about N / 2^(n / m) rows (13-bit bands at d = 4), so at billions of rows lower `max_distance`
(wider bands) or shard by another key first.

**Keep rule** (`keep`): `largest` keeps the row whose image has the most pixels (width x height at
full resolution), then the smallest id (the original over its downscaled copies); `first` keeps the
smallest id. Ties on id (rows sharing an id) are broken by position, so exactly one row survives.

**Columns and reasons.** Every row gets `phash` (int64), `phash_group_size` (int64: rows in its
group, 1 for a row without near duplicates) and `phash_distance` (int32: Hamming distance to the
row kept from its group, 0 for the kept row itself); the three are null for rows without a hash.
The others are rejected as `phash_dedup: near duplicate (of <kept id>, distance 3)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import GlobalContext, GlobalStage, param, put_columns, reject
from warren.stages.images import decode_image
from warren.stages.semdedup import union_pairs
from warren.stages.shuffle import map_groups

RULE = "phash_dedup"
HASH_COLUMN = "phash"
GROUP_SIZE_COLUMN = "phash_group_size"
DISTANCE_COLUMN = "phash_distance"
HASHES = ("phash", "dhash", "whash", "average")
KEEP = ("largest", "first")
MULTI_IMAGE = ("skip", "first")
#: The shorter side kept when a large image is decoded at a reduced scale: 16 times the 32 px
#: imagehash's pHash resizes to, so the hash sees the same picture.
HASH_DECODE_SIDE = 512
# Private columns, dropped before the stage returns.
_PIXELS = "_phash_pixels"
# A row's place in the hashed dataset: block index << 32 | row within the block.
_ROW_BITS = 32
_EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.int32())])
_BAND_SCHEMA = pa.schema(
    [("part", pa.int64()), ("key", pa.int64()), ("row", pa.int64()), ("hash", pa.int64())]
)


@dataclasses.dataclass(frozen=True)
class PhashDedupParams:
    hash: str = param(
        "phash",
        "imagehash function: 'phash' (DCT), 'dhash' (gradient), 'whash' (wavelet), 'average'",
    )
    hash_size: int = param(8, "hash side: hash_size^2 bits (8: 64 bits, the most an int64 holds)")
    max_distance: int = param(
        4, "near duplicates: Hamming distance <= this (imagehash's README cutoff, < 5 of 64 bits)"
    )
    keep: str = param(
        "largest",
        "row kept per group: 'largest' (most pixels, then smallest id) or 'first' (smallest id)",
    )
    multi_image: str = param(
        "skip",
        "rows with several images: 'skip' (null hash, never rejected) or 'first' (hash image 1)",
    )
    block_size: int = param(
        1024,
        "hashes per side of a comparison tile in a bucket (memory: about 16 * block_size^2 bytes)",
    )


# ---------------------------------------------------------------------------------------------
# hashes and bands: plain numpy, usable without Ray


def hash_function(name: str) -> Callable[..., Any]:
    import imagehash

    return {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "whash": imagehash.whash,
        "average": imagehash.average_hash,
    }[name]


def hash_to_int64(bits: np.ndarray) -> int:
    """imagehash's bit array as the signed int64 whose unsigned hex is `str(h)`."""
    value = 0
    for bit in np.asarray(bits, dtype=bool).ravel():
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def int64_to_hex(value: int, n_bits: int = 64) -> str:
    """The inverse of `hash_to_int64`, as imagehash writes it (`imagehash.hex_to_hash` reads it)."""
    return f"{value & ((1 << n_bits) - 1):0{-(-n_bits // 4)}x}"


def image_hash(data: bytes | None, name: str, hash_size: int) -> tuple[int | None, int]:
    """(hash as int64, width * height at full resolution) of one encoded image; (None, 0) when it
    cannot be decoded."""
    if not data:
        return None, 0
    try:
        img = decode_image(data, reduce_to=HASH_DECODE_SIDE)
        h = hash_function(name)(img, hash_size=hash_size)
        width, height = img.info["source_size"]
        return hash_to_int64(h.hash), width * height
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - untrusted bytes: a decoder failure means "no hash"
        return None, 0


def hash_batch(batch: pa.Table, name: str, hash_size: int, multi_image: str) -> pa.Table:
    """Add `phash` and the private pixel count used by keep='largest'."""
    hashes: list[int | None] = []
    pixels: list[int] = []
    for imgs in batch.column("images").to_pylist():
        if not imgs or (len(imgs) > 1 and multi_image == "skip"):
            h, px = None, 0
        else:
            h, px = image_hash(imgs[0].get("bytes") if imgs[0] else None, name, hash_size)
        hashes.append(h)
        pixels.append(px)
    return put_columns(
        batch,
        {
            HASH_COLUMN: pa.array(hashes, pa.int64()),
            _PIXELS: pa.array(pixels, pa.int64()),
        },
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
        ((np.uint64(b) << np.uint64(_ROW_BITS)) | band_value(hashes, band)).view(np.int64)
        for b, band in enumerate(spec)
    ]


def bucket_band(key: int, spec: list[tuple[int, int]]) -> int:
    return 0 if len(spec) == 1 else key >> _ROW_BITS


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


def _as_uint64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64).view(np.uint64)


def bucket_partition(
    table: pa.Table, spec: list[tuple[int, int]], max_distance: int, block_size: int
) -> pa.Table:
    """`bucket_edges` on every bucket of a partition of band rows (part, key, row, hash).

    Most buckets hold one row; they are skipped with numpy, so the Python work is proportional to
    the buckets that hold several rows, not to the rows.
    """
    if not table.num_rows:
        return _EDGE_SCHEMA.empty_table()
    table = table.take(pc.sort_indices(table, [("key", "ascending")]))
    keys = table.column("key").to_numpy()
    hashes = _as_uint64(table.column("hash"))
    rows = table.column("row").to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    stops = np.r_[starts[1:], len(keys)]
    outs = [_EDGE_SCHEMA.empty_table()]
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        if e - s < 2:
            continue
        a, b, d = bucket_edges(
            hashes[s:e], rows[s:e], bucket_band(int(keys[s]), spec), spec, max_distance, block_size
        )
        if len(a):
            outs.append(pa.table([a, b, d], schema=_EDGE_SCHEMA))
    return pa.concat_tables(outs)


def band_rows(
    block_index: int, block: pa.Table, spec: list[tuple[int, int]], parts: int = 1
) -> pa.Table:
    """The band rows of one hashed block: (partition, bucket key, row, hash) per band per hashed
    row. A partition holds whole buckets; it is the unit of the shuffle (see `PhashDedup.run`)."""
    hashes = block.column(HASH_COLUMN)
    valid = np.flatnonzero(pc.is_valid(hashes).to_numpy(zero_copy_only=False))
    if not valid.size:
        return _BAND_SCHEMA.empty_table()
    values = _as_uint64(hashes.take(pa.array(valid)))
    rows = (np.int64(block_index) << np.int64(_ROW_BITS)) | valid.astype(np.int64)
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
        schema=_BAND_SCHEMA,
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


def mark_block(block: pa.Table, decisions: pa.Table | None, rule: str = RULE) -> pa.Table:
    """Write the group columns and reject the rows not kept; `decisions` holds (offset, kept, ...)
    for this block's rows that have a near duplicate; `rule` names the stage in reasons."""
    n = block.num_rows
    has_hash = pc.is_valid(block.column(HASH_COLUMN)).to_numpy(zero_copy_only=False)
    size = np.ones(n, np.int64)
    distance = np.zeros(n, np.int32)
    reasons: list[str | None] = [None] * n
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
    mask = np.array([r is not None for r in reasons], dtype=bool)
    out = put_columns(
        block.drop_columns([_PIXELS]),
        {
            GROUP_SIZE_COLUMN: pa.array(size, pa.int64(), mask=~has_hash),
            DISTANCE_COLUMN: pa.array(distance, pa.int32(), mask=~has_hash),
        },
    )
    # Always written, even when nothing is rejected, so every block has the same schema.
    return reject(out, mask, reasons)


def _node_info(block_index: int, block: pa.Table, offsets: np.ndarray) -> pa.Table:
    """id, pixels and hash of the given rows of one block (the rows that have a near duplicate)."""
    take = pa.array(offsets)
    return pa.table(
        {
            "row": (np.int64(block_index) << np.int64(_ROW_BITS)) | offsets.astype(np.int64),
            "id": block.column("id").take(take),
            "pixels": block.column(_PIXELS).take(take),
            "hash": block.column(HASH_COLUMN).take(take),
        }
    )


def _decisions_by_block(groups: Groups) -> dict[int, pa.Table]:
    blocks = groups.rows >> _ROW_BITS
    offsets = groups.rows & ((1 << _ROW_BITS) - 1)
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


def _split_rows(rows: np.ndarray) -> dict[int, np.ndarray]:
    blocks = rows >> _ROW_BITS
    return {b: (rows[blocks == b] & ((1 << _ROW_BITS) - 1)) for b in np.unique(blocks).tolist()}


def _groups_from(edges: pa.Table, infos: list[pa.Table], keep: str) -> Groups | None:
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
        _as_uint64(info.column("hash")),
        keep,
    )


def dedup_hashed(block: pa.Table, params: PhashDedupParams | None = None) -> pa.Table:
    """The passes after hashing, in-process on one hashed block (`hash_batch`'s output): bands,
    buckets, groups, marks. Lets tests plant hashes (chains, huge buckets) directly."""
    p = params or PhashDedupParams()
    spec = bands(p.hash_size**2, p.max_distance)
    edges = bucket_partition(band_rows(0, block, spec), spec, p.max_distance, p.block_size)
    ends = np.unique(np.concatenate([edges["a"].to_numpy(), edges["b"].to_numpy()]))
    infos = [_node_info(0, block, o) for o in _split_rows(ends).values()]
    groups = _groups_from(edges, infos, p.keep)
    decisions = _decisions_by_block(groups).get(0) if groups else None
    return mark_block(block, decisions)


def dedup_table(table: pa.Table, params: PhashDedupParams | None = None) -> pa.Table:
    """The whole stage in-process on one table (tests, notebooks): the same passes, one block."""
    p = params or PhashDedupParams()
    return dedup_hashed(hash_batch(table, p.hash, p.hash_size, p.multi_image), p)


class PhashDedup(GlobalStage):
    """Near-exact duplicate images by perceptual hash; one row kept per connected group."""

    name = "phash_dedup"
    # 2: images decoded by stages.images (transparency composited, EXIF orientation applied).
    version = "2"
    Params = PhashDedupParams

    def check_params(self) -> None:
        p = self.params
        if p.hash not in HASHES:
            raise ValueError(f"{self.name}: hash must be one of {HASHES}, got {p.hash!r}")
        if not 2 <= p.hash_size <= 8:
            raise ValueError(
                f"{self.name}: hash_size must be 2..8 (hash_size^2 bits in an int64), "
                f"got {p.hash_size}"
            )
        if p.hash == "whash" and p.hash_size & (p.hash_size - 1):
            raise ValueError(
                f"{self.name}: whash needs a power-of-two hash_size, got {p.hash_size}"
            )
        n_bits = p.hash_size**2
        if not 0 <= p.max_distance < n_bits // 2:
            raise ValueError(
                f"{self.name}: max_distance must be 0..{n_bits // 2 - 1} for {n_bits}-bit hashes "
                f"(at half the bits unrelated images match), got {p.max_distance}"
            )
        if p.keep not in KEEP:
            raise ValueError(f"{self.name}: keep must be one of {KEEP}, got {p.keep!r}")
        if p.multi_image not in MULTI_IMAGE:
            raise ValueError(
                f"{self.name}: multi_image must be one of {MULTI_IMAGE}, got {p.multi_image!r}"
            )
        if p.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be >= 1, got {p.block_size}")

    def run(self, ds, ctx: GlobalContext):
        import ray

        p = self.params
        spec = bands(p.hash_size**2, p.max_distance)
        hashed = ds.map_batches(
            hash_batch, fn_args=(p.hash, p.hash_size, p.multi_image), batch_format="pyarrow"
        )
        # The hashed blocks stay in the object store; a block's index in this list is the high
        # half of its rows' numbers in every later pass.
        blocks = hashed.to_arrow_refs()
        if not blocks:
            return hashed
        # Grouping by partition rather than by bucket: each reduce task gets one partition of
        # whole buckets and skips its one-row buckets with numpy (`bucket_partition`).
        parts = ctx.partitions()
        band_task = ray.remote(band_rows)
        banded = ray.data.from_arrow_refs(
            [band_task.remote(i, ref, spec, parts) for i, ref in enumerate(blocks)]
        )
        edge_ds = map_groups(
            banded,
            "part",
            bucket_partition,
            fn_args=(spec, p.max_distance, p.block_size),
            num_partitions=parts,
            num_rows=ctx.num_rows * len(spec),
            num_cpus=ctx.num_cpus,
        )
        edges = pa.concat_tables(
            [_EDGE_SCHEMA.empty_table()]
            + [
                b.select(_EDGE_SCHEMA.names).cast(_EDGE_SCHEMA)
                for b in edge_ds.iter_batches(batch_size=None, batch_format="pyarrow")
            ]
        )
        groups = None
        if edges.num_rows:
            ends = np.unique(np.concatenate([edges["a"].to_numpy(), edges["b"].to_numpy()]))
            info_task = ray.remote(_node_info)
            infos = ray.get(
                [info_task.remote(b, blocks[b], o) for b, o in _split_rows(ends).items()]
            )
            groups = _groups_from(edges, infos, p.keep)
        decisions = _decisions_by_block(groups) if groups else {}
        mark = ray.remote(mark_block)
        return ray.data.from_arrow_refs(
            [mark.remote(ref, decisions.get(i), self.name) for i, ref in enumerate(blocks)]
        )


__all__ = [
    "PhashDedup",
    "PhashDedupParams",
    "bands",
    "bucket_edges",
    "bucket_partition",
    "choose_kept",
    "components",
    "dedup_hashed",
    "dedup_table",
    "hash_batch",
    "image_hash",
    "int64_to_hex",
    "popcount",
]
