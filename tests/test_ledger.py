"""The ledger: what makes a stage's output exact after retries and crashes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from warren.stages.base import reject
from warren.stages.exact_dedup import KEY_COLUMN, content_key, resolve_group
from warren.stages.ledger import commit_piece, complete_sources, prune_incomplete, read_ledger
from warren.stages.schema import rows_to_table
from warren.stages.shards import Location


def _table(ids: list[str]) -> pa.Table:
    t = rows_to_table([{"id": i, "caption": f"c{i}"} for i in ids])
    return reject(t, [i.endswith("9") for i in ids], "test: ends in nine")


def test_a_retried_piece_overwrites_its_files_instead_of_adding_copies(tmp_path):
    out = Location.of(tmp_path)
    (tmp_path / "rejected").mkdir()
    (tmp_path / "_progress").mkdir()
    t = _table(["a1", "a2", "a9"])
    commit_piece(out, "src-a", t)
    commit_piece(out, "src-a", t)  # the same batch again, as a Ray task retry would
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    assert len(list((tmp_path / "rejected").glob("*.parquet"))) == 1
    state = read_ledger(out)
    assert state.rows_by_src() == {"src-a": 3}
    assert pq.read_table(tmp_path / "rejected").column("reason").to_pylist() == [
        "test: ends in nine"
    ]


def test_resume_keeps_complete_sources_and_deletes_partial_ones_and_orphans(tmp_path):
    out = Location.of(tmp_path)
    (tmp_path / "rejected").mkdir()
    (tmp_path / "_progress").mkdir()
    commit_piece(out, "done", _table(["d1", "d2"]))
    commit_piece(out, "partial", _table(["p1", "p2"]))
    pq.write_table(_table(["o1"]).drop_columns(["_reject"]), tmp_path / "part-orphan.parquet")
    (tmp_path / "_progress" / "garbage.json").write_text("")  # a write cut short by a crash
    state = read_ledger(out)
    complete = complete_sources(state, {"done": 2, "partial": 4})
    assert complete == {"done"}
    kept = prune_incomplete(out, state, complete)
    assert kept.rows_by_src() == {"done": 2}
    remaining = (
        pq.read_table(tmp_path, columns=["id"]).column("id").to_pylist()
        if list(tmp_path.glob("part-*"))
        else []
    )
    assert sorted(remaining) == ["d1", "d2"]
    assert [p.name for p in (tmp_path / "_progress").iterdir()] == [
        kept.entries[0]["tag"] + ".json"
    ]


def test_exact_dedup_keeps_exactly_one_row_even_when_copies_share_an_id():
    img = [{"bytes": b"\x89PNG same", "path": None}]
    t = rows_to_table(
        [{"id": "x", "images": img}, {"id": "x", "images": img}, {"id": "w", "images": img}]
    )
    keyed = content_key(t, "image")
    assert len(set(keyed.column(KEY_COLUMN).to_pylist())) == 1
    out = resolve_group(keyed)
    assert out.column("_reject").to_pylist() == [
        "exact_dedup: duplicate (of w)",
        "exact_dedup: duplicate (of w)",
        None,
    ]


def test_exact_dedup_tells_path_only_images_apart_by_path():
    t = rows_to_table(
        [
            {"id": "a", "images": [{"bytes": None, "path": "a.jpg"}]},
            {"id": "b", "images": [{"bytes": None, "path": "b.jpg"}]},
        ]
    )
    assert len(set(content_key(t, "image").column(KEY_COLUMN).to_pylist())) == 2
