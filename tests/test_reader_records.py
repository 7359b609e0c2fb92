"""Record-level isolation: one record that cannot be represented is one rejected row naming the
file and the record, and the rest of the file goes on. Inputs are written here; counts are exact.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pyarrow as pa
import pytest
from crafted_images import png
from outputs import rejected_reasons, table

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.export_check import ExportCheck
from warren.stages.readers import CocoReader, ImageFolderReader, Img2DatasetReader, LlavaJsonReader
from warren.stages.schema import REJECT_COLUMN, conform

LONE = "\ud800"  # valid in JSON ("\\ud800"), not encodable as UTF-8


def read_all(reader) -> pa.Table:
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    tables = []
    for unit in units:
        unit = type(unit)(unit.key, unit.path, json.loads(json.dumps(unit.options)))
        for part in reader.read(unit):
            assert conform(part).schema.equals(part.schema)
            tables.append(part)
    return pa.concat_tables(tables)


def reasons(table: pa.Table) -> dict[str, str]:
    return {r["id"]: r[REJECT_COLUMN] for r in table.to_pylist() if r[REJECT_COLUMN] is not None}


def conv(question: str, answer: str = "a") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def items_with_one_lone_surrogate() -> list[dict]:
    items = [{"id": f"r{i}", "conversations": conv(f"q{i}")} for i in range(24)]
    items[16]["conversations"][1]["value"] = f"broken {LONE} answer"
    return items


def test_a_lone_surrogate_in_jsonl_rejects_its_record_and_the_other_23_are_read(tmp_path):
    path = tmp_path / "x.jsonl"
    # json.dumps writes the surrogate as the escape "\ud800": valid JSON, as the real file had it
    path.write_text("\n".join(json.dumps(i) for i in items_with_one_lone_surrogate()) + "\n")
    table = read_all(LlavaJsonReader(str(path), batch_size=5))
    assert table.num_rows == 24
    assert reasons(table) == {
        "r16": (
            "llava_json: bad record (x.jsonl line 17: conversations[1].value is not valid "
            "UTF-8: lone surrogate)"
        )
    }
    bad = next(r for r in table.to_pylist() if r["id"] == "r16")
    # the rejected row keeps what could be read, the surrogate shown as U+FFFD
    assert bad["conversations"] == conv("q16", "broken \ufffd answer")


def test_a_lone_surrogate_in_a_json_list_names_the_record_number(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "x.json"
    path.write_text(json.dumps(items_with_one_lone_surrogate()))
    table = read_all(LlavaJsonReader(str(tmp_path)))
    assert table.num_rows == 24
    assert reasons(table) == {
        "r16": (
            "llava_json: bad record (sub/x.json record 17: conversations[1].value is not valid "
            "UTF-8: lone surrogate)"
        )
    }


def test_a_lone_surrogate_in_an_id_gets_a_content_id_and_a_reason(tmp_path):
    items = [
        {"id": f"bad{LONE}", "conversations": conv("q")},
        {"id": 2, "conversations": conv("q")},
    ]
    (tmp_path / "x.json").write_text(json.dumps(items))
    table = read_all(LlavaJsonReader(str(tmp_path / "x.json")))
    assert table.num_rows == 2
    got = reasons(table)
    assert list(got.values()) == [
        "llava_json: bad record (x.json record 1: id is not valid UTF-8: lone surrogate)"
    ]
    assert "2" not in got and "bad\ufffd" in got


def test_wrong_types_and_missing_fields_are_rejected_rows_naming_the_record(tmp_path):
    (tmp_path / "a.png").write_bytes(png(9))
    items = [
        {"id": "ok", "image": "a.png", "conversations": conv("<image>\nq")},
        {"id": "caption-int", "caption": 5, "conversations": conv("q")},
        {"id": "url-list", "url": ["http://x"], "conversations": conv("q")},
        {"id": 1.5, "conversations": conv("q")},
        {"id": "value-list", "conversations": [{"from": "human", "value": ["q"]}]},
        {"id": "nothing"},
        {"id": "image-int", "image": 7, "conversations": conv("q")},
        {"id": "turns-str", "conversations": "hello"},
        {"id": "caption-only", "caption": "a red square", "image": "a.png"},
    ]
    (tmp_path / "t.json").write_text(json.dumps(items))
    table = read_all(LlavaJsonReader(str(tmp_path / "t.json")))
    assert table.num_rows == len(items)
    got = reasons(table)
    float_id = next(k for k in got if k not in {i["id"] for i in items})
    assert got == {
        "caption-int": "llava_json: bad record (t.json record 2: caption is int, expected a string)",
        "url-list": "llava_json: bad record (t.json record 3: url is list, expected a string)",
        float_id: (
            "llava_json: malformed item (t.json record 4: id is float, expected a string or "
            "integer)"
        ),
        "value-list": (
            "llava_json: malformed turn (t.json record 5: turn 1 value is list, expected a string)"
        ),
        "nothing": "llava_json: malformed item (t.json record 6: no conversations and no caption)",
        "image-int": (
            "llava_json: malformed item (t.json record 7: image must be a path or a list of paths)"
        ),
        "turns-str": "llava_json: malformed item (t.json record 8: conversations is str)",
    }


def test_coco_caption_with_a_lone_surrogate_rejects_that_image_only(tmp_path):
    (tmp_path / "images").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 3, "height": 2} for i in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "one"},
            {"id": 20, "image_id": 2, "caption": f"two {LONE}"},
            {"id": 30, "image_id": 3, "caption": "three"},
        ],
    }
    (tmp_path / "captions_val.json").write_text(json.dumps(data))
    table = read_all(
        CocoReader(str(tmp_path / "captions_val.json"), image_root=str(tmp_path / "images"))
    )
    assert table.num_rows == 3
    assert reasons(table) == {
        "coco-2": "coco: bad record (captions_val.json image_id 2: text is not valid UTF-8: "
        "lone surrogate)"
    }


def test_image_folder_sidecar_with_a_lone_surrogate_rejects_that_image_only(tmp_path):
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.png").write_bytes(png(1))
        (tmp_path / f"{stem}.txt").write_text(f"caption {stem}")
    (tmp_path / "b.json").write_text(json.dumps({"url": f"http://x/{LONE}"}))
    table = read_all(ImageFolderReader(str(tmp_path)))
    assert table.num_rows == 2
    assert reasons(table) == {
        "b": "image_folder: bad record (b.png: text is not valid UTF-8: lone surrogate)"
    }


def test_img2dataset_sample_with_a_lone_surrogate_rejects_that_sample_only(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, meta in (("000", {"url": "http://ok"}), ("001", {"url": f"http://{LONE}"})):
            for ext, data in (
                ("png", png(3)),
                ("txt", b"a caption"),
                ("json", json.dumps({**meta, "key": key, "status": "success"}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = read_all(Img2DatasetReader(str(tmp_path)))
    assert table.num_rows == 2
    assert reasons(table) == {
        "001": "img2dataset: bad record (00000.tar sample 001: text is not valid UTF-8: "
        "lone surrogate)"
    }


def test_a_tar_cut_short_keeps_the_samples_before_the_break_and_says_where_it_broke(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("000", "001", "002"):
            for ext, data in (("png", png(int(key)) + b"\0" * 3000), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    # cut inside the third sample's image: 000 and 001 are complete
    offsets = {m.name: m.offset_data for m in tarfile.open(fileobj=io.BytesIO(whole))}
    (tmp_path / "00000.tar").write_bytes(whole[: offsets["002.png"] + 100])
    table = read_all(Img2DatasetReader(str(tmp_path)))
    assert table.num_rows == 3
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["000"][REJECT_COLUMN] is None and rows["001"][REJECT_COLUMN] is None
    (bad,) = [r[REJECT_COLUMN] for r in rows.values() if r[REJECT_COLUMN]]
    assert bad.startswith("img2dataset: unreadable tar (00000.tar after 2 samples: ")


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_isolation_does_not_depend_on_the_batch(tmp_path, batch_size):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items_with_one_lone_surrogate()) + "\n")
    table = read_all(LlavaJsonReader(str(path), batch_size=batch_size))
    assert table.num_rows == 24 and len(reasons(table)) == 1


def test_a_run_over_a_jsonl_with_one_lone_surrogate_keeps_the_other_23_rows(ray_session, tmp_path):
    """The reported case, through the runner: 24 records in, 23 kept, 1 rejected, no crash."""
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items_with_one_lone_surrogate()) + "\n")
    out = tmp_path / "out"
    Runner(
        Pipeline("t", [ExportCheck(check_images=False)]),
        str(path),
        str(out),
        input_format="llava_json",
        progress=False,
    ).run()
    assert rejected_reasons(out / "00-ingest") == {
        "r16": (
            "llava_json: bad record (x.jsonl line 17: conversations[1].value is not valid "
            "UTF-8: lone surrogate)"
        )
    }
    assert table(out / "00-ingest").num_rows == 23
    assert table(out / "01-export_check").num_rows == 23
