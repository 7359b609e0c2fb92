"""A stage folder the runner started but did not complete (killed, or still running) has an
`_attempt.json` and no manifest: its part files are a partial stage (and leftovers of killed
tasks), so `--data` and a mixture source refuse it with a clear message instead of reading them."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from warren.stages.readers.base import InputError
from warren.stages.readers.mixture import warren_output_files
from warren.stages.run_layout import ATTEMPT, LayoutError, is_warren_output
from warren.stages.shards import Location
from warren.trainers.data import shard_files


def _unfinished(tmp_path):
    folder = tmp_path / "03-embed"
    folder.mkdir()
    (folder / ATTEMPT).write_text(json.dumps({"fingerprint": "abc", "started": "now"}))
    pq.write_table(pa.table({"id": ["a"], "images": [None]}), folder / "part-0.parquet")
    return folder


def test_an_unfinished_stage_folder_is_a_warren_output(tmp_path):
    assert is_warren_output(Location.of(str(_unfinished(tmp_path))))


def test_training_data_refuses_an_unfinished_stage_folder(tmp_path):
    with pytest.raises(LayoutError, match="not a completed stage folder"):
        shard_files(str(_unfinished(tmp_path)))


def test_a_mixture_source_refuses_an_unfinished_stage_folder(tmp_path):
    with pytest.raises(InputError, match="not a completed stage folder"):
        warren_output_files(Location.of(str(_unfinished(tmp_path))))


def test_a_plain_folder_of_shards_is_still_read(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "images": [None]}), tmp_path / "part-0.parquet")
    assert len(shard_files(str(tmp_path))) == 1
