"""One run per output folder: OUTPUT/.lock, stale locks, and a run that lost its lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stages_for_failures import StealLock
from stages_for_tests import CaptionLength
from test_runner import make_pool
from worker_env import worker_pythonpath

from warren.pipelines.runner import Pipeline, PipelineError, Runner

ROOT = Path(__file__).resolve().parents[1]

RUN_SCRIPT = """
import sys, time
from warren.pipelines.recipe import main
from warren.pipelines.runner import Pipeline
from stages_for_tests import CaptionLength
start = time.monotonic()
rc = main(Pipeline("t", [CaptionLength(max_chars=30)]),
          ["--input", sys.argv[1], "--output", sys.argv[2], "--input-format", "parquet",
           "--num-cpus", "1", "--no-report", "--quiet"])
print(f"elapsed {time.monotonic() - start:.2f}", flush=True)
sys.exit(rc)
"""


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    env.pop("RAY_ADDRESS", None)
    return env


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, **owner) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps({"started": "2026-01-01T00:00:00Z", **owner}))


def test_two_runs_started_together_into_one_folder_one_runs_and_the_other_stops_at_once(tmp_path):
    make_pool(tmp_path / "pool", n=40, shards=4)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = dict(_env(), WARREN_TEST_SLEEP_PER_BATCH="0.3")
    args = [sys.executable, str(script), str(tmp_path / "pool"), str(tmp_path / "out")]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    loser = outs[codes.index(2)]
    winner = outs[codes.index(0)]
    assert "is in use by another run" in loser and f"host {socket.gethostname()}" in loser
    assert f"pid {procs[codes.index(0)].pid}" in loser
    # It stops before starting Ray: well before the winner, which starts Ray and works.
    elapsed = {o: float(o.rsplit("elapsed ", 1)[1].split()[0]) for o in outs}
    assert elapsed[loser] < elapsed[winner]
    assert loser.count("error:") == 1 and len(loser.strip().splitlines()) <= 3, loser
    assert (tmp_path / "out" / "01-caption_length" / "_manifest.json").exists()
    assert not (tmp_path / "out" / ".lock").exists()  # released at the end


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_message(
    ray_session, tmp_path, capsys
):
    make_pool(tmp_path / "pool", n=20, shards=2)
    dead = _dead_pid()
    _write_lock(tmp_path / "out", host=socket.gethostname(), pid=dead, token="old")
    pipe = Pipeline("t", [CaptionLength(max_chars=30)])
    Runner(pipe, str(tmp_path / "pool"), str(tmp_path / "out"), progress=False).run()
    err = capsys.readouterr().err
    assert f"took over the output lock of host {socket.gethostname()}, pid {dead}" in err
    assert (tmp_path / "out" / "run.json").exists()
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_live_lock_on_this_host_or_any_lock_on_another_host_refuses_the_run(tmp_path):
    make_pool(tmp_path / "pool", n=20, shards=2)
    out = tmp_path / "out"
    pipe = Pipeline("t", [CaptionLength(max_chars=30)])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, host=socket.gethostname(), pid=sleeper.pid, token="live")
        with pytest.raises(PipelineError, match=f"pid {sleeper.pid}.*wait for it"):
            Runner(pipe, str(tmp_path / "pool"), str(out), progress=False).run()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Another host: its pid means nothing here, so even a pid that is dead here is not stale.
    _write_lock(out, host="elsewhere.example", pid=_dead_pid(), token="remote")
    with pytest.raises(PipelineError, match="host elsewhere.example.*--break-lock"):
        Runner(pipe, str(tmp_path / "pool"), str(out), progress=False).run()
    assert json.loads((out / ".lock").read_text())["token"] == "remote"  # left alone
    assert not (out / "00-ingest").exists()  # refused before any work


def test_break_lock_takes_over_a_lock_held_from_another_host(ray_session, tmp_path, capsys):
    make_pool(tmp_path / "pool", n=20, shards=2)
    out = tmp_path / "out"
    _write_lock(out, host="elsewhere.example", pid=12345, token="remote")
    pipe = Pipeline("t", [CaptionLength(max_chars=30)])
    Runner(pipe, str(tmp_path / "pool"), str(out), progress=False, break_lock=True).run()
    assert "took over the output lock of host elsewhere.example" in capsys.readouterr().err
    assert (out / "run.json").exists()


def test_a_run_whose_lock_was_taken_writes_no_manifest_and_no_run_json(ray_session, tmp_path):
    make_pool(tmp_path / "pool", n=20, shards=2)
    out = tmp_path / "out"
    lock = str(out / ".lock")

    def pipe(steal: bool) -> Pipeline:
        return Pipeline("t", [StealLock(lock_path=lock, steal=steal), CaptionLength(max_chars=30)])

    Runner(pipe(False), str(tmp_path / "pool"), str(out), progress=False).run()
    before = {p: p.read_bytes() for p in [out / "run.json", *out.glob("*/_manifest.json")]}
    time.sleep(1.1)  # so a rewritten run.json would differ in its finished_at
    with pytest.raises(PipelineError, match="lost its lock.*held by host .*pid 1"):
        Runner(pipe(True), str(tmp_path / "pool"), str(out), progress=False).run()
    assert not (out / "01-steal_lock" / "_manifest.json").exists()
    assert (out / "run.json").read_bytes() == before[out / "run.json"]
    assert (out / "02-caption_length" / "_manifest.json").read_bytes() == before[
        out / "02-caption_length" / "_manifest.json"
    ]
    # The thief's lock is not released by the run that lost it.
    assert json.loads((out / ".lock").read_text())["token"] == "thief"


def test_an_empty_lock_file_left_by_a_crash_between_create_and_write_is_taken_over(tmp_path):
    from warren.stages.shards import Location, OutputLock

    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("")
    lock = OutputLock(Location.of(out))
    assert lock.acquire() == (
        "took over an unreadable output lock (its writer stopped before writing it)"
    )
    assert json.loads((out / ".lock").read_text())["token"] == lock.token
    lock.check()
    lock.release()
    assert not (out / ".lock").exists()


def test_two_runs_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    from warren.stages.shards import Location, LockError, OutputLock

    out = tmp_path / "out"
    dead = _dead_pid()
    _write_lock(out, host=socket.gethostname(), pid=dead, token="old")
    stale = json.loads((out / ".lock").read_text())
    # Run A took the stale lock over a moment ago; run B judged the same stale owner dead and
    # now moves A's fresh lock aside: it must put it back and stop.
    first = OutputLock(Location.of(str(out)))
    assert first.acquire() is not None and first.held
    second = OutputLock(Location.of(str(out)))
    with pytest.raises(LockError, match="taken by another run at the same moment"):
        second._take_over(stale)
    assert json.loads((out / ".lock").read_text())["token"] == first.token
    first.check()  # still holds it
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
