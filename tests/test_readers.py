"""Readers: each input format becomes canonical rows, bad rows kept with a reason, never dropped.

Every input is built here (images made with PIL), so the expected values come from the inputs.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from warren.stages.readers import (
    READERS,
    HFDatasetsReader,
    ImageFolderReader,
    Img2DatasetReader,
    InputError,
    LlavaJsonReader,
    ParquetReader,
    detect_format,
    get_reader,
)
from warren.stages.schema import IMAGE_TYPE, REJECT_COLUMN, conform, content_id

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def image_bytes(width: int, height: int, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def read_all(reader) -> pa.Table:
    """Plan, read every unit (in a pickled copy, as a Ray task would), check, concatenate."""
    tables = []
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    for unit in units:
        for table in reader.read(unit):
            assert conform(table).schema.equals(table.schema)
            assert REJECT_COLUMN in table.column_names
            tables.append(table)
    return pa.concat_tables(tables)


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), ids
    return {r["id"]: r for r in rows}


def kept(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if r[REJECT_COLUMN] is None]


def reasons(table: pa.Table) -> dict[str, str]:
    return {r["id"]: r[REJECT_COLUMN] for r in table.to_pylist() if r[REJECT_COLUMN] is not None}


# ----------------------------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def alt_text_shards(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two shards of an alt-text dataset with non-canonical column names and integer ids."""
    folder = tmp_path / "laion_part"
    folder.mkdir()
    imgs = {
        "1": image_bytes(8, 6),
        "2": image_bytes(5, 7, (0, 90, 0)),
        "3": image_bytes(4, 4, (0, 0, 99)),
    }
    pq.write_table(
        pa.table(
            {
                "key": pa.array([1, 2], pa.int64()),
                "TEXT": ["a red square", None],
                "URL": ["http://x/1.png", "http://x/2.png"],
                "jpg": [imgs["1"], imgs["2"]],
                "score": [0.5, 0.25],
            }
        ),
        folder / "part-0.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "key": pa.array([3, 4], pa.int64()),
                "TEXT": ["a blue square", "no image here"],
                "URL": ["http://x/3.png", None],
                "jpg": pa.array([imgs["3"], None], pa.binary()),
                "score": [0.75, 1.0],
            }
        ),
        folder / "part-1.parquet",
    )
    return folder, imgs


def test_parquet_folder_maps_columns_keeps_extras_and_turns_integer_ids_into_strings(
    alt_text_shards,
):
    folder, imgs = alt_text_shards
    reader = ParquetReader(
        str(folder), columns={"id": "key", "caption": "TEXT", "url": "URL", "images": "jpg"}
    )
    assert len(reader.plan()) == 2
    table = read_all(reader)
    assert table.num_rows == 4
    assert table.schema.field("id").type == pa.string()
    rows = rows_by_id(table)
    assert sorted(rows) == ["1", "2", "3", "4"]
    for key, data in imgs.items():
        assert rows[key]["images"] == [{"bytes": data, "path": None}]
    assert rows["4"]["images"] == []
    assert rows["1"]["caption"] == "a red square"
    assert rows["2"]["caption"] is None  # left for a later stage to reject
    assert rows["3"]["url"] == "http://x/3.png"
    assert rows["3"]["score"] == 0.75  # unmapped column kept
    assert {"key", "TEXT", "URL", "jpg"}.isdisjoint(table.column_names)
    assert set(table.column("source").to_pylist()) == {"laion_part"}
    assert table.column(REJECT_COLUMN).null_count == 4


def test_parquet_without_id_column_gets_content_ids_from_image_bytes_and_caption(tmp_path: Path):
    a, b = image_bytes(3, 3), image_bytes(6, 2, (1, 2, 3))
    path = tmp_path / "hf.parquet"
    image = pa.array([{"bytes": a, "path": "a.png"}, {"bytes": b, "path": "b.png"}], IMAGE_TYPE)
    pq.write_table(pa.table({"image": image, "caption": ["first", "second"]}), path)
    table = read_all(ParquetReader(str(path), source="mine"))
    assert table.column("id").to_pylist() == [content_id(a, "first"), content_id(b, "second")]
    assert table.column("images").to_pylist() == [
        [{"bytes": a, "path": "a.png"}],
        [{"bytes": b, "path": "b.png"}],
    ]
    assert set(table.column("source").to_pylist()) == {"mine"}


