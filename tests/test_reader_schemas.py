"""Schemas reconciled or refused, never guessed; a bad Parquet file or row group skipped only when
asked. Every file is written here, so the counts and values expected come from the inputs.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crafted_images import png

from warren.stages.readers import InputError, LlavaJsonReader, ParquetReader
from warren.stages.schema import IMAGE_TYPE, REJECT_COLUMN, conform


def read_all(reader) -> pa.Table:
    units = reader.plan()
    reader = pickle.loads(pickle.dumps(reader))
    tables = [t for u in units for t in reader.read(u)]
    assert all(t.schema.equals(tables[0].schema) for t in tables)
    assert conform(tables[0]).schema.equals(tables[0].schema)
    return pa.concat_tables(tables)


def canonical_file(path: Path, ids: list[str]) -> None:
    images = pa.array(
        [[{"bytes": png(i), "path": None}] for i in range(len(ids))], pa.list_(IMAGE_TYPE)
    )
    pq.write_table(
        pa.table({"id": ids, "images": images, "caption": [f"c {i}" for i in ids]}), path
    )


def test_a_file_with_image_and_text_columns_beside_canonical_files_is_mapped_and_reported(
    tmp_path, caplog
):
    canonical_file(tmp_path / "a.parquet", ["a1", "a2"])
    pq.write_table(
        pa.table(
            {"id": ["b1", "b2", "b3"], "image": [png(7), png(8), png(9)], "text": ["x", "y", "z"]}
        ),
        tmp_path / "b.parquet",
    )
    # img2dataset's parquet names: key, jpg, txt, URL (the LAION spelling)
    pq.write_table(
        pa.table({"key": ["000"], "jpg": [png(5)], "txt": ["w"], "URL": ["http://w"]}),
        tmp_path / "c.parquet",
    )
    reader = ParquetReader(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="warren.stages.readers.parquet"):
        table = read_all(reader)
    assert table.num_rows == 6
    assert table.column(REJECT_COLUMN).null_count == 6
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["b2"]["images"] == [{"bytes": png(8), "path": None}]
    assert rows["b2"]["caption"] == "y"
    assert rows["000"]["images"] == [{"bytes": png(5), "path": None}]
    assert (rows["000"]["caption"], rows["000"]["url"]) == ("w", "http://w")
    assert {"image", "text", "jpg", "txt", "key", "URL"}.isdisjoint(table.column_names)
    assert reader.describe()["aliases"] == {
        "b.parquet": {"image": "images", "text": "caption"},
        "c.parquet": {"key": "id", "jpg": "images", "txt": "caption", "URL": "url"},
    }
    logged = caplog.text
    assert "b.parquet: reading column 'image' as 'images'" in logged
    assert "c.parquet: reading column 'txt' as 'caption'" in logged
    assert "a.parquet" not in logged


def test_a_file_whose_columns_do_not_map_is_refused_naming_file_columns_and_option(tmp_path):
    canonical_file(tmp_path / "a.parquet", ["a1"])
    pq.write_table(
        pa.table({"picture_data": [png(1)], "description": ["d"]}), tmp_path / "odd.parquet"
    )
    with pytest.raises(InputError) as err:
        ParquetReader(str(tmp_path)).plan()
    message = str(err.value)
    for part in ("odd.parquet", "picture_data (binary)", "description (string)", "columns"):
        assert part in message, message
    table = read_all(
        ParquetReader(str(tmp_path), columns={"images": "picture_data", "caption": "description"})
    )
    assert table.num_rows == 2 and table.column(REJECT_COLUMN).null_count == 2


def test_bytes_that_nothing_maps_to_images_are_refused_unless_dropped(tmp_path):
    pq.write_table(
        pa.table({"id": ["x"], "caption": ["c"], "thumb": [png(2)]}), tmp_path / "t.parquet"
    )
    with pytest.raises(InputError, match=r"t\.parquet.*'thumb'.*images.*drop_columns"):
        ParquetReader(str(tmp_path)).plan()
    table = read_all(ParquetReader(str(tmp_path), drop_columns=["thumb"]))
    assert table.column("images").to_pylist() == [[]]
    assert "thumb" not in table.column_names


def test_two_aliases_for_one_column_are_refused_not_guessed(tmp_path):
    canonical_file(tmp_path / "a.parquet", ["a1"])
    pq.write_table(
        pa.table({"img": [png(1)], "txt": ["short"], "text": ["long"]}), tmp_path / "two.parquet"
    )
    with pytest.raises(InputError, match=r"two\.parquet.*\['txt', 'text'\].*'caption'"):
        ParquetReader(str(tmp_path)).plan()
    table = read_all(ParquetReader(str(tmp_path / "two.parquet"), columns={"caption": "text"}))
    assert table.column("caption").to_pylist() == ["long"]
    assert table.column("txt").to_pylist() == ["short"]  # kept, under its own name


def test_an_unreadable_parquet_file_stops_before_work_or_is_a_rejected_row_when_asked(tmp_path):
    canonical_file(tmp_path / "a.parquet", ["a1", "a2"])
    canonical_file(tmp_path / "c.parquet", ["c1"])
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"b\.parquet.*skip_bad_files=true"):
        ParquetReader(str(tmp_path)).plan()
    table = read_all(ParquetReader(str(tmp_path), skip_bad_files=True))
    assert table.num_rows == 4
    bad = [r for r in table.to_pylist() if r[REJECT_COLUMN]]
    assert len(bad) == 1
    assert bad[0][REJECT_COLUMN].startswith("parquet: unreadable file (")
    assert "b.parquet" in bad[0][REJECT_COLUMN]
    assert sorted(r["id"] for r in table.to_pylist() if not r[REJECT_COLUMN]) == ["a1", "a2", "c1"]


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the first column chunk of row group `group` with 0xFF bytes."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_an_error_naming_it_or_one_rejected_row_per_row_when_asked(
    tmp_path,
):
    path = tmp_path / "rg.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(9)], "caption": [f"c{i}" for i in range(9)]})
    pq.write_table(table, path, row_group_size=3)
    corrupt_row_group(path, 1)
    reader = ParquetReader(str(path))
    unit = reader.plan()[0]
    with pytest.raises(InputError, match=r"rg\.parquet: row group 2 of 3 .*skip_bad_files"):
        list(reader.read(unit))
    got = read_all(ParquetReader(str(path), skip_bad_files=True, batch_size=2))
    assert got.num_rows == 9
    kept = [r["id"] for r in got.to_pylist() if not r[REJECT_COLUMN]]
    assert kept == ["r0", "r1", "r2", "r6", "r7", "r8"]
    reasons = [r[REJECT_COLUMN] for r in got.to_pylist() if r[REJECT_COLUMN]]
    assert len(reasons) == 3 and len(set(got.column("id").to_pylist())) == 9
    assert all(
        r.startswith("parquet: unreadable row group (") and "rg.parquet row group 2 of 3" in r
        for r in reasons
    )


def test_a_warren_output_reads_back_with_its_edits(tmp_path):
    (tmp_path / "a.png").write_bytes(png(4))
    (tmp_path / "in.json").write_text(
        '[{"id": "x", "image": "a.png", "conversations": '
        '[{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]}]'
    )
    first = read_all(LlavaJsonReader(str(tmp_path / "in.json")))
    edits = ["role 'user' -> 'human' (turn 1)", "inserted <image> in turn 1"]
    assert first.column("edits").to_pylist() == [edits]
    pq.write_table(first.drop_columns([REJECT_COLUMN]), tmp_path / "out.parquet")
    again = read_all(ParquetReader(str(tmp_path / "out.parquet")))
    assert again.column("edits").to_pylist() == [edits]  # kept, and nothing new to edit
    assert again.column("conversations").to_pylist() == first.column("conversations").to_pylist()


def test_text_that_is_not_utf8_in_parquet_rejects_its_row_naming_file_and_row(tmp_path):
    # Parquet does not check that strings are UTF-8; this file holds the byte 0xff in a caption
    # and in a turn, as a broken writer would leave them.
    captions = pa.array([b"ok", b"bad \xff caption", b"fine", b"also ok"]).view(pa.string())
    turn = pa.struct([("from", pa.binary()), ("value", pa.binary())])
    turns = pa.array(
        [
            None,
            None,
            None,
            [{"from": b"human", "value": b"q \xfe"}, {"from": b"gpt", "value": b"a"}],
        ],
        pa.list_(turn),
    ).cast(pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])), safe=False)
    pq.write_table(
        pa.table({"id": ["a", "b", "c", "d"], "caption": captions, "conversations": turns}),
        tmp_path / "u.parquet",
        row_group_size=2,
    )
    got = read_all(ParquetReader(str(tmp_path / "u.parquet"), batch_size=1))
    assert got.num_rows == 4
    rows = {r["id"]: r for r in got.to_pylist()}  # to_pylist itself would fail on bad UTF-8
    where = str(tmp_path / "u.parquet")
    assert {k: r[REJECT_COLUMN] for k, r in rows.items() if r[REJECT_COLUMN]} == {
        "b": f"parquet: bad record ({where} row 2: caption is not valid UTF-8)",
        "d": f"parquet: bad record ({where} row 4: conversations is not valid UTF-8)",
    }
    assert rows["b"]["caption"] == "bad \ufffd caption"
    assert rows["d"]["conversations"][0]["value"] == "q \ufffd"


def test_bad_utf8_inside_an_image_path_rejects_its_row_and_leaves_the_image_bytes_alone(tmp_path):
    # The image struct holds binary bytes beside a string path: only the path is text.
    as_bytes = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.binary())]))
    images = pa.array(
        [
            [{"bytes": png(1), "path": b"ok.png"}],
            [{"bytes": png(2), "path": b"bad\xff.png"}],
        ],
        as_bytes,
    ).cast(pa.list_(IMAGE_TYPE), safe=False)
    pq.write_table(
        pa.table({"id": ["a", "b"], "images": images, "caption": ["c a", "c b"]}),
        tmp_path / "p.parquet",
    )
    got = read_all(ParquetReader(str(tmp_path / "p.parquet")))
    rows = {r["id"]: r for r in got.to_pylist()}  # to_pylist itself would fail on bad UTF-8
    where = str(tmp_path / "p.parquet")
    assert rows["a"][REJECT_COLUMN] is None
    assert rows["b"][REJECT_COLUMN] == (
        f"parquet: bad record ({where} row 2: images is not valid UTF-8)"
    )
    assert rows["b"]["images"] == [{"bytes": png(2), "path": "bad\ufffd.png"}]


def test_a_null_turn_is_a_rejected_row_not_a_failed_file(tmp_path):
    turns = pa.array(
        [
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            [{"from": "human", "value": "q"}, None],
        ],
        pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
    )
    pq.write_table(pa.table({"id": ["a", "b"], "conversations": turns}), tmp_path / "t.parquet")
    got = read_all(ParquetReader(str(tmp_path / "t.parquet")))
    rows = {r["id"]: r for r in got.to_pylist()}
    assert rows["a"][REJECT_COLUMN] is None
    # Arrow reads a null struct's fields as nulls: a turn with no role
    assert rows["b"][REJECT_COLUMN] == "parquet: unknown role (turn 2 is None)"


def test_a_mapped_column_that_no_file_has_is_refused_not_read_as_the_canonical_one(tmp_path):
    canonical_file(tmp_path / "a.parquet", ["a1", "a2"])
    canonical_file(tmp_path / "b.parquet", ["b1"])
    with pytest.raises(InputError, match=r"'alt_txt' \(for 'caption'\), which no input file has"):
        ParquetReader(str(tmp_path), columns={"caption": "alt_txt"}).plan()
    # A column that some files have and others lack is a difference between files: read.
    pq.write_table(
        pa.table(
            {
                "id": ["c1"],
                "alt_txt": ["from alt"],
                "images": pa.array([[{"bytes": png(9), "path": None}]], pa.list_(IMAGE_TYPE)),
            }
        ),
        tmp_path / "c.parquet",
    )
    got = read_all(ParquetReader(str(tmp_path), columns={"caption": "alt_txt"}))
    assert dict(
        zip(got.column("id").to_pylist(), got.column("caption").to_pylist(), strict=True)
    ) == {"a1": "c a1", "a2": "c a2", "b1": "c b1", "c1": "from alt"}
