"""One short error: a failing stage prints its cause once, the traceback goes to OUTPUT/logs/;
a demo model refuses input it was not trained on unless the user allows it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stages_for_failures import FailsInRay
from test_runner import make_pool
from worker_env import worker_pythonpath

from warren.pipelines.recipe import DEMO_CLIP, DEMO_DATA, main
from warren.pipelines.runner import Pipeline, PipelineError, Runner
from warren.stages.embed import Embed

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_that_cannot_be_loaded_is_one_short_error_and_the_traceback_is_in_logs(tmp_path):
    make_pool(tmp_path / "pool", n=20, shards=2)
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=worker_pythonpath(), HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "semdedup.py"),
            "--input",
            str(tmp_path / "pool"),
            "--output",
            str(out),
            "--embed.model",
            str(missing),
            "--num-cpus",
            "2",
            "--quiet",
            "--no-report",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    # The cause, which names the flag to change, is printed once, without a stack.
    assert text.count(f"model '{missing}' is not available") == 1, text
    error = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--embed.model" in error[0], text
    assert error[0].startswith("error: stage embed failed: ModelNotFoundError: ")
    assert "Traceback" not in text and 'File "' not in text, text
    assert len(text.strip().splitlines()) <= 5, text
    # The whole story is in the stage's log, which the error line names.
    log = out / "logs" / "03-embed.log"
    assert f"(traceback: {log})" in error[0]
    logged = log.read_text()
    assert "Traceback (most recent call last)" in logged
    assert "in load_clip" in logged and "ModelNotFoundError" in logged


def test_an_error_in_a_global_stage_s_ray_tasks_is_one_line_with_its_traceback_in_logs(
    ray_session, tmp_path
):
    make_pool(tmp_path / "pool", n=20, shards=2)
    out = tmp_path / "out"
    pipe = Pipeline("t", [FailsInRay()])
    with pytest.raises(PipelineError) as info:
        Runner(pipe, str(tmp_path / "pool"), str(out), progress=False).run()
    log = out / "logs" / "01-fails_in_ray.log"
    assert str(info.value) == (
        "stage fails_in_ray failed: ValueError: bad input: give --fails_in_ray.message "
        f"(traceback: {log})"
    )
    assert "in _fail" in log.read_text()
    assert not (out / "01-fails_in_ray" / "_manifest.json").exists()
    assert not (out / ".lock").exists()  # a failed run releases its lock


def test_an_unforeseen_error_is_one_line_and_its_traceback_goes_to_logs_run_log(
    tmp_path, capsys, monkeypatch
):
    def bug(self):
        return {}["a key no one wrote"]

    monkeypatch.setattr(Runner, "run", bug)
    out = tmp_path / "out"
    argv = ["--input", DEMO_DATA, "--output", str(out), "--quiet", "--no-report"]
    assert main(Pipeline("t", [Embed()]), argv) == 2
    err = capsys.readouterr().err
    log = out / "logs" / "run.log"
    assert err == f"error: KeyError: 'a key no one wrote' (traceback: {log})\n"
    assert "in bug" in log.read_text() and "Traceback" in log.read_text()


def test_the_demo_clip_refuses_input_that_is_not_the_demo_pool_unless_allowed(tmp_path, capsys):
    make_pool(tmp_path / "pool", n=4, shards=1)
    out = tmp_path / "out"
    pipe = Pipeline("t", [Embed(model=DEMO_CLIP)])
    with pytest.raises(PipelineError) as info:
        Runner(pipe, str(tmp_path / "pool"), str(out), input_format="parquet").run()
    message = str(info.value)
    assert "DEMO model trained only on pipelines/demo_data/demo.parquet" in message
    assert "--embed.model" in message and "--allow-demo-model" in message
    assert not (out / "00-ingest").exists()  # refused before any work
    # The command line says the same, once, and exits non-zero.
    argv = ["--input", str(tmp_path / "pool"), "--output", str(out), "--quiet", "--no-report"]
    assert main(Pipeline("t", [Embed()]), argv + ["--embed.model", DEMO_CLIP]) == 2
    err = capsys.readouterr().err
    assert err.count("DEMO model") == 1 and "--allow-demo-model" in err
    # Allowed: a loud warning, and the run goes on.
    allowed = Runner(pipe, str(tmp_path / "pool"), str(out), allow_demo_model=True)
    allowed._check_demo_models()
    assert "WARNING: stage embed: model" in capsys.readouterr().err


def test_the_demo_clip_runs_without_a_word_on_the_demo_pool_wherever_it_was_copied(
    tmp_path, capsys
):
    pipe = Pipeline("t", [Embed(model=DEMO_CLIP)])
    Runner(pipe, DEMO_DATA, str(tmp_path / "a"))._check_demo_models()
    copy = tmp_path / "copy" / "pool.parquet"
    copy.parent.mkdir()
    shutil.copy(DEMO_DATA, copy)
    Runner(pipe, str(copy.parent), str(tmp_path / "b"))._check_demo_models()
    assert capsys.readouterr().err == ""
    # One changed byte and it is not the demo pool any more.
    data = bytearray(copy.read_bytes())
    data[100] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="DEMO model"):
        Runner(pipe, str(copy), str(tmp_path / "c"))._check_demo_models()
