"""The bundled demo pool (pipelines/demo_data/demo.parquet) keeps the promises of its builder
(tools/demo_data/build_demo_data.py, a build tool outside the installed package).

Fast: reads the committed file (a few MB) with pyarrow and PIL; no Ray.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from warren.stages.schema import CORE_FIELDS, validate

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "pipelines" / "demo_data"
DEMO = DEMO_DIR / "demo.parquet"
TOOLS_DIR = ROOT / "tools" / "demo_data"
PIL_DEFAULT_LIMIT = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "warren_build_demo_data", TOOLS_DIR / "build_demo_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


builder = _load_builder()


def test_builder_writes_the_packaged_pool_by_default():
    # The tool moved out of the package; what it writes by default is still the file the
    # recipes read (warren.pipelines' package data).
    assert builder.DEFAULT_OUT == DEMO


@pytest.mark.parametrize("tool", ["build_demo_data.py", "train_demo_clip.py"])
def test_build_tools_run_as_scripts_from_another_directory(tool, tmp_path):
    # No sys.path edits: warren imports as installed, and train_demo_clip finds the builder
    # next to it because Python puts a script's own folder on sys.path.
    res = subprocess.run(
        [sys.executable, str(TOOLS_DIR / tool), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "--out" in res.stdout


@pytest.fixture(scope="module")
def table():
    return pq.read_table(DEMO)


@pytest.fixture(scope="module")
def rows(table):
    return table.to_pylist()


@pytest.fixture(scope="module")
def meta(table):
    return json.loads(table.schema.metadata[builder.METADATA_KEY])


@pytest.fixture(scope="module")
def by_id(rows):
    return {r["id"]: r for r in rows}


def _bytes(row) -> bytes:
    assert len(row["images"]) == 1
    return row["images"][0]["bytes"]


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_file_is_small_and_canonical(table):
    size = DEMO.stat().st_size
    assert size < 8 * 1024 * 1024, f"demo.parquet is {size / 1e6:.1f} MB"
    validate(table, "demo.parquet")
    names = table.column_names
    assert names[: len(CORE_FIELDS)] == [f.name for f in CORE_FIELDS]
    for extra in ("planted", "original_caption"):
        assert str(table.schema.field(extra).type) == "string"
    assert pq.ParquetFile(DEMO).metadata.row_group(0).column(0).compression == "ZSTD"


def test_ids_unique_strings(rows):
    ids = [r["id"] for r in rows]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == len(ids)


def test_sources_and_licenses(rows, meta):
    sources = Counter(r["source"] for r in rows)
    assert dict(sources) == meta["rows_by_source"]
    assert sources["skimage"] >= 10
    ordinary_clipart = [r for r in rows if r["source"] == "openclipart" and r["planted"] is None]
    assert len(ordinary_clipart) >= meta["n_clipart"] - 2 * builder.N_SWAP_PAIRS - 5
    for r in rows:
        assert r["license"], r["id"]
        if r["source"] == "openclipart":
            assert r["license"] == builder.OPENCLIPART_LICENSE
            assert r["url"] is None


def test_planted_counts_match_builder(rows, meta):
    counts = Counter(builder.planted_kind(r["planted"]) for r in rows if r["planted"])
    assert dict(counts) == builder.PLANTED_COUNTS
    assert meta["planted_counts"] == builder.PLANTED_COUNTS
    kinds = {k.split(":")[0] for k in counts}
    assert kinds == {"near_dup", "exact_dup", "swapped_caption", "broken", "bad_caption"}


def test_ordinary_rows_have_real_captions(rows):
    for r in rows:
        if r["planted"] is None or not r["planted"].startswith("bad_caption"):
            assert r["caption"] and r["caption"].strip(), r["id"]


def test_images_decode_and_fit(rows, meta):
    size = meta["size"]
    for r in rows:
        if r["planted"] and r["planted"].startswith("broken:"):
            continue
        im = _decode(_bytes(r))
        assert max(im.size) <= size, (r["id"], im.size)
        assert min(im.size) >= 8, (r["id"], im.size)


def test_broken_files_do_not_decode(rows, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIL_DEFAULT_LIMIT)
    broken = {r["planted"]: r for r in rows if r["planted"] and r["planted"].startswith("broken:")}
    assert set(broken) == {f"broken:{k}" for k in builder.BROKEN_KINDS}
    assert _bytes(broken["broken:zero_bytes"]) == b""
    for kind, r in broken.items():
        with pytest.raises((OSError, SyntaxError, ValueError, Image.DecompressionBombError)):
            _decode(_bytes(r))
        assert r["caption"], kind  # the caption is fine; the file is not


def test_decompression_bomb(rows, monkeypatch):
    (row,) = [r for r in rows if r["planted"] == "broken:decompression_bomb"]
    data = _bytes(row)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width * height > PIL_DEFAULT_LIMIT
    assert len(data) < 100_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIL_DEFAULT_LIMIT)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


def test_near_duplicates_point_at_existing_originals(rows, by_id):
    near = [r for r in rows if r["planted"] and r["planted"].startswith("near_dup_of:")]
    assert len(near) == builder.N_NEAR_DUP
    for r in near:
        orig = by_id[r["planted"].split(":", 1)[1]]
        assert orig["planted"] is None, "originals are ordinary rows"
        assert orig["caption"] in r["caption"]  # same caption, at most lightly reworded
        assert _bytes(r) != _bytes(orig)
        assert r["source"] == orig["source"]
    assert {by_id[r["planted"].split(":", 1)[1]]["source"] for r in near} == {
        "openclipart",
        "skimage",
    }


def test_exact_duplicates_are_byte_identical(rows, by_id):
    exact = [r for r in rows if r["planted"] and r["planted"].startswith("exact_dup_of:")]
    assert len(exact) == builder.N_EXACT_DUP
    for r in exact:
        orig = by_id[r["planted"].split(":", 1)[1]]
        assert orig["id"] != r["id"] and orig["planted"] is None
        assert _bytes(r) == _bytes(orig)


def test_swapped_captions_come_in_pairs(rows):
    swapped = [r for r in rows if r["planted"] == "swapped_caption"]
    assert len(swapped) == 2 * builder.N_SWAP_PAIRS
    for r in rows:
        assert (r["original_caption"] is not None) == (r["planted"] == "swapped_caption")
    unmatched = list(swapped)
    while unmatched:
        a = unmatched.pop()
        assert a["caption"] != a["original_caption"]
        partners = [
            b
            for b in unmatched
            if b["original_caption"] == a["caption"] and b["caption"] == a["original_caption"]
        ]
        assert len(partners) == 1, a["id"]
        unmatched.remove(partners[0])


def test_bad_captions(rows):
    bad = {r["planted"]: r for r in rows if r["planted"] and r["planted"].startswith("bad_caption")}
    assert set(bad) == {f"bad_caption:{k}" for k in builder.BAD_CAPTION_KINDS}
    assert bad["bad_caption:null"]["caption"] is None
    assert bad["bad_caption:empty"]["caption"] == ""
    ws = bad["bad_caption:whitespace"]["caption"]
    assert ws is not None and ws != "" and ws.strip() == ""
    for r in bad.values():
        _decode(_bytes(r))  # the image itself is fine


def test_title_filter():
    ok = ["Red Apple", "Copper the Beagle", "hammer", "Pen & Pencil", "Little Boy - atomic bomb"]
    bad = [
        "",
        "Untitled",
        "untitled-1",
        "drawing.svg",
        "apple_01",
        "Aircraft3",
        "button-yellow",
        "Lemon SVG theme",
        "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
        "Clipart by Nicu Buculei - pear",
        "Telefono (email: someone@example.org)",
    ]
    assert all(builder.usable_title(t) for t in ok)
    assert not any(builder.usable_title(t) for t in bad)
    cap = builder.clipart_caption
    assert cap("Crawfish", "Crawfish") == "Crawfish"
    assert cap("Apple", "jean.victor.balin@gmail.com") == "Apple"
    assert cap("Apple Core", "this apple has almost finished being eaten") == (
        "Apple Core: this apple has almost finished being eaten"
    )
    assert cap("Toadstool", "A simple Toadstool") == "A simple Toadstool"


_SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
 xmlns:dc="http://purl.org/dc/elements/1.1/"
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><rdf:RDF>
<cc:Work rdf:about=""><dc:title>{title}</dc:title><dc:description>{desc}</dc:description>
<dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
{license}</cc:Work></rdf:RDF></metadata></svg>
"""


