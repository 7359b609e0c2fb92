"""kill -9 of a generation run's driver: its workers stop paying at once and lose nothing paid.

The run is the llava_instruct recipe against the fake endpoint on 127.0.0.1, with its in-process
Ray. Only the driver is killed (not its process group: Ray's workers live in their own groups, as
they would after a crash or the OOM killer). The fake server's own log is the ground truth: which
requests arrived when, and which answers it generated (an endpoint bills an answer it generated
whether or not the client is still there to read it).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import outputs
import psutil
import pyarrow.parquet as pq
import pytest
from fake_chat_server import FakeChatServer

from warren.stages.schema import rows_to_table

ROOT = Path(__file__).resolve().parents[1]
ROWS = 40
# Ray's own fate-sharing brings the raylet down with the driver, but a worker only notices that on
# its own schedule (1.5-2 s here): a few seconds is when a killed run must have gone quiet.
SETTLE_S = 3.0


def _ray_workers(driver: int) -> list[psutil.Process]:
    """The worker processes of the driver's in-process Ray: the raylet's children, less its
    agents (Ray's dashboard and runtime-env agents check their parent on their own schedule)."""
    found = []
    for child in psutil.Process(driver).children():
        if "raylet" not in " ".join(child.cmdline()[:1]):
            continue
        for p in child.children(recursive=True):
            try:
                if "Agent" not in p.name() and "agent" not in " ".join(p.cmdline()[:3]):
                    p.info = {"name": " ".join(p.cmdline())[:80]}
                    found.append(p)
            except psutil.Error:
                continue
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _command(pool: Path, out: Path, cache: Path, url: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "pipelines" / "llava_instruct.py"),
        "--input",
        str(pool),
        "--input-format",
        "parquet",
        "--output",
        str(out),
        "--quiet",
        "--num-cpus",
        "2",
        "--llava_generate.base_url",
        url,
        "--llava_generate.api_key_env",
        "WARREN_TEST_ORPHAN_KEY",
        "--llava_generate.cache_dir",
        str(cache),
        "--llava_generate.max_concurrency",
        "2",
        "--llava_generate.mix",
        "detail=1",  # one request per row, answered in prose
    ]


def test_killed_driver_stops_its_workers_sending_and_resume_buys_no_answer_twice(
    tmp_path: Path,
) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = rows_to_table(
        [{"id": f"r{i}", "caption": f"A dog on a lawn, photo {i}"} for i in range(ROWS)]
    )
    for k in range(4):  # four input shards: the stage commits its work piece by piece
        pq.write_table(rows.slice(10 * k, 10), pool / f"part-{k}.parquet")
    cache, out = tmp_path / "llm-cache", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["WARREN_TEST_ORPHAN_KEY"] = "sk-test"

    # Each answer takes a while, as a real model's does: the kill lands with requests in flight.
    with FakeChatServer(latency_s=0.4) as server:
        cmd = _command(pool, out, cache, server.url)
        log = open(tmp_path / "first-run.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 180
            while len(server.answered) < 8:
                if proc.poll() is not None:
                    log.close()
                    pytest.fail(
                        f"ended before the kill:\n{(tmp_path / 'first-run.log').read_text()}"
                    )
                assert time.monotonic() < deadline, "no answer reached the server in 180 s"
                time.sleep(0.02)
            workers = _ray_workers(proc.pid)
            assert workers, "no Ray worker under the driver's raylet"
            os.kill(proc.pid, signal.SIGKILL)  # the driver alone, mid-stage
            killed_at = time.monotonic()
            proc.wait()
            time.sleep(SETTLE_S)
            alive = [p.info["name"] for p in workers if _alive(p)]
            assert not alive, f"{len(alive)} Ray workers of the killed run still running: {alive}"
            time.sleep(3.0)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of Ray shares the driver's group
            except ProcessLookupError:
                pass
            log.close()

        late = [e["t"] - killed_at for e in server.log if e["t"] > killed_at + SETTLE_S]
        assert not late, f"requests sent {late} s after the kill"
        paid_first = len(server.answered)
        cached = len(list(cache.rglob("*.json")))
        # Every answer the server generated before the workers stopped is on disk.
        assert cached == paid_first, (cached, paid_first)
        assert paid_first < ROWS

        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Over both runs, the server generated exactly one answer per row: none was bought twice.
    bought = collections.Counter(e["content"] for e in server.answered)
    assert len(server.answered) == ROWS, bought.most_common(3)
    assert len(bought) == ROWS
    stage = out / "01-llava_generate"
    ids = [r["id"] for r in outputs.table(stage).to_pylist()]
    ids += list(outputs.rejected_reasons(stage))
    assert sorted(ids) == sorted(f"r{i}" for i in range(ROWS))
