"""The plan of a run: ingest is a reader stage, every required column is checked before any
work, and the manifest records the stage contract (resources, columns, thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stages_for_tests import AddsScore, CaptionLength, MinScore

from warren.pipelines.plan import Pipeline, check_columns, column_problems
from warren.pipelines.runner import PipelineError, Runner
from warren.stages.base import stable_hash
from warren.stages.readers.base import Reader
from warren.stages.readers.parquet import ParquetReader
from warren.stages.readers.stage import ReaderStage
from warren.stages.schema import rows_to_table


def write_pool(folder: Path, n: int = 20, with_score: bool = False) -> Path:
    """n rows r-00..; caption of i characters; with `with_score`, a clip_score column of i / n."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r-{i:02d}", "caption": "x" * i, "source": "t"} for i in range(n)]
    table = rows_to_table(rows)
    if with_score:
        table = table.append_column("clip_score", pa.array([i / n for i in range(n)], pa.float32()))
    pq.write_table(table, folder / "pool.parquet")
    return folder


def runner(pool: Path, out: Path, stages, **kw) -> Runner:
    return Runner(
        Pipeline("t", stages), str(pool), str(out), input_format="parquet", progress=False, **kw
    )


def test_a_required_column_that_nothing_adds_fails_before_any_folder_is_written(tmp_path):
    pool = write_pool(tmp_path / "pool")
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as err:
        runner(pool, out, [CaptionLength(), MinScore()]).run()
    text = str(err.value)
    assert "min_score: requires column 'clip_score', which no stage before it adds" in text
    # the stage class that adds it, wherever it is defined, is named
    assert "the `adds_score` stage" in text
    assert not out.exists()


def test_a_stage_that_adds_the_column_too_late_is_named_as_such():
    problems = column_problems([MinScore(), AddsScore()])
    assert problems == [
        "min_score: requires column 'clip_score', which no stage before it adds "
        "(the `adds_score` stage adds it, but runs after it)"
    ]
    check_columns([AddsScore(), MinScore()])  # in order: nothing to say


def test_without_an_input_the_check_assumes_the_core_columns_only():
    with pytest.raises(PipelineError, match="min_score: requires column 'clip_score'"):
        Pipeline("t", [MinScore()]).check()
    Pipeline("t", [AddsScore(), MinScore()]).check()


class OpaqueReader(Reader):
    """A reader that cannot tell its columns before reading rows."""

    format = "opaque"


def test_a_reader_that_cannot_tell_its_columns_is_trusted(tmp_path):
    stage = ReaderStage(OpaqueReader(str(tmp_path)))
    assert stage.adds_unknown
    check_columns([stage, MinScore()])


def test_the_parquet_reader_stage_adds_the_core_columns_and_the_input_s_own(tmp_path):
    pool = write_pool(tmp_path / "pool", with_score=True)
    stage = ReaderStage(ParquetReader(str(pool)))
    added = stage.added_columns()
    assert not stage.adds_unknown
    assert added["clip_score"] == pa.float32()
    assert {"id", "images", "caption", "conversations", "source", "url", "license"} <= set(added)
    assert stage.name == "ingest" and stage.describe()["kind"] == "reader"


def test_a_parquet_input_carrying_the_column_runs_and_the_manifest_records_the_contract(
    ray_session, tmp_path
):
    pool = write_pool(tmp_path / "pool", with_score=True)
    out = tmp_path / "out"
    reports = runner(pool, out, [MinScore()]).run()
    # clip_score = i / 20 < 0.5 for i < 10: rows r-00..r-09 rejected
    assert [(r.folder, r.rows_in, r.kept, r.rejected) for r in reports] == [
        ("00-ingest", 20, 20, 0),
        ("01-min_score", 20, 10, 10),
    ]
    manifest = json.loads((out / "01-min_score" / "_manifest.json").read_text())
    assert manifest["requires"] == ["clip_score"]
    assert manifest["adds"] == {}
    assert manifest["resources"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "batch_size": 8,
        "concurrency": None,
    }
    assert manifest["thresholds"] == [
        {
            "param": "min_score",
            "kind": "min",
            "column": "clip_score",
            "value": 0.5,
            "descending": True,
        }
    ]
    ingest = json.loads((out / "00-ingest" / "_manifest.json").read_text())
    assert ingest["stage"] == "ingest" and ingest["kind"] == "reader"
    assert ingest["adds"]["clip_score"] == "float"
    # The fingerprints are the ones ingest and stages always had (old outputs stay cached):
    reader = ParquetReader(str(pool))
    ingest_fp = stable_hash({"stage": "ingest", "ids": "reject", "input": reader.fingerprint()})
    assert ingest["fingerprint"] == ingest_fp
    stage_fp = stable_hash(
        {
            "stage": "min_score",
            "version": "1",
            "params": MinScore().params_hash,
            "input": ingest["output_fingerprint"],
        }
    )
    assert manifest["fingerprint"] == stage_fp

    # Resources are not in the cache key: another batch size and pool size recompute nothing.
    again = runner(pool, out, [MinScore(resources={"batch_size": 3, "concurrency": 2})]).run()
    assert [r.status for r in again] == ["cached", "cached"]

    # A manifest written before the contract was recorded (no resources, columns or thresholds;
    # ingest's kind "ingest") is still a cache hit.
    for folder in ("00-ingest", "01-min_score"):
        path = out / folder / "_manifest.json"
        old = json.loads(path.read_text())
        for key in ("resources", "requires", "adds", "adds_unknown", "thresholds"):
            old.pop(key, None)
        if folder == "00-ingest":
            old["kind"] = "ingest"
        path.write_text(json.dumps(old))
    assert [r.status for r in runner(pool, out, [MinScore()]).run()] == ["cached", "cached"]
