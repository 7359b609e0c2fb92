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
The others are rejected as `phash_dedup: near duplicate (of <kept id>, distance 3)`, and get the
kept row's id in `duplicate_of` and 1 - distance / bits in `similarity` (null on other rows).
The grouping passes live in `stages.phash_groups`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from warren.stages.base import GlobalContext, GlobalStage, param, put_columns
from warren.stages.duplicates import PROVENANCE_COLUMNS
from warren.stages.images import decode_image
from warren.stages.phash_groups import (
    DISTANCE_COLUMN,
    EDGE_SCHEMA,
    GROUP_SIZE_COLUMN,
    HASH_COLUMN,
    PIXELS_COLUMN,
    band_rows,
    bands,
    bucket_edges,
    bucket_partition,
    choose_kept,
    components,
    decisions_by_block,
    groups_from,
    mark_block,
    node_info,
    popcount,
    split_rows,
)
from warren.stages.shuffle import map_groups

RULE = "phash_dedup"
HASHES = ("phash", "dhash", "whash", "average")
KEEP = ("largest", "first")
MULTI_IMAGE = ("skip", "first")
#: The shorter side kept when a large image is decoded at a reduced scale: 16 times the 32 px
#: imagehash's pHash resizes to, so the hash sees the same picture.
HASH_DECODE_SIDE = 512


@dataclasses.dataclass(frozen=True)
class PhashDedupParams:
    hash: str = param(
        "phash",
        "imagehash function: 'phash' (DCT), 'dhash' (gradient), 'whash' (wavelet), 'average'",
    )
    hash_size: int = param(8, "hash side: hash_size^2 bits (8: 64 bits, the most an int64 holds)")
    # the largest distance at which two rows are near duplicates: a bound on phash_distance (a
    # chain of near duplicates can put a removed row farther from the kept one)
    max_distance: int = param(
        4,
        "near duplicates: Hamming distance <= this (imagehash's README cutoff, < 5 of 64 bits)",
        threshold="max",
        column=DISTANCE_COLUMN,
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
            PIXELS_COLUMN: pa.array(pixels, pa.int64()),
        },
    )


def dedup_hashed(block: pa.Table, params: PhashDedupParams | None = None) -> pa.Table:
    """The passes after hashing, in-process on one hashed block (`hash_batch`'s output): bands,
    buckets, groups, marks. Lets tests plant hashes (chains, huge buckets) directly."""
    p = params or PhashDedupParams()
    spec = bands(p.hash_size**2, p.max_distance)
    edges = bucket_partition(band_rows(0, block, spec), spec, p.max_distance, p.block_size)
    ends = np.unique(np.concatenate([edges["a"].to_numpy(), edges["b"].to_numpy()]))
    infos = [node_info(0, block, o) for o in split_rows(ends).values()]
    groups = groups_from(edges, infos, p.keep)
    decisions = decisions_by_block(groups).get(0) if groups else None
    return mark_block(block, decisions, n_bits=p.hash_size**2)


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
    adds = (HASH_COLUMN, GROUP_SIZE_COLUMN, DISTANCE_COLUMN, *PROVENANCE_COLUMNS)

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

    # Each piece's images are decoded and hashed once; the grouping sees only the hashes.
    prepares = True

    def decision_columns(self) -> tuple[str, ...]:
        return ("images",)

    def prepare(self, table: pa.Table) -> pa.Table:
        p = self.params
        hashed = hash_batch(table, p.hash, p.hash_size, p.multi_image)
        return hashed.drop_columns(["images"]) if "images" in hashed.column_names else hashed

    def run(self, ds, ctx: GlobalContext):
        import ray

        p = self.params
        spec = bands(p.hash_size**2, p.max_distance)
        hashed = ds
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
            checkpoint=ctx.checkpoint,
        )
        edges = pa.concat_tables(
            [EDGE_SCHEMA.empty_table()]
            + [
                b.select(EDGE_SCHEMA.names).cast(EDGE_SCHEMA)
                for b in edge_ds.iter_batches(batch_size=None, batch_format="pyarrow")
            ]
        )
        groups = None
        if edges.num_rows:
            ends = np.unique(np.concatenate([edges["a"].to_numpy(), edges["b"].to_numpy()]))
            info_task = ray.remote(node_info)
            infos = ray.get(
                [info_task.remote(b, blocks[b], o) for b, o in split_rows(ends).items()]
            )
            groups = groups_from(edges, infos, p.keep)
        decisions = decisions_by_block(groups) if groups else {}
        mark = ray.remote(mark_block)
        return ray.data.from_arrow_refs(
            [
                mark.remote(ref, decisions.get(i), self.name, p.hash_size**2)
                for i, ref in enumerate(blocks)
            ]
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
