"""Duplicate stages against brute force written here.

phash_dedup: a planted set of scikit-image photographs with resized (0.5x, 0.75x), JPEG re-encoded
(quality 60, 90) and brightened copies, plus unrelated generated images; the stage's groups must
equal the connected components of the all-pairs relation "Hamming distance of imagehash.phash <=
d", computed plainly below, for several d. Chains and huge buckets are planted as hashes.

exact_dedup: the same pixels in different encodings (PNG, lossless WebP, BMP, TIFF) are found by
key `pixels` and not by the file-byte key `image`; captions equal after normalisation are found by
key `caption`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import time

import imagehash
import numpy as np
import outputs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from warren.stages.base import GlobalContext
from warren.stages.exact_dedup import (
    CAPTION_HASH_COLUMN,
    IMAGE_HASH_COLUMN,
    KEY_COLUMN,
    PIXEL_HASH_COLUMN,
    ExactDedup,
    content_key,
    resolve_group,
    resolve_partition,
)
from warren.stages.phash_dedup import (
    DISTANCE_COLUMN,
    GROUP_SIZE_COLUMN,
    HASH_COLUMN,
    PhashDedup,
    PhashDedupParams,
    bands,
    bucket_edges,
    dedup_hashed,
    dedup_table,
    int64_to_hex,
    popcount,
)
from warren.stages.schema import REJECT_COLUMN, rows_to_table

COPIES = ("orig", "half", "three_quarter", "jpeg60", "jpeg90", "bright")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "horse", "clock", "text")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def noise_image(seed: int, size: int = 96) -> Image.Image:
    """An unrelated picture: coarse random blocks, so its DCT hash is its own."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


