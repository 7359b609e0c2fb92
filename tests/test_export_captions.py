"""Exports never lose text: caption rows go out as LLaVA's pretraining pair in every format, rows
that cannot be written are counted with their reason, an export of nothing is an error, and the
column-presence check reads nested Parquet schemas right.

Expectations are written here from the rows the tests build: the human turn of a caption row is
recomputed with hashlib and the instruction list copied from the LLaVA paper (Table 8), and each
export is read back with `datasets` (load_from_disk, load_dataset("json")) and with warren's own
readers, row by row.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_exports import encode, img, import_rows, turns, write_stage

from warren.pipelines.cli import main as cli_main
from warren.stages.exports import ExportError, export
from warren.stages.exports.base import StageFolder
from warren.stages.schema import IMAGE_TYPE, TURN_TYPE

FORMATS = ("llava", "sharegpt", "hf")
# LLaVA (Liu et al. 2023), Table 8, "instructions for brief image description": the human turns of
# LCS-558K, e.g. {"id": "004539375", "image": "00453/004539375.jpg", "conversations":
# [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
#  {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}
BRIEF = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]


def instruction(row_id: str) -> str:
    """The documented pick: the first 8 bytes of the id's sha1, big-endian, modulo 11."""
    return BRIEF[int(hashlib.sha1(row_id.encode()).hexdigest()[:16], 16) % len(BRIEF)]


P1, P2, P3, J1 = encode(11), encode(12), encode(13), encode(14, "JPEG", (9, 7))
CAPTION_ROWS = [
    {
        "id": "laion/0001",
        "images": [img(P1, "l/1.png")],
        "caption": "a red kite over a beach",
        "source": "laion",
    },
    {
        "id": "cc-2",
        "images": [img(J1, None)],
        "caption": "Ünïcode café 漢字 🙂\nsecond line, {instruction} kept as text",
        "source": "cc3m",
        "url": "http://example.com/2.jpg",
        "license": "cc-by-sa",
    },
    # An empty list of turns is no turns.
    {
        "id": "sbu 3",
        "images": [img(P2, "s/3.png")],
        "conversations": [],
        "caption": "  padded  ",
        "source": "sbu",
    },
]
CONVERSATION_ROWS = [
    {
        "id": "vqa-1",
        "images": [img(P3, "v/1.png")],
        "conversations": turns(("human", "<image>\nWhat is it?"), ("gpt", "Noise.")),
        "source": "vqa",
        # Both: the turns win, the caption rides along in the caption field.
        "caption": "a caption next to the turns",
        "license": "mit",
    },
    {
        "id": "chat-2",
        "images": [],
        "conversations": turns(("system", "Be brief."), ("human", "Hi?"), ("gpt", "Hi.")),
        "source": "chat",
    },
]
MIX = [CAPTION_ROWS[0], CONVERSATION_ROWS[0], CAPTION_ROWS[1], CONVERSATION_ROWS[1]] + [
    CAPTION_ROWS[2]
]
CASES = {"captions": CAPTION_ROWS, "conversations": CONVERSATION_ROWS, "mix": MIX}
# Every row has a source: a reader gives a row without one its file's name.
# The one path an export changes here: the pathless JPEG gets images/<id>-0.jpg.
GENERATED = {("cc-2", 0): "images/cc-2-0.jpg"}


def expected_turns(row: dict, template: str = "<image>\n{instruction}") -> list[dict]:
    if row.get("conversations"):
        return row["conversations"]
    human = template.replace("{instruction}", instruction(row["id"]))
    return [{"from": "human", "value": human}, {"from": "gpt", "value": row["caption"]}]


def expected_canonical(rows: list[dict], fmt: str) -> dict[str, dict]:
    out = {}
    for r in rows:
        images = []
        for k, i in enumerate(r["images"]):
            path = GENERATED.get((r["id"], k), i["path"])
            if fmt == "hf":
                path = None if i["path"] is None else i["path"].rsplit("/", 1)[-1]
            images.append({"bytes": i["bytes"], "path": path})
        out[r["id"]] = {
            "id": r["id"],
            "images": images,
            "conversations": expected_turns(r),
            "source": r.get("source"),
            "caption": r.get("caption"),
            "url": r.get("url"),
            "license": r.get("license"),
        }
    return out