def test_parquet_image_lists_and_role_content_messages_become_images_and_conversations(
    tmp_path: Path,
):
    a, b = image_bytes(3, 3), image_bytes(2, 5)
    images = pa.array(
        [[{"bytes": a, "path": "a.png"}, {"bytes": b, "path": "b.png"}], []], pa.list_(IMAGE_TYPE)
    )
    messages = [
        [
            {"role": "user", "content": "<image><image>\nCompare."},
            {"role": "assistant", "content": "Same."},
        ],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "images": images, "messages": messages}), path)
    rows = rows_by_id(read_all(ParquetReader(f"file://{path}")))
    assert [i["bytes"] for i in rows["x"]["images"]] == [a, b]
    assert rows["y"]["images"] == []
    assert rows["x"]["conversations"] == [
        {"from": "human", "value": "<image><image>\nCompare."},
        {"from": "gpt", "value": "Same."},
    ]
    assert [t["from"] for t in rows["y"]["conversations"]] == ["system", "human"]


def test_parquet_reader_accepts_file_uris(alt_text_shards):
    folder, imgs = alt_text_shards
    reader = ParquetReader(
        folder.as_uri(), columns={"id": "key", "caption": "TEXT", "images": "jpg"}
    )
    rows = rows_by_id(read_all(reader))
    assert rows["1"]["images"][0]["bytes"] == imgs["1"]


def test_unreadable_parquet_file_is_an_input_error_naming_the_file(alt_text_shards):
    folder, _ = alt_text_shards
    (folder / "part-2.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match="part-2.parquet"):
        ParquetReader(str(folder), columns={"caption": "TEXT"}).plan()


@pytest.mark.parametrize(
    ("values", "found"),
    [(pa.array([1, 2], pa.int64()), "int64"), (pa.array([["a"], ["b"]]), "list")],
)
def test_caption_of_wrong_type_is_an_input_error_naming_file_column_and_types(
    tmp_path: Path, values, found
):
    pq.write_table(pa.table({"id": ["a", "b"], "TEXT": values}), tmp_path / "bad_types.parquet")
    with pytest.raises(InputError) as err:
        ParquetReader(str(tmp_path), columns={"caption": "TEXT"}).plan()
    message = str(err.value)
    for part in ("bad_types.parquet", "'TEXT'", "caption", found, "expected string"):
        assert part in message


def test_missing_mapped_column_is_an_input_error(tmp_path: Path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="'TEXT'.*not found"):
        ParquetReader(str(tmp_path), columns={"caption": "TEXT"}).plan()


# ----------------------------------------------------------------------------------------------
# img2dataset
# ----------------------------------------------------------------------------------------------

I2D_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ]
)