def copies(img: Image.Image) -> dict[str, bytes]:
    """The original and its near-exact copies, encoded."""
    w, h = img.size
    return {
        "orig": encode(img),
        "half": encode(img.resize((w // 2, h // 2), Image.LANCZOS)),
        "three_quarter": encode(img.resize((w * 3 // 4, h * 3 // 4), Image.LANCZOS)),
        "jpeg60": encode(img, "JPEG", quality=60),
        "jpeg90": encode(img, "JPEG", quality=90),
        "bright": encode(ImageEnhance.Brightness(img).enhance(1.1)),
    }


@pytest.fixture(scope="module")
def planted() -> list[dict]:
    rows = []
    for name in PHOTOS:
        for variant, data in copies(photo(name)).items():
            rows.append({"id": f"{name}-{variant}", "images": [{"bytes": data, "path": None}]})
    for seed in range(12):
        rows.append({"id": f"noise-{seed:02d}", "images": [{"bytes": encode(noise_image(seed))}]})
    rows.append({"id": "text-only", "caption": "no image here"})
    for r in rows:
        r.setdefault("caption", r["id"])
    return rows


# ---------------------------------------------------------------------------------------------
# brute force


def brute_hashes(rows: list[dict]) -> dict[str, imagehash.ImageHash]:
    return {
        r["id"]: imagehash.phash(Image.open(io.BytesIO(r["images"][0]["bytes"])))
        for r in rows
        if r.get("images")
    }


def brute_groups(hashes: dict[str, int | imagehash.ImageHash], d: int) -> set[frozenset[str]]:
    """Connected components of 'distance <= d' over all pairs, by depth-first search."""

    def dist(a, b) -> int:
        return (
            a - b if isinstance(a, imagehash.ImageHash) else bin((a ^ b) & (2**64 - 1)).count("1")
        )

    ids = sorted(hashes)
    neighbours: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in itertools.combinations(ids, 2):
        if dist(hashes[a], hashes[b]) <= d:
            neighbours[a].append(b)
            neighbours[b].append(a)
    seen: set[str] = set()
    groups = set()
    for start in ids:
        if start in seen:
            continue
        stack, group = [start], set()
        while stack:
            node = stack.pop()
            if node in group:
                continue
            group.add(node)
            stack.extend(neighbours[node])
        seen |= group
        groups.add(frozenset(group))
    return groups


def stage_groups(out: pa.Table) -> set[frozenset[str]]:
    """Groups as the stage reports them: every row joins the group of the row it was kept over."""
    by_kept: dict[str, set[str]] = {}
    reasons = (
        out.column(REJECT_COLUMN).to_pylist()
        if REJECT_COLUMN in out.column_names
        else [None] * out.num_rows
    )
    for rid, h, reason in zip(
        out.column("id").to_pylist(), out.column(HASH_COLUMN).to_pylist(), reasons, strict=True
    ):
        if h is None:
            continue
        kept = reason.split("(of ", 1)[1].split(",", 1)[0] if reason else rid
        by_kept.setdefault(kept, set()).add(rid)
    return {frozenset(g) for g in by_kept.values()}


# ---------------------------------------------------------------------------------------------
# phash_dedup on images


def test_planted_copies_are_within_four_bits_and_unrelated_images_far_apart(planted):
    hashes = brute_hashes(planted)
    for name in PHOTOS:
        for variant in ("half", "three_quarter", "jpeg60", "jpeg90", "bright"):
            assert hashes[f"{name}-{variant}"] - hashes[f"{name}-orig"] <= 4, (name, variant)
    # the default threshold finds exactly one group per photograph
    groups = brute_groups(hashes, 4)
    assert {g for g in groups if len(g) > 1} == {
        frozenset(f"{n}-{v}" for v in COPIES) for n in PHOTOS
    }


@pytest.mark.parametrize("max_distance", [0, 2, 4, 8, 14])
def test_groups_equal_brute_force_connected_components(planted, max_distance):
    table = rows_to_table(planted)
    out = dedup_table(table, PhashDedupParams(max_distance=max_distance))
    hashes = brute_hashes(planted)
    assert stage_groups(out) == brute_groups(hashes, max_distance)
    # the hash column is imagehash's own hash, as its hex string reads
    for rid, h in zip(
        out.column("id").to_pylist(), out.column(HASH_COLUMN).to_pylist(), strict=True
    ):
        assert (h is None) == (rid == "text-only")
        if h is not None:
            assert int64_to_hex(h) == str(hashes[rid])


def test_keep_largest_keeps_the_most_pixels_then_the_smallest_id_and_reasons_give_the_distance(
    planted,
):
    out = dedup_table(rows_to_table(planted), PhashDedupParams(max_distance=4, keep="largest"))
    hashes = brute_hashes(planted)
    pixels = {
        r["id"]: Image.open(io.BytesIO(r["images"][0]["bytes"])).size
        for r in planted
        if r.get("images")
    }
    rows = out.to_pylist()
    by_id = {r["id"]: r for r in rows}
    for group in brute_groups(hashes, 4):
        kept = min(group, key=lambda i: (-pixels[i][0] * pixels[i][1], i))
        assert by_id[kept][REJECT_COLUMN] is None
        for rid in group:
            d = hashes[rid] - hashes[kept]
            assert by_id[rid][GROUP_SIZE_COLUMN] == len(group)
            assert by_id[rid][DISTANCE_COLUMN] == d
            if rid != kept:
                assert by_id[rid][REJECT_COLUMN] == (
                    f"phash_dedup: near duplicate (of {kept}, distance {d})"
                )
    assert by_id["text-only"][REJECT_COLUMN] is None
    assert by_id["text-only"][HASH_COLUMN] is None and by_id["text-only"][GROUP_SIZE_COLUMN] is None
    # the downscaled copies never win: they have fewer pixels than their original
    assert all(by_id[f"{n}-half"][REJECT_COLUMN] for n in PHOTOS)


def test_keep_first_keeps_the_smallest_id(planted):
    out = dedup_table(rows_to_table(planted), PhashDedupParams(keep="first"))
    kept = {r["id"] for r in out.to_pylist() if r[REJECT_COLUMN] is None}
    for group in brute_groups(brute_hashes(planted), 4):
        assert min(group) in kept and not (set(group) - {min(group)}) & kept


def test_rows_that_cannot_be_hashed_pass_with_a_null_hash():
    good = encode(photo("camera"))
    rows = [
        {"id": "a", "images": [{"bytes": good}]},
        {"id": "b", "images": [{"bytes": b"not an image"}]},
        {"id": "c", "images": [{"bytes": None, "path": "c.jpg"}]},
        {"id": "d", "images": [{"bytes": good}, {"bytes": good}]},
        {"id": "e", "images": [{"bytes": good}]},
    ]
    out = dedup_table(rows_to_table(rows)).to_pylist()
    assert [r[HASH_COLUMN] is None for r in out] == [False, True, True, True, False]
    assert [r[REJECT_COLUMN] for r in out] == [
        None,
        None,
        None,
        None,
        "phash_dedup: near duplicate (of a, distance 0)",
    ]
    # multi_image='first' hashes the first image of a set
    first = dedup_table(rows_to_table(rows), PhashDedupParams(multi_image="first")).to_pylist()
    assert first[3][REJECT_COLUMN] == "phash_dedup: near duplicate (of a, distance 0)"


def test_other_hash_functions_agree_with_imagehash(planted):
    sample = planted[:12]
    for name, fn in (("dhash", imagehash.dhash), ("whash", imagehash.whash)):
        out = dedup_table(rows_to_table(sample), PhashDedupParams(hash=name, max_distance=3))
        hashes = {r["id"]: fn(Image.open(io.BytesIO(r["images"][0]["bytes"]))) for r in sample}
        assert stage_groups(out) == brute_groups(hashes, 3)


# ---------------------------------------------------------------------------------------------
# phash_dedup on planted hashes


def hashed_block(hashes: list[int], pixels: list[int] | None = None) -> pa.Table:
    n = len(hashes)
    signed = [h - 2**64 if h >= 2**63 else h for h in hashes]
    return pa.table(
        {
            "id": [f"h{i:05d}" for i in range(n)],
            HASH_COLUMN: pa.array(signed, pa.int64()),
            "_phash_pixels": pa.array(pixels or [100] * n, pa.int64()),
        }
    )


def test_a_chain_of_near_duplicates_is_one_group_even_when_its_ends_are_far_apart():
    a = 0x0123_4567_89AB_CDEF
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 40)  # 4 bits from b, 8 from a
    far = ~a & (2**64 - 1)
    out = dedup_hashed(hashed_block([a, b, c, far]), PhashDedupParams(max_distance=4)).to_pylist()
    assert [r[GROUP_SIZE_COLUMN] for r in out] == [3, 3, 3, 1]
    assert [r[REJECT_COLUMN] for r in out] == [
        None,
        "phash_dedup: near duplicate (of h00000, distance 4)",
        "phash_dedup: near duplicate (of h00000, distance 8)",
        None,
    ]


def test_copies_sharing_an_id_keep_exactly_one_row():
    block = hashed_block([5, 5, 5 ^ 0b11]).set_column(0, "id", pa.array(["x", "x", "w"]))
    out = dedup_hashed(block, PhashDedupParams(keep="first")).to_pylist()
    assert [r[REJECT_COLUMN] for r in out] == [
        "phash_dedup: near duplicate (of w, distance 2)",
        "phash_dedup: near duplicate (of w, distance 2)",
        None,
    ]
    out = dedup_hashed(block.set_column(0, "id", pa.array(["x", "x", "x"]))).to_pylist()
    assert sum(r[REJECT_COLUMN] is None for r in out) == 1


def test_random_hashes_with_planted_clusters_match_brute_force():
    rng = np.random.default_rng(7)
    hashes: list[int] = []
    for _ in range(60):
        base = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        hashes.append(base)
        for _ in range(int(rng.integers(0, 5))):
            flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
            hashes.append(base ^ sum(1 << int(f) for f in flips))
    block = hashed_block(hashes)
    ids = block.column("id").to_pylist()
    for d in (0, 1, 3, 5, 9):
        out = dedup_hashed(block, PhashDedupParams(max_distance=d, block_size=16))
        assert stage_groups(out) == brute_groups(dict(zip(ids, hashes, strict=True)), d), d


def test_a_huge_bucket_of_identical_hashes_is_one_group_without_pairwise_work():
    n = 30_000  # e.g. all-black images
    rows = np.arange(n, dtype=np.int64)
    same = np.zeros(n, dtype=np.uint64)
    spec = bands(64, 4)
    started = time.perf_counter()
    a, b, d = bucket_edges(same, rows, 0, spec, 4)
    assert len(a) == n - 1 and set(a.tolist()) == {0} and not d.any()
    # other bands of the same rows add nothing: the pair was already seen in band 0
    assert len(bucket_edges(same, rows, 3, spec, 4)[0]) == 0
    out = dedup_hashed(hashed_block([0] * n + [2**64 - 1]))
    assert time.perf_counter() - started < 20
    sizes = out.column(GROUP_SIZE_COLUMN).to_pylist()
    assert sizes[:n] == [n] * n and sizes[n] == 1
    assert out.column(REJECT_COLUMN).null_count == 2


def test_a_bucket_of_many_close_hashes_returns_a_spanning_forest_not_every_pair():
    # 600 distinct hashes, all within 2 bits of each other's neighbours and sharing band 0
    base = 0xFFFF_0000_0000_0000
    hashes = np.array([base | (1 << i) | (1 << (i + 1)) for i in range(0, 40)], dtype=np.uint64)
    hashes = np.unique(np.concatenate([hashes, hashes ^ np.uint64(1 << 45)]))
    rows = np.arange(len(hashes), dtype=np.int64)
    a, b, d = bucket_edges(hashes, rows, 0, bands(64, 4), 4, block_size=7)
    assert len(a) == len(hashes) - 1  # a tree over one component
    assert (popcount(hashes[a] ^ hashes[b]) == d).all() and (d <= 4).all()


def test_bands_cover_every_bit_once():
    for n_bits, d in ((64, 0), (64, 4), (64, 10), (16, 3)):
        spec = bands(n_bits, d)
        assert len(spec) == d + 1
        covered = sorted(bit for shift, width in spec for bit in range(shift, shift + width))
        assert covered == list(range(n_bits))


def test_bad_parameters_are_refused():
    for kw in (
        {"hash": "md5"},
        {"hash_size": 16},
        {"max_distance": 32},
        {"keep": "random"},
        {"multi_image": "all"},
        {"hash": "whash", "hash_size": 6},
    ):
        with pytest.raises(ValueError):
            PhashDedup(**kw)


# ---------------------------------------------------------------------------------------------
# on Ray: the stage's run and the runner


def test_ray_run_equals_brute_force_across_blocks(ray_session, planted):
    import ray

    table = rows_to_table(planted)
    blocks = [table.slice(i, 9) for i in range(0, table.num_rows, 9)]
    ctx = GlobalContext(num_rows=table.num_rows, num_shards=len(blocks), num_cpus=2)
    for d in (6,):
        out = PhashDedup(max_distance=d).run_rows(ray.data.from_arrow(blocks), ctx)
        got = pa.concat_tables(
            out.iter_batches(batch_size=None, batch_format="pyarrow"), promote_options="default"
        )
        assert sorted(got.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
        assert stage_groups(got) == brute_groups(brute_hashes(planted), d)
        assert "_phash_pixels" not in got.column_names


def test_a_runner_pipeline_of_pixel_and_phash_dedup_accounts_for_every_row(
    ray_session, planted, tmp_path
):
    from warren.pipelines.runner import Pipeline, Runner

    rows = [dict(r) for r in planted]
    # a lossless re-encode of an original: the same pixels, other bytes
    webp = encode(Image.open(io.BytesIO(rows[0]["images"][0]["bytes"])), "WEBP", lossless=True)
    rows.append({"id": "zz-webp", "caption": "x", "images": [{"bytes": webp}]})
    pool = tmp_path / "pool"
    pool.mkdir()
    table = rows_to_table(rows)
    pq.write_table(table.slice(0, 30), pool / "a.parquet")
    pq.write_table(table.slice(30), pool / "b.parquet")
    pipe = Pipeline("t", [ExactDedup(key="pixels"), PhashDedup()])
    reports = Runner(
        pipe, str(pool), str(tmp_path / "out"), input_format="parquet", progress=False
    ).run()
    for r in reports:
        assert r.rows_in == r.kept + r.rejected

    # brute force of stage 1: group by decoded RGB pixels and size, keep the smallest id
    def pixels_of(r: dict) -> bytes:
        img = Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB")
        return repr(img.size).encode() + img.tobytes()

    by_pixels: dict[bytes, list[str]] = {}
    for r in sorted(rows[:-2] + rows[-1:], key=lambda r: r["id"]):  # text-only row aside
        by_pixels.setdefault(pixels_of(r), []).append(r["id"])
    expected_exact = {
        i: f"exact_dedup: duplicate (pixels of {g[0]})" for g in by_pixels.values() for i in g[1:]
    }
    assert "zz-webp" in expected_exact  # the planted lossless copy is among them
    assert outputs.rejected_reasons(tmp_path / "out" / "01-exact_dedup") == expected_exact
    # brute force of stage 2 over the survivors of stage 1
    survivors = [r for r in planted if r["id"] not in expected_exact]
    kept = outputs.table(tmp_path / "out" / "02-phash_dedup").to_pylist()
    rejected = outputs.table(tmp_path / "out" / "02-phash_dedup", rejected=True).to_pylist()
    assert len(kept) + len(rejected) == len(survivors)
    pixels = {r["id"]: Image.open(io.BytesIO(r["images"][0]["bytes"])).size for r in planted[:-1]}
    assert {r["id"] for r in kept} == {
        min(g, key=lambda i: (-pixels[i][0] * pixels[i][1], i))
        for g in brute_groups(brute_hashes(survivors), 4)
    } | {"text-only"}
    assert all(r["reason"].startswith("phash_dedup: near duplicate (of ") for r in rejected)


# ---------------------------------------------------------------------------------------------
# exact_dedup: pixels and captions


@pytest.fixture(scope="module")
def encodings() -> dict[str, bytes]:
    img = photo("coffee").resize((120, 80))
    rgba = img.convert("RGBA")  # fully opaque: the same picture
    transparent = rgba.copy()
    transparent.putalpha(128)
    return {
        "png": encode(img),
        "webp": encode(img, "WEBP", lossless=True),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF"),
        "png_rgba": encode(rgba),
        "png_copy": encode(img),  # byte-identical to png
        "jpeg": encode(img, "JPEG", quality=95),  # lossy: other pixels
        "transparent": encode(transparent),
        "broken": b"\x89PNG not really",
        "broken_copy": b"\x89PNG not really",
        "broken_other": b"\x89PNG something else",
    }


def exact_groups(table: pa.Table, key: str, **kw) -> dict[str, str | None]:
    """id -> reason after running content_key + resolve_group by hand on one table."""
    keyed = content_key(table, key, **kw)
    out = []
    keys = keyed.column(KEY_COLUMN).to_pylist()
    for k in sorted(set(keys), key=lambda v: (v is None, v or "")):
        idx = [i for i, v in enumerate(keys) if v == k]
        out.append(resolve_group(keyed.take(idx), key))
    result = pa.concat_tables(out, promote_options="default")
    reasons = (
        result.column(REJECT_COLUMN).to_pylist()
        if REJECT_COLUMN in result.column_names
        else [None] * result.num_rows
    )
    return dict(zip(result.column("id").to_pylist(), reasons, strict=True))


def test_pixels_finds_lossless_re_encodes_that_the_byte_key_misses(encodings):
    table = rows_to_table(
        [
            {"id": name, "images": [{"bytes": data}], "caption": name}
            for name, data in encodings.items()
        ]
    )
    by_pixels = exact_groups(table, "pixels")
    kept = "bmp"  # smallest id of the pixel-identical group
    for name in ("png", "webp", "tiff", "png_rgba", "png_copy"):
        assert by_pixels[name] == f"exact_dedup: duplicate (pixels of {kept})"
    assert by_pixels[kept] is None
    assert by_pixels["jpeg"] is None and by_pixels["transparent"] is None
    # undecodable images fall back to their bytes: identical broken files are still one file
    assert by_pixels["broken_copy"] == "exact_dedup: duplicate (pixels of broken)"
    assert by_pixels["broken"] is None and by_pixels["broken_other"] is None

    by_bytes = exact_groups(table, "image")
    assert {i for i, r in by_bytes.items() if r} == {"png_copy", "broken_copy"}
    assert by_bytes["png_copy"] == "exact_dedup: duplicate (of png)"

    keyed = content_key(table, "pixels+caption").to_pylist()
    for r in keyed:
        assert r[PIXEL_HASH_COLUMN] and len(r[PIXEL_HASH_COLUMN]) == 64
        assert len(r[CAPTION_HASH_COLUMN]) == 64
    images = content_key(table, "image").to_pylist()
    assert all(
        r[IMAGE_HASH_COLUMN] == hashlib.sha256(encodings[r["id"]]).hexdigest() for r in images
    )
    # with different captions, the same pixels are no longer duplicates under pixels+caption
    assert not any(exact_groups(table, "pixels+caption").values())


def test_caption_key_normalises_case_and_whitespace_and_never_groups_empty_captions():
    captions = {
        "a": "A dog  on the grass",
        "b": "a dog on the grass ",
        "c": "a dog on the grass.",
        "d": "2 dogs",
        "e": "3 dogs",
        "f": "",
        "g": None,
        "h": "   ",
    }
    table = rows_to_table([{"id": i, "caption": c} for i, c in captions.items()])
    got = exact_groups(table, "caption")
    assert got == {
        "a": None,
        "b": "exact_dedup: duplicate (caption of a)",
        "c": None,
        "d": None,
        "e": None,
        "f": None,
        "g": None,
        "h": None,
    }
    assert not any(exact_groups(table, "caption", caption_norm="exact").values())
    hashes = content_key(table, "caption").column(CAPTION_HASH_COLUMN).to_pylist()
    assert hashes[5:] == [None, None, None]


def test_exact_dedup_pixels_through_ray_accounts_for_every_row(ray_session, encodings):
    import ray

    table = rows_to_table(
        [{"id": n, "images": [{"bytes": d}], "caption": "same"} for n, d in encodings.items()]
    )
    ctx = GlobalContext(num_rows=table.num_rows, num_shards=3, num_cpus=2)
    ds = ray.data.from_arrow([table.slice(0, 4), table.slice(4, 4), table.slice(8)])
    out = pa.concat_tables(
        ExactDedup(key="pixels")
        .run_rows(ds, ctx)
        .iter_batches(batch_size=None, batch_format="pyarrow")
    )
    assert out.num_rows == table.num_rows
    reasons = dict(
        zip(out.column("id").to_pylist(), out.column(REJECT_COLUMN).to_pylist(), strict=True)
    )
    assert sum(r is not None for r in reasons.values()) == 6
    assert KEY_COLUMN not in out.column_names and PIXEL_HASH_COLUMN in out.column_names


def test_resolving_a_whole_partition_equals_resolving_each_group():
    """The per-partition resolver (one call for many mostly single-row groups) decides exactly as
    the per-group rule: random keys with groups of 1-4 rows and null keys, in key order."""
    import numpy as np
    import pyarrow as pa

    from warren.stages.shuffle import group_bounds

    rng = np.random.default_rng(4)
    keys = [None if k < 0 else f"k{k:03d}" for k in rng.integers(-5, 60, 200).tolist()]
    ids = [f"r{i:03d}" for i in rng.permutation(200).tolist()]
    table = pa.table({"id": ids, KEY_COLUMN: pa.array(keys, pa.string())})
    table = table.take(pa.compute.sort_indices(table, sort_keys=[(KEY_COLUMN, "ascending")]))
    bounds = group_bounds(table.column(KEY_COLUMN))
    for key in ("image", "pixels"):
        whole = resolve_partition(table, bounds, key)
        groups = [resolve_group(table.slice(a, b - a), key) for a, b in bounds]
        each = pa.concat_tables(groups, promote_options="default")
        assert whole.column("id").to_pylist() == each.column("id").to_pylist()
        assert whole.column("_reject").to_pylist() == each.column("_reject").to_pylist()
        assert sum(r is not None for r in whole.column("_reject").to_pylist()) > 20
