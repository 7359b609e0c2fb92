"""The canonical schema: one definition, clear errors, and a layout `datasets` reads as images."""

from __future__ import annotations

import io

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from warren.stages.schema import SchemaError, conform, embedding_type, rows_to_table, validate


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_column_of_the_wrong_type_is_named_with_the_expected_type():
    t = pa.table({"id": ["a"], "caption": pa.array([3], pa.int64())})
    with pytest.raises(
        SchemaError, match=r"shard-7\.parquet: column 'caption' has type int64, expected string"
    ):
        validate(t, where="shard-7.parquet")
    with pytest.raises(SchemaError, match="missing required column 'id'"):
        validate(pa.table({"caption": ["x"]}))
    with pytest.raises(SchemaError, match="image_emb.*fixed_size_list<float16>"):
        validate(
            pa.table({"id": ["a"], "image_emb": pa.array([[0.1, 0.2]], pa.list_(pa.float32()))})
        )


def test_conform_adds_missing_core_columns_and_casts_only_what_is_lossless():
    t = conform(pa.table({"id": pa.array(["a", "b"], pa.large_string()), "extra": [1, 2]}))
    assert t.column_names[:7] == [
        "id",
        "images",
        "caption",
        "conversations",
        "source",
        "url",
        "license",
    ]
    assert t.schema.field("id").type == pa.string()
    assert t.column("extra").to_pylist() == [1, 2]
    with pytest.raises(SchemaError, match="column 'width'"):
        conform(pa.table({"id": ["a"], "width": ["not a number"]}))


def test_canonical_rows_round_trip_through_parquet_and_datasets_as_images(tmp_path):
    rows = [
        {
            "id": "r1",
            "images": [{"bytes": _jpeg(40, 30), "path": "r1.jpg"}],
            "caption": "a red square",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
            ],
            "source": "unit",
        },
        {
            "id": "r2",
            "images": [],
            "caption": None,
            "conversations": [{"from": "human", "value": "Hi"}],
        },
    ]
    table = rows_to_table(rows)
    emb = pa.FixedSizeListArray.from_arrays(pa.array([0.5, 0.5, 0.0, 1.0], pa.float16()), 2)
    table = conform(table.append_column("image_emb", emb))
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    validate(back)
    assert back.to_pylist() == table.to_pylist()
    assert back.schema.field("image_emb").type == embedding_type(2)

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    first = ds[0]
    assert first["images"][0].size == (40, 30)
    assert first["conversations"][1] == {"from": "gpt", "value": "Red."}
    assert ds[1]["images"] == [] and ds[1]["id"] == "r2"