def _i2d_meta(key: str, ok: bool, error: str | None = None, size=(8, 6)) -> dict:
    return {
        "url": f"http://img/{key}.jpg",
        "caption": f"caption {key}",
        "key": key,
        "status": "success" if ok else "failed_to_download",
        "error_message": error,
        "width": size[0] if ok else None,
        "height": size[1] if ok else None,
        "original_width": size[0] * 4 if ok else None,
        "original_height": size[1] * 4 if ok else None,
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def img2dataset_tars(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two webdataset shards: 3 downloaded samples, 2 failed ones only in the metadata Parquet."""
    folder = tmp_path / "cc_out"
    folder.mkdir()
    shards = {
        "00000": [
            ("000000000", True, None),
            ("000000001", False, "HTTP Error 404"),
            ("000000002", True, None),
        ],
        "00001": [("000010000", True, None), ("000010001", False, "timeout")],
    }
    imgs = {}
    for shard, samples in shards.items():
        metas = []
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            for i, (key, ok, error) in enumerate(samples):
                meta = _i2d_meta(key, ok, error, size=(6 + i, 5))
                metas.append(meta)
                if ok:
                    imgs[key] = image_bytes(6 + i, 5, fmt="JPEG")
                    _add(tar, f"{key}.jpg", imgs[key])
                    _add(tar, f"{key}.txt", meta["caption"].encode())
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
        pq.write_table(pa.Table.from_pylist(metas, I2D_SCHEMA), folder / f"{shard}.parquet")
        (folder / f"{shard}_stats.json").write_text("{}")
    return folder, imgs


def test_img2dataset_tars_are_read_and_failed_downloads_become_rejected_rows(img2dataset_tars):
    folder, imgs = img2dataset_tars
    reader = Img2DatasetReader(str(folder))
    assert [u.key for u in reader.plan()] == ["00000.tar", "00001.tar"]
    table = read_all(reader)
    assert table.num_rows == 5
    rows = rows_by_id(table)
    assert reasons(table) == {
        "000000001": "download: failed (HTTP Error 404)",
        "000010001": "download: failed (timeout)",
    }
    for key, data in imgs.items():
        assert rows[key]["images"] == [{"bytes": data, "path": f"{key}.jpg"}]
        assert rows[key]["caption"] == f"caption {key}"
        assert rows[key]["url"] == f"http://img/{key}.jpg"
    assert rows["000000002"]["width"] == 8 and rows["000000002"]["original_width"] == 32
    assert rows["000000001"]["url"] == "http://img/000000001.jpg"
    assert rows["000000001"]["images"] == []
    assert table.schema.field("original_width").type == pa.int32()
    assert set(table.column("source").to_pylist()) == {"cc_out"}


def test_img2dataset_metadata_whose_tar_is_missing_is_accounted_as_rejected_rows(img2dataset_tars):
    folder, _ = img2dataset_tars
    (folder / "00001.tar").unlink()
    table = read_all(Img2DatasetReader(str(folder)))
    assert table.num_rows == 5
    assert reasons(table) == {
        "000000001": "download: failed (HTTP Error 404)",
        "000010000": "img2dataset: missing image (00001.tar not found)",
        "000010001": "download: failed (timeout)",
    }


def test_img2dataset_parquet_output_format_is_read_with_image_bytes(tmp_path: Path):
    folder = tmp_path / "i2d_parquet"
    folder.mkdir()
    a, b = image_bytes(4, 3, fmt="JPEG"), image_bytes(3, 4, fmt="JPEG")
    metas = [
        _i2d_meta("000000000", True),
        _i2d_meta("000000001", False, "Connection refused"),
        _i2d_meta("000000002", True),
    ]
    table = pa.Table.from_pylist(metas, I2D_SCHEMA).append_column(
        "jpg", pa.array([a, None, b], pa.binary())
    )
    pq.write_table(table, folder / "00000.parquet")
    assert detect_format(str(folder)) == "img2dataset"
    out = read_all(get_reader("img2dataset", str(folder)))
    rows = rows_by_id(out)
    assert out.num_rows == 3
    assert reasons(out) == {"000000001": "download: failed (Connection refused)"}
    assert rows["000000000"]["images"] == [{"bytes": a, "path": "000000000.jpg"}]
    assert rows["000000002"]["images"][0]["bytes"] == b
    assert rows["000000002"]["original_height"] == 24
    assert {"status", "error_message", "key", "jpg"}.isdisjoint(out.column_names)


def test_img2dataset_metadata_without_images_or_tars_is_an_input_error(tmp_path: Path):
    pq.write_table(
        pa.Table.from_pylist([_i2d_meta("0", True)], I2D_SCHEMA), tmp_path / "00000.parquet"
    )
    with pytest.raises(InputError, match="00000.parquet.*no image column"):
        Img2DatasetReader(str(tmp_path)).plan()


# ----------------------------------------------------------------------------------------------
# llava_json
# ----------------------------------------------------------------------------------------------


def _conv(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def llava_data(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    imgs = {
        "coco/a.jpg": image_bytes(8, 6, fmt="JPEG"),
        "b.png": image_bytes(5, 9),
        "c.png": image_bytes(2, 2),
    }
    for rel, data in imgs.items():
        (root / rel).write_bytes(data)
    (tmp_path / "secret.jpg").write_bytes(b"outside the root")
    items = [
        {
            "id": 7,
            "image": "coco/a.jpg",
            "conversations": _conv("<image>\nWhat is this?", "A square."),
        },
        {"id": "no-marker", "image": "b.png", "conversations": _conv("Describe it.")},
        {"id": "text-only", "conversations": _conv("What is 2+2?", "4")},
        {"id": "escape", "image": "../secret.jpg", "conversations": _conv("<image>\nQ")},
        {
            "id": "absolute",
            "image": str(tmp_path / "secret.jpg"),
            "conversations": _conv("<image>\nQ"),
        },
        {"id": "missing", "image": "coco/nope.jpg", "conversations": _conv("<image>\nQ")},
        {
            "id": "two",
            "image": ["coco/a.jpg", "c.png"],
            "conversations": _conv("<image>\n<image>\nCompare."),
        },
        {"id": "too-many-markers", "image": "b.png", "conversations": _conv("<image>\n<image>\nQ")},
        {"id": "marker-no-image", "conversations": _conv("<image>\nQ")},
        {"id": "bad-turn", "image": "b.png", "conversations": [{"from": "human", "value": 5}]},
        "not an item",
        {"image": "c.png", "conversations": _conv("<image>\nNo id.")},
    ]
    path = tmp_path / "llava_mix.json"
    path.write_text(json.dumps(items))
    return path, root, imgs


def test_llava_json_reads_images_under_the_root_and_rejects_bad_items_with_reasons(llava_data):
    path, root, imgs = llava_data
    table = read_all(LlavaJsonReader(str(path), image_root=str(root)))
    assert table.num_rows == 12
    rows = rows_by_id(table)
    assert rows["7"]["images"] == [{"bytes": imgs["coco/a.jpg"], "path": "coco/a.jpg"}]
    assert rows["7"]["conversations"] == _conv("<image>\nWhat is this?", "A square.")
    assert rows["no-marker"]["conversations"][0]["value"] == "<image>\nDescribe it."
    assert rows["text-only"]["images"] == []
    assert [i["bytes"] for i in rows["two"]["images"]] == [imgs["coco/a.jpg"], imgs["c.png"]]
    turns = json.dumps([["human", "<image>\nNo id."], ["gpt", "An answer."]], separators=(",", ":"))
    no_id = content_id(imgs["c.png"], None, turns)  # image bytes, caption, turns (row_content_id)
    assert rows[no_id]["images"][0]["path"] == "c.png"
    got = reasons(table)
    malformed = [
        k
        for k, v in got.items()
        if v.startswith("llava_json: malformed item (llava_mix.json record 11: item is str")
    ]
    assert len(malformed) == 1
    assert {k: v for k, v in got.items() if k not in malformed} == {
        "escape": "llava_json: image path escapes root (../secret.jpg)",
        "absolute": f"llava_json: image path escapes root ({path.parent / 'secret.jpg'})",
        "missing": "llava_json: image not found (coco/nope.jpg)",
        "too-many-markers": "llava_json: image marker mismatch (2 markers, 1 images)",
        "marker-no-image": "llava_json: image marker mismatch (1 markers, 0 images)",
        "bad-turn": (
            "llava_json: malformed turn (llava_mix.json record 10: turn 1 value is int, "
            "expected a string)"
        ),
    }
    assert all(i["bytes"] != b"outside the root" for r in table.to_pylist() for i in r["images"])
    assert set(table.column("source").to_pylist()) == {"llava_mix"}


def test_llava_jsonl_is_streamed_and_a_broken_line_is_a_rejected_row(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(image_bytes(3, 3))
    lines = [
        json.dumps({"id": 1, "image": "x.png", "conversations": _conv("<image>\nQ")}),
        '{"id": 2, "conversations": [',
        json.dumps({"id": 3, "conversations": _conv("Q")}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = read_all(LlavaJsonReader(path.as_uri()))  # image_root defaults to the file's folder
    assert table.num_rows == 3
    assert [r["id"] for r in kept(table)] == ["1", "3"]
    (reason,) = reasons(table).values()
    assert reason.startswith("llava_json: malformed item (data.jsonl line 2: invalid JSON")


def test_llava_json_that_is_not_json_is_an_input_error_naming_the_file(tmp_path: Path):
    (tmp_path / "broken.json").write_text('[{"id": 1}, ')
    with pytest.raises(InputError, match="broken.json"):
        LlavaJsonReader(str(tmp_path / "broken.json")).plan()


# ----------------------------------------------------------------------------------------------
# image_folder
# ----------------------------------------------------------------------------------------------


def test_image_folder_reads_sidecars_in_chunks_and_rejects_missing_or_undecodable_captions(
    tmp_path: Path,
):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    imgs = {
        "a.jpg": image_bytes(7, 5, fmt="JPEG"),
        "sub/b.png": image_bytes(4, 4),
        "c.webp": image_bytes(3, 6, fmt="WEBP"),
        "d.png": image_bytes(2, 3),
    }
    for rel, data in imgs.items():
        (folder / rel).write_bytes(data)
    (folder / "a.txt").write_text("a photo of a square\n")
    (folder / "sub/b.txt").write_text("another square")
    meta = {
        "url": "http://b",
        "license": "cc-by",
        "source": "flickr",
        "photographer": "kim",
        "tags": ["x"],
    }
    (folder / "sub/b.json").write_text(json.dumps(meta))
    (folder / "d.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    reader = ImageFolderReader(str(folder), chunk_size=3, metadata_columns=["photographer"])
    assert len(reader.plan()) == 2
    table = read_all(reader)
    assert table.num_rows == 4
    rows = rows_by_id(table)
    assert sorted(rows) == ["a", "c", "d", "sub/b"]
    for rel, data in imgs.items():
        assert rows[rel.rsplit(".", 1)[0]]["images"] == [{"bytes": data, "path": rel}]
    assert rows["a"]["caption"] == "a photo of a square"
    assert rows["sub/b"]["url"] == "http://b" and rows["sub/b"]["license"] == "cc-by"
    assert rows["sub/b"]["photographer"] == "kim" and rows["a"]["photographer"] is None
    assert (
        json.loads(rows["sub/b"]["metadata"]) == {"tags": ["x"]} and rows["a"]["metadata"] is None
    )
    assert rows["sub/b"]["source"] == "flickr" and rows["a"]["source"] == "photos"
    assert reasons(table) == {
        "c": "image_folder: missing caption (c.txt)",
        "d": "image_folder: caption not UTF-8 (d.txt)",
    }


# ----------------------------------------------------------------------------------------------
# hf_datasets
# ----------------------------------------------------------------------------------------------


def test_hf_save_to_disk_folder_maps_image_feature_and_messages(tmp_path: Path):
    import datasets

    a, b = image_bytes(6, 4), image_bytes(3, 7)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Image(),
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "id": [10, 11],
            "image": [{"bytes": a, "path": "a.png"}, {"bytes": b, "path": "b.png"}],
            "messages": [
                [
                    {"role": "user", "content": "<image>\nColour?"},
                    {"role": "assistant", "content": "Red."},
                ],
                [
                    {"role": "user", "content": "<image>\nSize?"},
                    {"role": "assistant", "content": "Small."},
                ],
            ],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "hf_chat"))
    assert detect_format(str(tmp_path / "hf_chat")) == "hf_datasets"
    rows = rows_by_id(read_all(HFDatasetsReader(str(tmp_path / "hf_chat"))))
    assert sorted(rows) == ["10", "11"]
    assert rows["10"]["images"] == [{"bytes": a, "path": "a.png"}]
    assert rows["11"]["images"][0]["bytes"] == b
    assert rows["10"]["conversations"] == [
        {"from": "human", "value": "<image>\nColour?"},
        {"from": "gpt", "value": "Red."},
    ]
    assert "messages" not in rows["10"] and "image" not in rows["10"]


def test_hf_dataset_dict_needs_a_split_and_reads_sequences_of_images(tmp_path: Path):
    import datasets

    imgs = [image_bytes(2 + i, 3) for i in range(3)]
    features = datasets.Features(
        {"pics": datasets.List(datasets.Image()), "text": datasets.Value("string")}
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {
                "pics": [[{"bytes": b, "path": None} for b in r[0]] for r in rows],
                "text": [r[1] for r in rows],
            },
            features=features,
        )

    dd = datasets.DatasetDict(
        {
            "train": split([([imgs[0], imgs[1]], "two")]),
            "test": split([([imgs[2]], "one"), ([], "none")]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="split"):
        HFDatasetsReader(str(tmp_path / "dd"), columns={"caption": "text"}).plan()
    table = read_all(
        get_reader(None, str(tmp_path / "dd"), columns={"caption": "text"}, split="test")
    )
    assert table.column("caption").to_pylist() == ["one", "none"]
    assert [[i["bytes"] for i in r] for r in table.column("images").to_pylist()] == [[imgs[2]], []]
    assert table.column("id").to_pylist() == [content_id(imgs[2], "one"), content_id("none")]


# ----------------------------------------------------------------------------------------------
# registry, detection, round trip
# ----------------------------------------------------------------------------------------------


def test_get_reader_rejects_an_unknown_format_listing_the_known_ones(tmp_path: Path):
    with pytest.raises(InputError) as err:
        get_reader("csv", str(tmp_path))
    for name in READERS:
        assert name in str(err.value)


def test_detect_format_recognises_each_layout(
    alt_text_shards, img2dataset_tars, llava_data, tmp_path: Path
):
    assert detect_format(str(alt_text_shards[0])) == "parquet"
    assert detect_format(str(img2dataset_tars[0])) == "img2dataset"
    assert detect_format(str(llava_data[0])) == "llava_json"
    assert detect_format(str(llava_data[1])) == "image_folder"


def test_canonical_rows_load_in_hf_datasets_as_images(llava_data, tmp_path: Path):
    import datasets

    path, root, _ = llava_data
    table = pa.Table.from_pylist(kept(read_all(LlavaJsonReader(str(path), image_root=str(root)))))
    out = tmp_path / "rows.parquet"
    pq.write_table(conform(table), out)
    ds = datasets.load_dataset(
        "parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    row = ds[ds["id"].index("7")]
    assert row["images"][0].size == (8, 6)
    assert row["conversations"][0]["value"].count("<image>") == len(row["images"])


def test_parquet_files_with_differing_extra_columns_read_into_one_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from warren.stages.readers import get_reader

    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(
        pa.table({"id": ["a"], "caption": ["x"], "score": pa.array([1], pa.int32())}),
        pool / "1.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["b"],
                "caption": pa.array(["y"]).dictionary_encode(),
                "score": pa.array([2.5], pa.float64()),
                "lang": ["en"],
            }
        ),
        pool / "2.parquet",
    )
    reader = get_reader("parquet", str(pool))
    tables = [t for u in reader.plan() for t in reader.read(u)]
    assert tables[0].schema == tables[1].schema
    rows = pa.concat_tables(tables).to_pylist()
    assert [(r["id"], r["caption"], r["score"], r["lang"]) for r in rows] == [
        ("a", "x", 1.0, None),
        ("b", "y", 2.5, "en"),
    ]

    pq.write_table(pa.table({"id": ["c"], "score": ["high"]}), pool / "3.parquet")
    reader = get_reader("parquet", str(pool))
    with pytest.raises(InputError, match="3.parquet"):
        reader.plan()