def _fake_openclipart(root: Path, n_cat: int = 6, per_cat: int = 16) -> None:
    """A tiny library laid out like the Debian packages: png/<cat>/<name>.png + svg/<same>.svg."""
    from PIL import ImageDraw

    colours = ["red", "green", "blue", "orange", "purple", "black", "teal"]
    shapes = ["circle", "square", "cross"]
    for c in range(n_cat):
        for k in range(per_cat):
            rel = f"cat{c}/sub{k % 2}/thing_{c}_{k}"
            colour, shape = colours[(c + k) % len(colours)], shapes[k % len(shapes)]
            im = Image.new("RGBA", (96 + 8 * k, 96), (0, 0, 0, 0))
            d = ImageDraw.Draw(im)
            box = (10 + k, 10 + c, 80 + k, 80)
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
            if shape == "cross":
                d.line((10, 10, 90, 90), fill="white", width=9)
            title = f"{colour} {shape} number {c} {k}"
            if k == 0:
                title = "Untitled"  # never picked
            elif k == 1:
                title = f"thing_{c}_{k}.svg"  # never picked
            licence = (
                ""
                if k == 2
                else '<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>'
            )
            if k == 2:
                title = "Unmarked Licence Thing"  # never picked: no public-domain mark
            png = root / "png" / f"{rel}.png"
            svg = root / "svg" / f"{rel}.svg"
            png.parent.mkdir(parents=True, exist_ok=True)
            svg.parent.mkdir(parents=True, exist_ok=True)
            im.save(png)
            desc = f"a {colour} {shape} drawn on nothing" if k % 4 == 3 else ""
            svg.write_text(_SVG.format(title=title, desc=desc, license=licence))


def test_builder_is_deterministic(tmp_path):
    lib = tmp_path / "openclipart"
    _fake_openclipart(lib)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        t = builder.build(
            n_clipart=builder.MIN_CLIPART, size=64, seed=7, log=lambda *_: None, clipart_root=lib
        )
        builder.write(t, out)
    assert a.read_bytes() == b.read_bytes()
    t = pq.read_table(a)
    validate(t)
    rows = t.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    counts = Counter(builder.planted_kind(r["planted"]) for r in rows if r["planted"])
    assert dict(counts) == builder.PLANTED_COUNTS
    captions = {r["caption"] or "" for r in rows} | {r["original_caption"] or "" for r in rows}
    assert not any(c == "Untitled" or c.endswith(".svg") or "Unmarked" in c for c in captions)
    assert any(": a " in c for c in captions)  # a description was appended to its title
    for r in rows:
        if r["planted"] is None:
            assert max(Image.open(io.BytesIO(_bytes(r))).size) <= 64
    other_seed = builder.build(
        n_clipart=builder.MIN_CLIPART, size=64, seed=8, log=lambda *_: None, clipart_root=lib
    )
    assert other_seed.column("id").to_pylist() != t.column("id").to_pylist()