def trl_messages(row: dict) -> list[dict]:
    """TRL content parts written out by hand from the expected turns."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    for t in expected_turns(row):
        parts = []
        for i, piece in enumerate(t["value"].split("<image>")):
            if i:
                parts.append({"type": "image", "text": None})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role[t["from"]], "content": parts})
    return out


def load_with_datasets(dest: Path, fmt: str, cache: Path) -> list[dict]:
    import datasets

    if fmt == "hf":
        ds = datasets.load_from_disk(str(dest))
        ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    else:
        name = "llava.json" if fmt == "llava" else "data.json"
        ds = datasets.load_dataset(
            "json", data_files=str(dest / name), split="train", cache_dir=str(cache)
        )
    return ds.to_list()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_column_of_every_export_round_trips_for_captions_turns_and_a_mix(tmp_path, fmt, case):
    rows = CASES[case]
    src = write_stage(tmp_path / "src", rows, files=2)
    dest = tmp_path / fmt
    report = export(str(src), fmt, str(dest))
    captions = sum(1 for r in rows if not r.get("conversations"))
    assert (report.rows, report.given, report.captions, report.skipped) == (
        len(rows),
        len(rows),
        captions,
        {},
    )

    # warren's own readers give back every canonical column, the caption rows with their turns.
    assert import_rows(dest, fmt) == expected_canonical(rows, fmt)

    # `datasets` reads the same file a trainer would, row by row in export order.
    got = load_with_datasets(dest, fmt, tmp_path / "cache")
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    for g, r in zip(got, rows, strict=True):
        for key in ("source", "caption", "url", "license"):
            assert g.get(key) == r.get(key), (r["id"], key)
        paths = [GENERATED.get((r["id"], k), i["path"]) for k, i in enumerate(r["images"])]
        if fmt == "hf":
            assert g["messages"] == trl_messages(r)
            assert [i["bytes"] for i in g["images"]] == [i["bytes"] for i in r["images"]]
            continue
        if fmt == "llava":
            assert g["conversations"] == expected_turns(r)
            exported = [g["image"]] if g.get("image") else []
        else:
            role = {"human": "user", "gpt": "assistant", "system": "system"}
            assert g["messages"] == [
                {"role": role[t["from"]], "content": t["value"]} for t in expected_turns(r)
            ]
            exported = g["images"]
        assert exported == paths
        assert [(dest / p).read_bytes() for p in exported] == [i["bytes"] for i in r["images"]]


def test_caption_rows_take_the_lcs_558k_form_with_a_stable_spread_of_instructions(tmp_path):
    rows = [
        {"id": f"cap{i}", "images": [img(P1, f"c/{i}.png")], "caption": f"c{i}"} for i in range(40)
    ]
    src = write_stage(tmp_path / "src", rows, files=3)
    export(str(src), "llava", str(tmp_path / "a"))
    items = json.loads((tmp_path / "a" / "llava.json").read_text(encoding="utf-8"))
    form = re.compile("^<image>\n(" + "|".join(re.escape(b) for b in BRIEF) + ")$")
    used = set()
    for item, row in zip(items, rows, strict=True):
        human, gpt = item["conversations"]
        assert human["from"] == "human" and form.match(human["value"]), human
        assert gpt == {"from": "gpt", "value": row["caption"]}
        assert item["image"] == f"c/{row['id'][3:]}.png" and item["caption"] == row["caption"]
        used.add(human["value"])
    assert len(used) > 5  # the instruction varies with the id, as in LCS-558K
    # The same rows in other shards and another export give the same turns: the id decides.
    again = write_stage(tmp_path / "again", rows[::-1], files=5)
    export(str(again), "llava", str(tmp_path / "b"))
    items_b = json.loads((tmp_path / "b" / "llava.json").read_text(encoding="utf-8"))
    assert {i["id"]: i["conversations"] for i in items_b} == {
        i["id"]: i["conversations"] for i in items
    }


@pytest.mark.parametrize(
    "template, human",
    [
        ("<image>", "<image>"),  # LLaVA's `--version plain` keeps only the marker
        ("{instruction}\n<image>", "{i}\n<image>"),  # LCS-558K's other order
        ("Describe this picture: <image>", "Describe this picture: <image>"),
    ],
)
def test_the_caption_template_sets_the_human_turn_in_every_format(tmp_path, template, human):
    row = CAPTION_ROWS[0]
    src = write_stage(tmp_path / "src", [row], files=1)
    want = human.replace("{i}", instruction(row["id"]))
    for fmt in FORMATS:
        export(str(src), fmt, str(tmp_path / fmt), caption_template=template)
        back = import_rows(tmp_path / fmt, fmt)[row["id"]]
        assert back["conversations"] == [
            {"from": "human", "value": want},
            {"from": "gpt", "value": row["caption"]},
        ], fmt


@pytest.mark.parametrize(
    "template, message",
    [
        ("Describe it.", "has 0 <image> markers; give exactly one"),
        ("<image><image>\n{instruction}", "has 2 <image> markers; give exactly one"),
        (3, "caption_template must be a string, got int"),
    ],
)
def test_a_template_without_exactly_one_marker_is_refused_before_anything_is_written(
    tmp_path, template, message
):
    src = write_stage(tmp_path / "src", CAPTION_ROWS, files=1)
    for fmt in FORMATS:
        with pytest.raises(ExportError, match=message):
            export(str(src), fmt, str(tmp_path / fmt), caption_template=template)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


UNWRITABLE = [
    {"id": "no-text", "images": [img(P1, "n.png")]},
    {"id": "blank", "images": [img(P2, "b.png")], "caption": " \n\t"},
    {"id": "no-image", "images": [], "caption": "a caption of nothing"},
    {"id": "no-text-2", "images": [], "conversations": []},
    {"id": "marker", "images": [img(P3, "m.png")], "caption": "see <image> here"},
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_not_written_are_counted_by_reason_and_their_images_not_written(tmp_path, fmt):
    rows = [*CAPTION_ROWS[:1], *UNWRITABLE, *CONVERSATION_ROWS]
    src = write_stage(tmp_path / "src", rows, files=2)
    report = export(str(src), fmt, str(tmp_path / fmt))
    assert (report.rows, report.given) == (3, 8)
    assert report.skipped == {
        "no conversations and no caption": 2,
        "no conversations and a blank caption": 1,
        "caption row without an image": 1,
        "caption holds an <image> marker (it would pair with no image)": 1,
    }
    summary = report.summary()
    assert summary.startswith("exported 3 of 8 rows (1 from captions) and ")
    assert "not exported: 5 rows:" in summary
    assert "2 no conversations and no caption (e.g. 'no-text', 'no-text-2')" in summary
    assert sorted(import_rows(tmp_path / fmt, fmt)) == ["chat-2", "laion/0001", "vqa-1"]
    if fmt != "hf":
        files = {p.name for p in (tmp_path / fmt).rglob("*.png")}
        assert not files & {"n.png", "b.png", "m.png"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_of_no_rows_is_an_error_that_says_why_and_leaves_nothing(tmp_path, fmt):
    src = write_stage(tmp_path / "src", UNWRITABLE, files=2)
    with pytest.raises(ExportError, match=r"exported 0 of 5 rows as \w+: 2 no conversations"):
        export(str(src), fmt, str(tmp_path / fmt))
    empty = write_stage(tmp_path / "empty", [], files=1)
    with pytest.raises(ExportError, match="no kept rows to export"):
        export(str(empty), fmt, str(tmp_path / fmt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "src"]


def test_cli_export_exits_2_on_no_rows_and_lists_what_it_skipped(tmp_path, capsys):
    src = write_stage(tmp_path / "src", UNWRITABLE, files=1)
    args = ["export", str(src), "--format", "llava", "--to", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "exported 0 of 5 rows as llava" in err and "caption row without an image" in err
    assert not (tmp_path / "out").exists()

    some = write_stage(tmp_path / "some", [*UNWRITABLE, CAPTION_ROWS[0]], files=1)
    # The shell passes \n as a backslash and an n: the CLI turns it into a newline.
    args = ["export", str(some), "--format", "sharegpt", "--to", str(tmp_path / "lf")]
    assert cli_main([*args, "--caption-template", "{instruction}\\n<image>"]) == 0
    out = capsys.readouterr().out
    assert "exported 1 of 6 rows (1 from captions)" in out and "not exported: 5 rows" in out
    item = json.loads((tmp_path / "lf" / "data.json").read_text(encoding="utf-8"))[0]
    assert item["messages"][0] == {
        "role": "user",
        "content": instruction(CAPTION_ROWS[0]["id"]) + "\n<image>",
    }


# ---------------------------------------------------------------------------------------------
# has_values: a top-level column's leaves in nested schemas

STRING = pa.string()


def stage_of(tmp_path: Path, tables: list[pa.Table], **write) -> StageFolder:
    folder = tmp_path / "stage"
    folder.mkdir()
    listed = []
    for i, t in enumerate(tables):
        name = f"part-{i}.parquet"
        pq.write_table(t, folder / name, **write)
        listed.append({"name": name, "rows": t.num_rows, "bytes": (folder / name).stat().st_size})
    (folder / "_manifest.json").write_text(json.dumps({"files": listed}))
    return StageFolder.open(str(folder))


def truth(tables: list[pa.Table], column: str) -> bool:
    """Brute force: any row, in any file, whose top-level value is not null."""
    return any(
        v is not None
        for t in tables
        if column in t.column_names
        for v in t.column(column).to_pylist()
    )


NESTED = {
    "id": STRING,
    "images": pa.list_(IMAGE_TYPE),
    "conversations": pa.list_(TURN_TYPE),
    "source": STRING,
    "caption": STRING,
    "url": STRING,
    "license": STRING,
}


def nested_table(order: list[str], rows: list[dict]) -> pa.Table:
    schema = pa.schema([(name, NESTED[name]) for name in order])
    return pa.Table.from_pylist([{k: r.get(k) for k in order} for r in rows], schema=schema)


CANONICAL = list(NESTED)
# The demo mixture's shape: captions, no turns, image paths all null. A field's position (caption
# is field 4) is not its leaf index (leaf 4 is conversations.list.element.value).
DEMO_ROWS = [
    {"id": f"d{i}", "images": [{"bytes": b"x", "path": None}], "caption": f"c{i}", "source": "s"}
    for i in range(5)
]


@pytest.mark.parametrize(
    "orders",
    [
        [CANONICAL],
        [["caption", "license", "url", "source", "conversations", "images", "id"]],
        [CANONICAL, ["images", "id", "caption", "conversations", "source", "url", "license"]],
    ],
)
def test_has_values_finds_each_top_level_columns_leaves_in_nested_schemas(tmp_path, orders):
    row_sets = [
        DEMO_ROWS,
        [
            # an empty list and a struct of nulls are values; only a null list is not
            {"id": "e", "images": [], "conversations": None, "url": "http://u"},
            {"id": "n", "images": [{"bytes": None, "path": None}], "conversations": []},
            {"id": "z", "images": None, "conversations": None, "license": "mit"},
        ],
        [{"id": "only-turns", "conversations": [{"from": "human", "value": "q"}]}],
        [{"id": "nothing"}],
    ]
    # With statistics the footer decides where it can; without, the column is read.
    for statistics in (True, False):
        for k, rows in enumerate(row_sets):
            case = tmp_path / f"{statistics}-{k}"
            case.mkdir()
            # the rows dealt round-robin to one file per column order
            tables = [nested_table(o, rows[i :: len(orders)]) for i, o in enumerate(orders)]
            tables = [t for t in tables if t.num_rows]
            src = stage_of(case, tables, write_statistics=statistics)
            for column in NESTED:
                assert src.has_values(column) == truth(tables, column), (k, orders, column)


def test_has_values_counts_leaves_of_structs_maps_and_names_with_dots(tmp_path):
    schema = pa.schema(
        [
            ("id", STRING),
            ("x.y", pa.struct([("a", STRING), ("b", pa.list_(pa.int64()))])),
            ("m", pa.map_(STRING, pa.list_(STRING))),
            ("caption", STRING),
            ("url", STRING),
        ]
    )
    rows = [
        {"id": "1", "x.y": None, "m": None, "caption": "c", "url": None},
        {"id": "2", "x.y": {"a": None, "b": None}, "m": None, "caption": None, "url": None},
    ]
    tables = [pa.Table.from_pylist(rows, schema=schema)]
    src = stage_of(tmp_path, tables)
    for column in schema.names:
        assert src.has_values(column) == truth(tables, column), column


def test_has_values_decides_from_the_footer_when_it_can(tmp_path, monkeypatch):
    tables = [nested_table(CANONICAL, DEMO_ROWS)]
    src = stage_of(tmp_path, tables)

    def no_reads(*args, **kwargs):
        raise AssertionError("read a row group the statistics decide")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_reads)
    # Flat columns, and a nested one with a leaf value; all-null leaves of a nested column cannot
    # tell an empty list from a null one, so that case reads the column (tested above).
    assert [src.has_values(c) for c in ("caption", "url", "images")] == [True, False, True]


def test_the_hf_export_keeps_captions_when_image_paths_are_all_null(tmp_path):
    import datasets

    rows = [
        {"id": f"d{i}", "images": [img(P1, None)], "caption": f"caption {i}", "url": f"u{i}"}
        for i in range(3)
    ]
    src = write_stage(tmp_path / "src", rows, files=1)
    export(str(src), "hf", str(tmp_path / "hf"))
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert "license" not in ds.column_names
    assert ds["caption"] == [r["caption"] for r in rows] and ds["url"] == ["u0", "u1", "u2"]
    assert [m[1]["content"][0]["text"] for m in ds["messages"]] == [r["caption"] for r in rows]
