"""Exports and export_check: export, import with the readers, get the same rows back.

Every expectation is written here in plain Python from the rows the test builds (image bytes made
with PIL from seeded noise), never computed by the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs import rejected_reasons, table
from PIL import Image

from warren.pipelines.cli import main as cli_main
from warren.pipelines.runner import Pipeline, Runner
from warren.stages.export_check import ExportCheck
from warren.stages.exports import ExportError, export
from warren.stages.readers import detect_format, get_reader
from warren.stages.schema import IMAGE_TYPE, REJECT_COLUMN, rows_to_table

FORMATS = ("llava", "sharegpt", "hf")
FIELDS = ("id", "images", "conversations", "source", "caption", "url", "license")

# ---------------------------------------------------------------------------------------------
# inputs


def encode(seed: int, fmt: str = "PNG", size: tuple[int, int] = (6, 4)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb by its header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = (b"\x00" + bytes((width + 7) // 8)) * 4
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def img(data: bytes, path: str | None) -> dict:
    return {"bytes": data, "path": path}


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


def write_stage(folder: Path, rows: list[dict], files: int = 2) -> Path:
    """A stage folder as the runner leaves it: Parquet shards listed, in order, in _manifest.json."""
    folder.mkdir(parents=True)
    size = -(-len(rows) // files)
    listed = []
    for i in range(files):
        part = rows[i * size : (i + 1) * size]
        if not part:
            continue
        name = f"part-{i:04d}.parquet"
        pq.write_table(rows_to_table(part), folder / name)
        listed.append({"name": name, "rows": len(part), "bytes": (folder / name).stat().st_size})
    (folder / "_manifest.json").write_text(json.dumps({"stage": "t", "files": listed}))
    return folder


def import_rows(dest: Path, fmt: str) -> dict[str, dict]:
    """Read an export back through the reader `detect_format` picks, as the runner would."""
    expected_reader = "hf_datasets" if fmt == "hf" else "llava_json"
    assert detect_format(str(dest)) == expected_reader
    reader = get_reader(None, str(dest))
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    rows = [r for u in units for t in reader.read(u) for r in t.to_pylist()]
    assert [r["id"] for r in rows if r[REJECT_COLUMN]] == []
    out = {r["id"]: {k: r[k] for k in FIELDS} for r in rows}
    assert len(out) == len(rows)
    return out


def expected_rows(rows: list[dict], fmt: str, paths: dict[tuple[str, int], str]) -> dict:
    """What each format gives back: hf keeps an image path's file name only (datasets'
    save_to_disk), the JSON formats the exported path (`paths` lists the ones the test expects to
    differ from the row's own)."""
    out = {}
    for r in rows:
        images = []
        for k, i in enumerate(r.get("images") or []):
            if fmt == "hf":
                path = None if i["path"] is None else i["path"].rsplit("/", 1)[-1]
            else:
                path = paths.get((r["id"], k), i["path"])
            images.append({"bytes": i["bytes"], "path": path})
        out[r["id"]] = {
            "id": r["id"],
            "images": images,
            "conversations": r.get("conversations"),
            "source": r.get("source"),
            "caption": r.get("caption"),
            "url": r.get("url"),
            "license": r.get("license"),
        }
    return out


# Hand-made rows covering each layout case; ids with "/" and "?" need sanitising.
A, B, C, D = encode(1), encode(2), encode(3, "JPEG", (16, 12)), encode(4)
SAME, OTHER = encode(5), encode(6)
ROWS = [
    {
        "id": "multi/turn/1",
        "images": [img(A, "coco/a.png")],
        "conversations": turns(
            ("human", "<image>\nWhat is this?"),
            ("gpt", "A test card."),
            ("human", "Colours?\nList them."),
            ("gpt", "Red, green\nand blue."),
        ),
        "source": "coco",
    },
    {
        "id": "sys-2",
        "images": [img(B, "coco/b.png")],
        "conversations": turns(
            ("system", "Be brief."), ("human", "Look: <image> now."), ("gpt", "Seen.")
        ),
        "source": "coco",
        "caption": "a caption kept next to the turns",
        "url": "http://example.com/b.png",
        "license": "cc-by",
    },
    {
        "id": "multi-img",
        "images": [img(A, "x/1.png"), img(B, "x/2.png")],
        "conversations": turns(("human", "<image>\n<image>\nCompare."), ("gpt", "Same size.")),
        "source": "mix",
    },
    {
        "id": "text-only",
        "images": [],
        "conversations": turns(("human", "Say hi."), ("gpt", "Hi.")),
        "source": "text",
    },
    {
        "id": "a/b?c",
        "images": [img(C, None)],
        "conversations": turns(("human", "<image>"), ("gpt", "A photo.")),
        "source": "web",
    },
    {
        "id": "share-1",
        "images": [img(SAME, "s/same.png")],
        "conversations": turns(("human", "<image>1"), ("gpt", "one")),
        "source": "web",
    },
    {
        "id": "share-2",
        "images": [img(SAME, "s/same.png")],
        "conversations": turns(("human", "<image>2"), ("gpt", "two")),
        "source": "web",
    },
    {
        "id": "diff-1",
        "images": [img(D, "d/pic.png")],
        "conversations": turns(("human", "<image>3"), ("gpt", "three")),
        "source": "web",
    },
    {
        "id": "diff-2",
        "images": [img(OTHER, "d/pic.png")],
        "conversations": turns(("human", "<image>4"), ("gpt", "four")),
        "source": "web",
    },
]
# The only paths an export changes: the pathless image gets images/<sanitised id>-<k>.<ext>, the
# later of two different images at one path gets .<sha1[:8]> before its extension.
CHANGED = {
    ("a/b?c", 0): "images/a_b_c-0.jpg",
    ("diff-2", 0): f"d/pic.{hashlib.sha1(OTHER).hexdigest()[:8]}.png",
}


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    return write_stage(tmp_path_factory.mktemp("src") / "03-export_check", ROWS)


@pytest.fixture(scope="module")
def exports(stage: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    reports = {fmt: export(str(stage), fmt, str(out / fmt)) for fmt in FORMATS}
    for report in reports.values():
        assert report.rows == len(ROWS)
    assert (reports["llava"].images, reports["llava"].images_shared) == (8, 1)
    assert reports["llava"].paths_changed == 1
    assert reports["hf"].images == 9
    return {fmt: out / fmt for fmt in FORMATS}


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_gives_back_the_same_rows(exports, fmt):
    assert import_rows(exports[fmt], fmt) == expected_rows(ROWS, fmt, CHANGED)


def test_llava_export_loads_with_plain_json_and_follows_llava_rules(exports):
    dest = exports["llava"]
    items = json.loads((dest / "llava.json").read_text(encoding="utf-8"))
    assert [i["id"] for i in items] == [r["id"] for r in ROWS]
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    # share-1 and share-2 share one file; the different image at d/pic.png got its own name.
    assert files == sorted(
        ["llava.json", "coco/a.png", "coco/b.png", "x/1.png", "x/2.png", "s/same.png", "d/pic.png"]
        + list(CHANGED.values())
    )
    for item in items:
        assert isinstance(item["id"], str)
        paths = item.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        assert not isinstance(item.get("image"), list) or len(paths) > 1
        for p in paths:
            assert not p.startswith("/") and ".." not in p.split("/")
            assert (dest / p).is_file()
        convs = item["conversations"]
        assert sum(t["value"].count("<image>") for t in convs) == len(paths)
        roles = [t["from"] for t in convs if t["from"] != "system" or convs.index(t) != 0]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and len(roles) % 2 == 0
    assert "image" not in items[3]
    assert (dest / "s/same.png").read_bytes() == SAME
    assert (dest / CHANGED[("diff-2", 0)]).read_bytes() == OTHER


def test_sharegpt_export_registers_its_file_and_paths_resolve(exports, stage):
    dest = exports["sharegpt"]
    info = json.loads((dest / "dataset_info.json").read_text())
    assert info == {
        "sharegpt": {
            "file_name": "data.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    items = json.loads((dest / "data.json").read_text(encoding="utf-8"))
    assert items[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look: <image> now."},
        {"role": "assistant", "content": "Seen."},
    ]
    assert items[3]["images"] == []
    for item in items:
        assert isinstance(item["images"], list)
        for p in item["images"]:
            assert (dest / p).resolve().is_relative_to(dest.resolve()) and (dest / p).is_file()
    named = export(str(stage), "sharegpt", str(dest.parent / "named"), name="my_mix")
    assert named.rows == len(ROWS)
    assert list(json.loads((dest.parent / "named" / "dataset_info.json").read_text())) == ["my_mix"]


def test_hf_export_loads_in_datasets_with_pil_images_and_no_markers(exports):
    import datasets

    ds = datasets.load_from_disk(str(exports["hf"]))
    assert len(ds) == len(ROWS)
    assert set(ds.column_names) == {
        "id",
        "images",
        "messages",
        "source",
        "caption",
        "url",
        "license",
    }
    row = ds[ds["id"].index("multi-img")]
    assert [im.size for im in row["images"]] == [(6, 4), (6, 4)]
    assert all(isinstance(im, Image.Image) for im in row["images"])
    assert row["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": "\n"},
                {"type": "image", "text": None},
                {"type": "text", "text": "\nCompare."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Same size."}]},
    ]
    for messages in ds["messages"]:
        for m in messages:
            assert m["role"] in ("user", "assistant", "system")
            assert all("<image>" not in (p["text"] or "") for p in m["content"])


# ---------------------------------------------------------------------------------------------
# refusals


def test_export_refuses_non_empty_dest_unsafe_paths_and_textless_rows(stage, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export(str(stage), "llava", str(dest))
    assert (dest / "old.txt").read_text() == "keep me"
    report = export(str(stage), "llava", str(dest), overwrite=True)
    assert report.rows == len(ROWS) and not (dest / "old.txt").exists()
    with pytest.raises(ExportError, match="holds the source"):
        export(str(stage), "llava", str(stage.parent), overwrite=True)

    bad = write_stage(
        tmp_path / "bad",
        [
            ROWS[0],
            {
                "id": "evil",
                "images": [img(A, "../evil.png")],
                "conversations": turns(("human", "<image>"), ("gpt", "x")),
            },
        ],
    )
    for fmt in ("llava", "sharegpt"):
        with pytest.raises(ExportError, match=r"'evil'.*\.\./evil\.png.*export_check"):
            export(str(bad), fmt, str(tmp_path / f"bad-{fmt}"))
        # Nothing half-written is left behind: no dest, no temporary folder.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "dest"]

    nobytes = write_stage(
        tmp_path / "nobytes",
        [
            {
                "id": "n",
                "images": [img(None, "a.png")],
                "conversations": turns(("human", "<image>"), ("gpt", "x")),
            }
        ],
        1,
    )
    with pytest.raises(ExportError, match="'n', image 1 of 1: no bytes"):
        export(str(nobytes), "hf", str(tmp_path / "n-hf"))
    with pytest.raises(ExportError, match="'n', image 1 of 1: null bytes"):
        export(str(nobytes), "sharegpt", str(tmp_path / "n-lf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "dest", "nobytes"]

    # A row with neither turns nor a caption is not written; a source of only such rows is an
    # export of nothing: an error, and nothing is left behind.
    textless = write_stage(tmp_path / "textless", [{"id": "t1", "images": [img(A, "t.png")]}], 1)
    with pytest.raises(ExportError, match=r"exported 0 of 1 rows.*no conversations and no capt"):
        export(str(textless), "llava", str(tmp_path / "t-llava"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "dest", "nobytes", "textless"]


def test_cli_export_prints_the_report_and_exits_2_on_a_bad_source(stage, tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope"), "--format", "hf", "--to", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
    dest = tmp_path / "lf"
    args = ["export", str(stage), "--format", "sharegpt", "--to", str(dest), "--name", "mix"]
    assert cli_main(args) == 0
    assert f"exported {len(ROWS)} rows" in capsys.readouterr().out
    assert cli_main(args) == 2  # dest is not empty now
    assert cli_main([*args, "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# readers: the pieces the round trip needs


def test_llava_reader_takes_an_items_source_unless_the_source_option_is_given(tmp_path):
    items = [
        {"id": 1, "conversations": turns(("human", "q"), ("gpt", "a")), "source": "vqa"},
        {"id": 2, "conversations": turns(("human", "q"), ("gpt", "a"))},
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(items))

    def sources(**options):
        reader = get_reader("llava_json", str(path), **options)
        rows = [r for u in reader.plan() for t in reader.read(u) for r in t.to_pylist()]
        return {r["id"]: r["source"] for r in rows}

    assert sources() == {"1": "vqa", "2": "mix"}
    assert sources(source="forced") == {"1": "forced", "2": "forced"}


def test_trl_content_parts_concatenate_with_an_image_part_as_exactly_one_marker(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
        }
    )
    parts = [
        {"type": "text", "text": "A"},
        {"type": "image", "text": None},
        {"type": "text", "text": "B\n"},
    ]
    datasets.Dataset.from_dict(
        {"id": ["t"], "messages": [[{"role": "user", "content": parts}]]}, features=features
    ).save_to_disk(str(tmp_path / "trl"))
    reader = get_reader(None, str(tmp_path / "trl"))
    rows = [r for u in reader.plan() for t in reader.read(u) for r in t.to_pylist()]
    assert rows[0]["conversations"] == [{"from": "human", "value": "A<image>B\n"}]


def test_dataset_info_json_of_llama_factory_is_not_taken_for_a_datasets_folder(tmp_path):
    lf = tmp_path / "lf"
    lf.mkdir()
    (lf / "dataset_info.json").write_text(
        json.dumps({"d": {"file_name": "sub/d.json", "formatting": "sharegpt"}})
    )
    (lf / "sub").mkdir()
    (lf / "pic.png").write_bytes(A)
    (lf / "sub" / "d.json").write_text(
        json.dumps(
            [{"conversations": turns(("human", "<image>hi"), ("gpt", "yo")), "images": ["pic.png"]}]
        )
    )
    assert detect_format(str(lf)) == "llava_json"
    reader = get_reader(None, str(lf))
    assert [u.key for u in reader.plan()] == ["sub/d.json"]
    rows = [r for u in reader.plan() for t in reader.read(u) for r in t.to_pylist()]
    # Image paths are relative to the folder holding dataset_info.json (LLaMA-Factory's dataset_dir).
    assert rows[0]["images"] == [{"bytes": A, "path": "pic.png"}] and rows[0][REJECT_COLUMN] is None

    (lf / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "sub/d.json"}}))
    with pytest.raises(ValueError, match="not a sharegpt dataset"):
        get_reader(None, str(lf)).plan()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))
    assert detect_format(str(hf)) == "hf_datasets"


# ---------------------------------------------------------------------------------------------
# export_check


VALID_JPEG = encode(7, "JPEG", (64, 48))
CHECK_ROWS = {
    # (row, expected reason or None)
    "ok-0": ([], turns(("human", "hi"), ("gpt", "yo")), None),
    "ok-1": ([img(A, "a.png")], turns(("human", "<image>\nq"), ("gpt", "a")), None),
    "ok-2": (
        [img(A, None), img(B, "b/c.png")],
        turns(("human", "<image><image>"), ("gpt", "a")),
        None,
    ),
    "system-first": (
        [],
        turns(("system", "s"), ("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")),
        None,
    ),
    "marks-0-imgs-1": (
        [img(A, "a.png")],
        turns(("human", "q"), ("gpt", "a")),
        "export_check: image marker mismatch (0 markers, 1 images)",
    ),
    "marks-2-imgs-1": (
        [img(A, "a.png")],
        turns(("human", "<image>q"), ("gpt", "a<image>")),
        "export_check: image marker mismatch (2 markers, 1 images)",
    ),
    "marks-1-imgs-0": (
        [],
        turns(("human", "<image>q"), ("gpt", "a")),
        "export_check: image marker mismatch (1 markers, 0 images)",
    ),
    "system-middle": (
        [],
        turns(("human", "q"), ("gpt", "a"), ("system", "s"), ("human", "q"), ("gpt", "a")),
        "export_check: turns do not alternate (turn 3 is 'system', expected 'human')",
    ),
    "two-systems": (
        [],
        turns(("system", "s"), ("system", "t"), ("human", "q"), ("gpt", "a")),
        "export_check: turns do not alternate (turn 2 is 'system', expected 'human')",
    ),
    "ends-human": (
        [],
        turns(("human", "q"), ("gpt", "a"), ("human", "q2")),
        "export_check: turns do not alternate (ends with 'human', expected 'gpt')",
    ),
    "starts-gpt": (
        [],
        turns(("gpt", "a"), ("human", "q")),
        "export_check: starts with the model's turn (turn 1 is 'gpt')",
    ),
    "system-only": (
        [],
        turns(("system", "s")),
        "export_check: turns do not alternate (no human/gpt turns)",
    ),
    "empty-value": (
        [],
        turns(("human", "q"), ("gpt", "")),
        "export_check: empty turn (turn 2, 'gpt')",
    ),
    "blank-value": (
        [],
        turns(("human", " \n"), ("gpt", "a")),
        "export_check: empty turn (turn 1, 'human')",
    ),
    "unknown-role": (
        [],
        turns(("human", "q"), ("bot", "a")),
        "export_check: unknown role (turn 2 is 'bot')",
    ),
    # a caption row: exported in LLaVA's pretraining form, so it passes (run_export_check gives
    # every row the caption "c", except the ids listed in NO_CAPTION)
    "no-turns": ([img(A, "a.png")], None, None),
    # a caption with no image is no pretraining pair, and export_check says so (the exports
    # would skip it)
    "empty-turns": ([], [], "export_check: caption row without an image"),
    "caption-two-images": (
        [img(A, "a.png"), img(B, "b.png")],
        None,
        "export_check: caption row with 2 images (a caption describes one image)",
    ),
    "no-text": ([img(A, "a.png")], None, "export_check: no conversations and no caption"),
    "blank-caption": ([img(A, "a.png")], None, "export_check: no conversations and no caption"),
    "not-an-image": (
        [img(b"not an image at all", "a.png")],
        turns(("human", "<image>"), ("gpt", "a")),
        "export_check: not an image (text, starts with 6e6f7420616e20696d61676520617420)",
    ),
    "truncated-jpeg": (
        [img(VALID_JPEG[: len(VALID_JPEG) // 2], "a.jpg")],
        turns(("human", "<image>"), ("gpt", "a")),
        "export_check: truncated image (",
    ),
    "second-bad": (
        [img(A, "a.png"), img(b"", "b.png")],
        turns(("human", "<image><image>"), ("gpt", "a")),
        "export_check: empty image (image 2 of 2: 0 bytes; path 'b.png')",
    ),
    "null-bytes": (
        [img(None, "a.png")],
        turns(("human", "<image>"), ("gpt", "a")),
        "export_check: empty image (null bytes; path 'a.png')",
    ),
    "bomb": (
        [img(png_claiming(30_000, 30_000), "a.png")],
        turns(("human", "<image>"), ("gpt", "a")),
        "export_check: too many pixels (",
    ),
    "dotdot": (
        [img(A, "imgs/../../a.png")],
        turns(("human", "<image>"), ("gpt", "a")),
        "export_check: unsafe image path (imgs/../../a.png)",
    ),
    "absolute": (
        [img(A, "a.png"), img(B, "/etc/b.png")],
        turns(("human", "<image><image>"), ("gpt", "a")),
        "export_check: unsafe image path (image 2 of 2: /etc/b.png)",
    ),
    "inside-after-dots": ([img(A, "a/../b.png")], turns(("human", "<image>"), ("gpt", "a")), None),
}


NO_CAPTION = {"no-text": None, "blank-caption": " \n"}


def run_export_check(**params) -> dict[str, str | None]:
    rows = [
        {"id": k, "images": images, "conversations": conv, "caption": NO_CAPTION.get(k, "c")}
        for k, (images, conv, _) in CHECK_ROWS.items()
    ]
    out = ExportCheck(**params).process(rows_to_table(rows))
    assert out.column("id").to_pylist() == list(CHECK_ROWS)
    reasons = out.column(REJECT_COLUMN).to_pylist() if REJECT_COLUMN in out.column_names else []
    return dict(zip(CHECK_ROWS, reasons, strict=True))


def test_export_check_rejects_each_rule_at_its_boundary_with_its_reason():
    got = run_export_check()
    for key, (_, _, expected) in CHECK_ROWS.items():
        if expected is None:
            assert got[key] is None, (key, got[key])
        # Decoder reasons end with PIL's wording, which varies by version: the category is the
        # contract there.
        elif expected.endswith(" ("):
            assert got[key].startswith(expected), (key, got[key])
        else:
            assert got[key] == expected, key


def test_export_check_names_its_own_pixel_limit_flag():
    got = run_export_check()
    assert got["bomb"].endswith("> max_pixels 268435456, set by --export_check.max_pixels)")
    # Its own limit, lowered, rejects what the default keeps.
    small = run_export_check(max_pixels=100)
    assert small["truncated-jpeg"].startswith("export_check: too many pixels (64x48 = 3072")
    assert small["truncated-jpeg"].endswith("> max_pixels 100, set by --export_check.max_pixels)")


def test_export_check_names_a_null_turn_and_a_caption_that_holds_a_marker():
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table(
        {
            "id": ["null-turn", "marker-caption"],
            "images": pa.array([[], [{"bytes": A, "path": "a.png"}]], pa.list_(IMAGE_TYPE)),
            "caption": [None, "a <image> here"],
            "conversations": pa.array(
                [[{"from": "human", "value": "q"}, None], None], pa.list_(turn)
            ),
        }
    )
    out = ExportCheck(check_images=False).process(table)
    assert out.column(REJECT_COLUMN).to_pylist() == [
        "export_check: malformed turn (turn 2 is null)",
        "export_check: caption holds an <image> marker (it would pair with no image)",
    ]


def test_export_check_options_refuse_caption_rows_and_let_unchecked_images_through():
    got = run_export_check(require_conversations=True, check_images=False)
    assert got["no-turns"] == "export_check: no conversations"
    assert got["empty-turns"] == "export_check: no conversations"
    assert got["ok-1"] is None
    assert got["not-an-image"] is None and got["bomb"] is None
    assert got["dotdot"] == CHECK_ROWS["dotdot"][2]


# ---------------------------------------------------------------------------------------------
# a crafted LLaVA JSON through ingest, export_check and back out


def test_crafted_llava_json_ends_as_documented(ray_session, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(A)
    (tmp_path / "secret.png").write_bytes(B)
    items = [
        {
            "id": 1,
            "image": "images/a.png",
            "conversations": turns(("human", "<image>\nq"), ("gpt", "a")),
        },
        {
            "id": "missing",
            "image": "images/none.png",
            "conversations": turns(("human", "q"), ("gpt", "a")),
        },
        {
            "id": "escape",
            "image": "../secret.png",
            "conversations": turns(("human", "q"), ("gpt", "a")),
        },
        {
            "id": 4,
            "image": "images/a.png",
            "conversations": turns(("human", "<image>q"), ("human", "q again"), ("gpt", "a")),
        },
        {"id": "text", "conversations": turns(("human", "q"), ("gpt", "a"))},
    ]
    (root / "crafted.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    Runner(
        Pipeline("t", [ExportCheck()]),
        str(root / "crafted.json"),
        str(out),
        input_format="llava_json",
        progress=False,
    ).run()
    # ingest and export_check share one definition of a conversation: ingest rejects "4" first
    assert rejected_reasons(out / "00-ingest") == {
        "missing": "llava_json: image not found (images/none.png)",
        "escape": "llava_json: image path escapes root (../secret.png)",
        "4": "llava_json: turns do not alternate (turn 2 is 'human', expected 'gpt')",
    }
    assert rejected_reasons(out / "01-export_check") == {}
    assert sorted(table(out / "01-export_check").column("id").to_pylist()) == ["1", "text"]

    report = export(str(out), "llava", str(tmp_path / "llava"))  # a run folder: its final stage
    assert report.rows == 2
    back = import_rows(tmp_path / "llava", "llava")
    assert sorted(back) == ["1", "text"]
    assert back["1"]["images"] == [{"bytes": A, "path": "images/a.png"}]
    assert back["1"]["source"] == back["text"]["source"] == "crafted"


# ---------------------------------------------------------------------------------------------
# property: random rows survive every format

FRAGMENTS = [
    "a",
    "Z",
    " ",
    "\n",
    "\t",
    "é",
    "漢字",
    "🙂",
    "<",
    "image",
    "img>",
    "<im",
    '"',
    "\\",
    "{",
]


def random_text(rng: random.Random, markers: int) -> str:
    pieces = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 4)))]
    for _ in range(markers):
        pieces.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 3))))
    text = "<image>".join(pieces)
    assert text.count("<image>") == markers
    return text


def nonblank(text: str) -> str:
    return text if text.strip() else text + "x"


def random_rows(seed: int, n: int) -> tuple[list[dict], dict[tuple[str, int], str]]:
    rng = random.Random(seed)
    pool = [
        (encode(100 + i, fmt), ext)
        for i in range(6)
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"))
    ]
    rows, generated = [], {}
    for i in range(n):
        row_id = f"r{i}" if i % 3 else f"g/{i}?"
        n_images = rng.choice([0, 0, 1, 1, 1, 2, 3])
        images = []
        for k in range(n_images):
            data, ext = rng.choice(pool)
            path = None if rng.random() < 0.3 else f"p/{i}/{k}.{ext}"
            if path is None:
                generated[(row_id, k)] = (
                    f"images/{re.sub(r'[^A-Za-z0-9._-]', '_', row_id)}-{k}.{ext}"
                )
            images.append(img(data, path))
        n_turns = 2 * rng.randint(1, 3)
        slots = [rng.randrange(n_turns) for _ in range(n_images)]
        # Valid conversations only (stages.conversation): a blank turn is rejected at ingest.
        conv = [
            {"from": "human" if t % 2 == 0 else "gpt", "value": nonblank(random_text(rng, n))}
            for t, n in ((t, slots.count(t)) for t in range(n_turns))
        ]
        if rng.random() < 0.2:
            conv.insert(0, {"from": "system", "value": nonblank(random_text(rng, 0))})
        row = {
            "id": row_id,
            "images": images,
            "conversations": conv,
            "source": rng.choice(["s1", "src-é", "web/x"]),
        }
        for key in ("caption", "url", "license"):
            if rng.random() < 0.3:
                row[key] = random_text(rng, 0) or "x"
        rows.append(row)
    return rows, generated


def test_random_rows_survive_export_and_import_in_every_format(tmp_path):
    rows, generated = random_rows(seed=7, n=200)
    src = write_stage(tmp_path / "src", rows, files=3)
    for fmt in FORMATS:
        report = export(str(src), fmt, str(tmp_path / fmt))
        assert report.rows == len(rows)
        assert import_rows(tmp_path / fmt, fmt) == expected_rows(rows, fmt, generated), fmt


def test_two_different_ids_that_sanitise_alike_keep_their_own_images(tmp_path):
    rows = [
        {
            "id": "a/b",
            "images": [img(A, None)],
            "conversations": turns(("human", "<image>"), ("gpt", "1")),
        },
        {
            "id": "a_b",
            "images": [img(B, None)],
            "conversations": turns(("human", "<image>"), ("gpt", "2")),
        },
    ]
    src = write_stage(tmp_path / "src", rows, files=1)
    export(str(src), "llava", str(tmp_path / "out"))
    back = import_rows(tmp_path / "out", "llava")
    assert back["a/b"]["images"] == [{"bytes": A, "path": "images/a_b-0.png"}]
    assert back["a_b"]["images"] == [
        {"bytes": B, "path": f"images/a_b-0.{hashlib.sha1(B).hexdigest()[:8]}.png"}
    ]


@pytest.mark.parametrize("fmt", ("llava", "sharegpt"))
def test_image_paths_a_reader_would_take_for_data_are_treated_as_missing(tmp_path, fmt):
    rows = [
        {
            "id": "j",
            "images": [
                img(A, "data.json"),
                img(B, "meta/x.JSONL"),
                img(SAME, "dataset_info.json/y.png"),
            ],
            "conversations": turns(("human", "<image><image><image>"), ("gpt", "3")),
            "source": "s",
        }
    ]
    src = write_stage(tmp_path / "src", rows, files=1)
    report = export(str(src), fmt, str(tmp_path / "out"))
    assert report.paths_changed == 3
    back = import_rows(tmp_path / "out", fmt)
    assert back["j"]["images"] == [
        {"bytes": A, "path": "images/j-0.png"},
        {"bytes": B, "path": "images/j-1.png"},
        {"bytes": SAME, "path": "images/j-2.png"},
    ]
