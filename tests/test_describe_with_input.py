"""The column check that `--describe` and the run's header print is the one the run applies: a
column the input carries (a Parquet input's footers tell) is not reported missing."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from stages_for_tests import MinScore

from warren.pipelines.describe import describe_pipeline
from warren.pipelines.plan import Pipeline
from warren.pipelines.recipe import execute
from warren.stages.readers.parquet import ParquetReader
from warren.stages.readers.stage import ReaderStage
from warren.stages.schema import rows_to_table


def _pool(folder: Path) -> Path:
    folder.mkdir()
    table = rows_to_table([{"id": f"r-{i}", "caption": "x", "source": "t"} for i in range(4)])
    table = table.append_column("clip_score", pa.array([0.1, 0.2, 0.6, 0.9], pa.float32()))
    pq.write_table(table, folder / "pool.parquet")
    return folder


def test_describe_with_the_input_trusts_the_columns_it_carries(tmp_path):
    pipeline = Pipeline("t", [MinScore()])
    text = describe_pipeline(pipeline, ReaderStage(ParquetReader(str(_pool(tmp_path / "p")))))
    assert "columns: ok" in text
    # without an input, the core columns only: the column is reported
    assert "min_score: requires column 'clip_score'" in describe_pipeline(pipeline)


def test_describe_flag_checks_against_the_given_input(tmp_path, capsys):
    pool = _pool(tmp_path / "p")
    code = execute(
        Pipeline("t", [MinScore()]), input=str(pool), input_format="parquet", describe=True
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "columns: ok" in out and "requires column" not in out
