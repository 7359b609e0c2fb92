"""Ids are unique per run: a repeated id is a rejected row naming its first occurrence (or, on
request, renamed with a recorded suffix), decided in input order, across files, pieces and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from stages_for_tests import CaptionLength
from worker_env import worker_pythonpath

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.schema import rows_to_table

ROOT = Path(__file__).resolve().parents[1]

# file -> ids in record order. "a" repeats within shard-0 (records 0 and 3), "b" across files,
# "c" three times across three files, "d" twice within one 4-row piece and again in a later piece.
FILES = {
    "shard-0.parquet": ["a", "b", "x1", "a", "x2", "c", "d", "d", "x3", "d"],
    "shard-1.parquet": ["b", "x4", "c", "x5"],
    "sub/shard-2.parquet": ["c", "x6", "a#2", "a", "x7"],
}


def write_pool(root: Path, files: dict[str, list[str]] = FILES) -> list[dict]:
    """The input, and every row with its file and record index (each caption unique)."""
    rows = []
    for name, ids in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [
            {"id": i, "caption": f"{name} record {n}", "file": name, "record": n}
            for n, i in enumerate(ids)
        ]
        pq.write_table(
            rows_to_table([{"id": r["id"], "caption": r["caption"]} for r in records]), path
        )
        rows += records
    return rows


def first_seen(rows: list[dict]) -> dict[str, dict]:
    """Brute force: the first row of each id in input order (files sorted, then records)."""
    firsts: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["file"], r["record"])):
        firsts.setdefault(r["id"], r)
    return firsts


def ingest(tmp_path: Path, **kw) -> tuple[list[dict], list[dict]]:
    pipe = Pipeline("t", [CaptionLength(max_chars=1000)])
    Runner(
        pipe,
        str(tmp_path / "pool"),
        str(tmp_path / "out"),
        input_format="parquet",
        reader_options={"batch_size": 4},  # files are read in pieces of 4 rows
        progress=False,
        **kw,
    ).run()
    return read_stage(tmp_path / "out" / "00-ingest")


def read_stage(folder: Path) -> tuple[list[dict], list[dict]]:
    kept = [r for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    rejected = [
        r
        for f in sorted((folder / "rejected").glob("part-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    return kept, rejected


def test_a_repeated_id_is_rejected_naming_its_first_occurrence_in_input_order(
    ray_session, tmp_path
):
    rows = write_pool(tmp_path / "pool")
    kept, rejected = ingest(tmp_path)
    firsts = first_seen(rows)
    # Never two kept rows with one id, and the one kept is the first in input order.
    assert sorted(r["id"] for r in kept) == sorted(firsts)
    assert {r["id"]: r["caption"] for r in kept} == {i: r["caption"] for i, r in firsts.items()}
    by_caption = {r["caption"]: r for r in rows}
    expected = {}
    for r in rows:
        first = firsts[r["id"]]
        if first is not r:
            expected[r["caption"]] = (
                f"ingest: duplicate id (first seen at {first['file']}:{first['record']})"
            )
    assert {r["caption"]: r["reason"] for r in rejected} == expected
    assert expected["shard-0.parquet record 3"] == (
        "ingest: duplicate id (first seen at shard-0.parquet:0)"
    )
    assert expected["sub/shard-2.parquet record 0"] == (
        "ingest: duplicate id (first seen at shard-0.parquet:5)"
    )
    assert len(kept) + len(rejected) == len(rows) == len(by_caption)
    assert "_record" not in kept[0] and "_record" not in rejected[0]
    out = tmp_path / "out"
    m = json.loads((out / "00-ingest" / "_manifest.json").read_text())
    assert m["reasons"] == {"ingest: duplicate id": len(expected)}
    assert not (out / "00-ingest" / "_read").exists() and not (out / "00-ingest" / "_ids").exists()
    # The stages after ingest see each id once.
    after, _ = read_stage(out / "01-caption_length")
    assert sorted(r["id"] for r in after) == sorted(firsts)


def test_on_request_a_repeated_id_gets_a_recorded_suffix_and_never_collides(ray_session, tmp_path):
    rows = write_pool(tmp_path / "pool")
    kept, rejected = ingest(tmp_path, on_duplicate_id="suffix")
    ids = [r["id"] for r in kept]
    assert len(ids) == len(set(ids))
    by_caption = {r["caption"]: r for r in kept}
    # "d" at shard-0 records 6, 7, 9: d, d#2, d#3; "c" in three files: c, c#2, c#3.
    assert [by_caption[f"shard-0.parquet record {n}"]["id"] for n in (6, 7, 9)] == [
        "d",
        "d#2",
        "d#3",
    ]
    assert by_caption["shard-1.parquet record 2"]["id"] == "c#2"
    assert by_caption["sub/shard-2.parquet record 0"]["id"] == "c#3"
    assert by_caption["shard-1.parquet record 2"]["original_id"] == "c"
    assert by_caption["shard-0.parquet record 6"]["original_id"] is None
    # "a" is seen at shard-0 records 0 and 3, so its third occurrence would be "a#3", but its
    # second would be "a#2", which sub/shard-2 record 2 already carries as its own id: that one
    # occurrence is rejected as a duplicate of the input's "a#2" instead.
    assert by_caption["sub/shard-2.parquet record 2"]["id"] == "a#2"
    assert by_caption["sub/shard-2.parquet record 3"]["id"] == "a#3"
    assert [(r["caption"], r["reason"]) for r in rejected] == [
        (
            "shard-0.parquet record 3",
            "ingest: duplicate id (first seen at sub/shard-2.parquet:2)",
        )
    ]
    assert len(kept) + len(rejected) == len(rows)


KILL_SCRIPT = """
import sys
from warren.pipelines.runner import Pipeline, Runner
from readers_for_tests import SlowParquetReader
from stages_for_tests import CaptionLength
pool, out = sys.argv[1], sys.argv[2]
Runner(Pipeline("t", [CaptionLength(max_chars=1000)]), pool, out,
       reader=SlowParquetReader(pool, batch_size=4), progress=False, num_cpus=2).run()
"""


def test_ingest_killed_half_way_resumes_to_the_same_unique_ids(ray_session, tmp_path):
    files = {
        f"shard-{f:02d}.parquet": [f"id-{(f * 7 + r) % 40}" for r in range(8)] for f in range(16)
    }
    rows = write_pool(tmp_path / "pool", files)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    args = [sys.executable, str(script), str(tmp_path / "pool"), str(out)]
    proc = subprocess.Popen(
        args,
        env=dict(env, WARREN_TEST_SLEEP_PER_PIECE="0.5"),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    done = out / "00-ingest" / "_read" / "_progress"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if done.exists() and len(list(done.glob("*-done.json"))) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("ingest never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "00-ingest" / "_manifest.json").exists()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "00-ingest" / "_manifest.json").read_text())["status"] == "resumed"
    kept, rejected = read_stage(out / "00-ingest")
    firsts = first_seen(rows)
    assert sorted(r["caption"] for r in kept) == sorted(r["caption"] for r in firsts.values())
    expected = {
        r["caption"]: f"ingest: duplicate id (first seen at {firsts[r['id']]['file']}:"
        f"{firsts[r['id']]['record']})"
        for r in rows
        if firsts[r["id"]] is not r
    }
    assert {r["caption"]: r["reason"] for r in rejected} == expected
