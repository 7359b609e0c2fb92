"""The demo recipe end to end on the bundled pool: every planted bad row ends as a documented rejection."""

from __future__ import annotations

import json
from pathlib import Path

import outputs
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines import demo
from warren.pipelines.recipe import DEMO_DATA
from warren.pipelines.recipe import main as recipe_main


def _rows(folder: Path) -> list[dict]:
    return outputs.table(folder).to_pylist()


_rejected = outputs.rejected_reasons


def test_demo_run_rejects_exactly_the_planted_bad_rows_and_writes_the_funnel(
    ray_session, tmp_path, capsys
):
    pool = pq.read_table(DEMO_DATA, columns=["id", "planted"]).to_pylist()
    planted = {r["id"]: r["planted"] or "" for r in pool}
    out = tmp_path / "out"
    assert recipe_main(demo.pipeline(), ["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "funnel for demo" in printed and "01-image_check" in printed

    image_rej = _rejected(out / "01-image_check")
    assert set(image_rej) == {i for i, p in planted.items() if p.startswith("broken:")}
    expected_reason = {
        "broken:truncated_jpeg": "image_check: truncated image",
        "broken:zero_bytes": "image_check: empty image",
        "broken:not_an_image": "image_check: not an image",
        "broken:decompression_bomb": "image_check: too many pixels",
        "broken:corrupt_png": "image_check: corrupt image",
    }
    for rid, reason in image_rej.items():
        assert reason.startswith(expected_reason[planted[rid]]), (planted[rid], reason)

    caption_rej = _rejected(out / "02-caption_check")
    assert set(caption_rej) == {i for i, p in planted.items() if p.startswith("bad_caption:")}

    dedup_rej = _rejected(out / "03-exact_dedup")
    # brute force: group the survivors of the first two stages by their image bytes
    images = {
        r["id"]: r["images"][0]["bytes"]
        for r in pq.read_table(DEMO_DATA, columns=["id", "images"]).to_pylist()
    }
    groups: dict[bytes, list[str]] = {}
    for rid in sorted(set(planted) - set(image_rej) - set(caption_rej)):
        groups.setdefault(images[rid], []).append(rid)
    expected = {
        rid: f"exact_dedup: duplicate (of {ids[0]})" for ids in groups.values() for rid in ids[1:]
    }
    assert dedup_rej == expected
    # the planted copies are among them (the pool also has duplicates of its own)
    for copy, original in (
        (i, p.split(":", 1)[1]) for i, p in planted.items() if p.startswith("exact_dup_of:")
    ):
        assert max(copy, original) in dedup_rej

    final = _rows(out / "03-exact_dedup")
    assert len(final) == len(pool) - len(image_rej) - len(caption_rej) - len(dedup_rej)
    assert len({r["id"] for r in final}) == len(final)
    assert all(r["width"] > 0 and r["height"] > 0 for r in final)

    run = json.loads((out / "run.json").read_text())
    assert [s["folder"] for s in run["stages"]] == [
        "00-ingest",
        "01-image_check",
        "02-caption_check",
        "03-exact_dedup",
    ]
    for s in run["stages"]:
        assert s["rows_in"] == s["kept"] + s["rejected"]
    assert run["final"]["rows"] == len(final)


def test_unreadable_input_file_is_a_clear_error_naming_the_file(ray_session, tmp_path, capsys):
    bad = tmp_path / "pool"
    bad.mkdir()
    (bad / "good.parquet").write_bytes(Path(DEMO_DATA).read_bytes())
    (bad / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    code = recipe_main(
        demo.pipeline(),
        ["--input", str(bad), "--input-format", "parquet", "--output", str(tmp_path / "o")],
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.parquet" in err and "Traceback" not in err


def test_a_caption_column_of_the_wrong_type_is_a_clear_error_naming_file_and_column(
    ray_session, tmp_path, capsys
):
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "caption": [1, 2]}), pool / "ints.parquet")
    code = recipe_main(
        demo.pipeline(),
        ["--input", str(pool), "--input-format", "parquet", "--output", str(tmp_path / "o")],
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "ints.parquet" in err and "caption" in err and "int64" in err
