"""COCO reader: official captions/instances files become one row per image with captions and boxes.

Every input is a tiny COCO-format file written here, so expected values are worked by hand.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from warren.stages.readers import CocoReader, InputError, detect_format, get_reader
from warren.stages.readers.coco import BOX_TYPE
from warren.stages.schema import REJECT_COLUMN, conform


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def read_all(reader: CocoReader) -> pa.Table:
    """Plan, read each unit in a pickled copy with JSON-round-tripped options (as the runner does)."""
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    tables = []
    for unit in units:
        unit = type(unit)(unit.key, unit.path, json.loads(json.dumps(unit.options)))
        for table in reader.read(unit):
            assert conform(table).schema.equals(table.schema)
            tables.append(table)
    return pa.concat_tables(tables)


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


IMAGES = [
    # id, file, width, height
    (1, "000000000001.jpg", 200, 100),
    (2, "000000000002.jpg", 64, 32),
    (3, "000000000003.jpg", 40, 40),  # no captions
    (4, "000000000004.jpg", 40, 40),  # listed, but the file is not on disk
]


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """The official layout: annotations/{captions,instances}_val2017.json next to val2017/."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    files = {}
    for _, name, w, h in IMAGES[:3]:
        files[name] = jpeg(w, h)
        (tmp_path / "val2017" / name).write_bytes(files[name])
    images = [
        {
            "id": i,
            "file_name": name,
            "width": w,
            "height": h,
            "license": 1,
            "coco_url": f"http://images.cocodataset.org/val2017/{name}",
        }
        for i, name, w, h in IMAGES
    ]
    licenses = [{"id": 1, "name": "Attribution License", "url": "http://example.org/by"}]
    captions = {
        "info": {},
        "licenses": licenses,
        "images": list(reversed(images)),  # order in the file must not matter
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog on a couch. "},
            {"id": 11, "image_id": 2, "caption": "Two cups."},
            {"id": 12, "image_id": 1, "caption": "A brown dog resting."},
            {"id": 13, "image_id": 4, "caption": "Gone."},
        ],
    }
    instances = {
        "licenses": licenses,
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 47, "name": "cup"}],
        "annotations": [
            # 200x100 image: [50, 25, 100, 50] px -> corners (0.25, 0.25, 0.75, 0.75)
            {"id": 100, "image_id": 1, "category_id": 18, "bbox": [50, 25, 100, 50]},
            # overshoots the right border by a pixel: clipped to 1.0
            {"id": 101, "image_id": 1, "category_id": 47, "bbox": [150, 0, 51, 10]},
            # 64x32 image: [16, 8, 16, 16] px -> (0.25, 0.25, 0.5, 0.75)
            {"id": 102, "image_id": 2, "category_id": 47, "bbox": [16, 8, 16, 16]},
        ],
    }
    cap_path = tmp_path / "annotations" / "captions_val2017.json"
    inst_path = tmp_path / "annotations" / "instances_val2017.json"
    cap_path.write_text(json.dumps(captions))
    inst_path.write_text(json.dumps(instances))
    return cap_path, inst_path, tmp_path / "val2017", files


def test_coco_rows_carry_all_captions_and_boxes_normalised_to_exact_corners(coco):
    cap, inst, _, files = coco
    table = read_all(get_reader("coco", str(cap), instances=str(inst)))
    assert table.num_rows == 4
    assert table.schema.field("boxes").type == pa.list_(BOX_TYPE)
    assert table.schema.field("captions").type == pa.list_(pa.string())
    rows = by_id(table)
    one = rows["coco-1"]
    assert one[REJECT_COLUMN] is None
    assert one["caption"] == "A dog on a couch."
    assert one["captions"] == ["A dog on a couch.", "A brown dog resting."]
    assert one["images"] == [{"bytes": files["000000000001.jpg"], "path": "000000000001.jpg"}]
    assert one["boxes"] == [
        {"category": "dog", "x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.75},
        {"category": "cup", "x0": 0.75, "y0": 0.0, "x1": 1.0, "y1": 0.10000000149011612},
    ]
    assert (one["width"], one["height"]) == (200, 100)
    assert one["url"] == "http://images.cocodataset.org/val2017/000000000001.jpg"
    assert one["license"] == "Attribution License"
    assert one["source"] == "coco"
    assert rows["coco-2"]["boxes"] == [
        {"category": "cup", "x0": 0.25, "y0": 0.25, "x1": 0.5, "y1": 0.75}
    ]


def test_coco_images_without_captions_or_files_are_rejected_rows_with_reasons(coco):
    cap, inst, _, _ = coco
    rows = by_id(read_all(get_reader("coco", str(cap), instances=str(inst))))
    assert rows["coco-3"][REJECT_COLUMN] == "coco: image has no captions (image_id 3)"
    assert rows["coco-3"]["boxes"] == []
    assert rows["coco-4"][REJECT_COLUMN] == "coco: image not found (000000000004.jpg)"
    assert rows["coco-4"]["caption"] == "Gone."
    assert rows["coco-4"]["images"] == [{"bytes": None, "path": "000000000004.jpg"}]


def test_coco_without_instances_has_empty_boxes_and_chunks_into_units(coco):
    cap, _, root, _ = coco
    reader = get_reader("coco", str(cap), image_root=str(root), chunk_size=3)
    units = reader.plan()
    assert [len(u.options["image_ids"]) for u in units] == [3, 1]
    assert len({u.key for u in units}) == 2
    table = read_all(reader)
    assert sorted(table.column("id").to_pylist()) == ["coco-1", "coco-2", "coco-3", "coco-4"]
    assert all(b == [] for b in table.column("boxes").to_pylist())


def test_coco_annotation_for_an_unknown_image_is_an_input_error_naming_file_and_ids(coco):
    cap, inst, _, _ = coco
    data = json.loads(inst.read_text())
    data["annotations"].append({"id": 999, "image_id": 77, "category_id": 18, "bbox": [0, 0, 1, 1]})
    inst.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        get_reader("coco", str(cap), instances=str(inst)).plan()
    message = str(err.value)
    assert "instances_val2017.json" in message and "999" in message and "image_id 77" in message


def test_coco_captions_file_and_root_folder_are_detected(coco, tmp_path: Path):
    cap, _, _, _ = coco
    assert detect_format(str(cap)) == "coco"
    assert detect_format(str(tmp_path)) == "coco"
    other = tmp_path / "annotations" / "other.json"
    other.write_text("[]")
    assert detect_format(str(other)) == "llava_json"
    # a folder input finds its one captions file and the official image folder
    table = read_all(get_reader(None, str(tmp_path)))
    assert by_id(table)["coco-1"]["images"][0]["bytes"] is not None


def test_coco_instances_change_changes_the_fingerprint(coco):
    cap, inst, _, _ = coco
    before = get_reader("coco", str(cap), instances=str(inst)).fingerprint()
    inst.write_text(inst.read_text() + " ")
    assert get_reader("coco", str(cap), instances=str(inst)).fingerprint() != before
