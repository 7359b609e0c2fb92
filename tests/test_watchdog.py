"""The watchdog's two halves without Ray: telling a dead driver from a live one, and the gate."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from fake_chat_server import FakeChatServer

from warren.stages import watchdog
from warren.stages.llm_client import ChatRequest, ClientConfig, run_requests_async


def _driver(pid: int, started: float | None) -> watchdog._Driver:
    driver = object.__new__(watchdog._Driver)  # what __init__ learns from Ray, given directly
    driver.job_id, driver.parent, driver.gcs = "01000000", psutil.Process().ppid(), None
    driver.pid, driver.started = pid, started
    return driver


def test_a_killed_driver_is_gone_even_before_it_is_reaped() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    driver = _driver(proc.pid, psutil.Process(proc.pid).create_time())
    assert driver.gone() is None
    proc.kill()
    deadline = time.monotonic() + 5
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # killed, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert driver.gone() == f"the driver (pid {proc.pid}) was killed"
    proc.wait()
    assert driver.gone() == f"the driver (pid {proc.pid}) is gone"


def test_a_reused_pid_does_not_pass_for_the_driver() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(proc.pid).create_time()
        assert _driver(proc.pid, started - 100.0).gone() == f"the driver (pid {proc.pid}) is gone"
    finally:
        proc.kill()
        proc.wait()


def test_a_lost_raylet_is_noticed() -> None:
    driver = _driver(psutil.Process().pid, psutil.Process().create_time())
    assert driver.gone() is None
    driver.parent = -1  # as if this worker had been re-parented
    assert driver.gone() == "the raylet (pid -1) is gone"


@pytest.fixture
def closed_gate():
    watchdog._stopping.set()
    yield
    watchdog._stopping.clear()


def test_a_closed_gate_lets_no_request_out(closed_gate, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WARREN_TEST_WATCHDOG_KEY", "sk-test")
    with FakeChatServer() as server:
        config = ClientConfig(
            model="m",
            base_url=server.url,
            api_key_env="WARREN_TEST_WATCHDOG_KEY",
            cache_dir=str(tmp_path),
        )
        requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(4)]

        async def run() -> None:
            await asyncio.wait_for(run_requests_async(requests, config), timeout=1.0)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(run())  # parked at the gate until the watchdog would exit the process
        assert server.log == []
    assert watchdog.in_flight() == 0


def test_the_gate_counts_a_request_until_its_answer_is_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WARREN_TEST_WATCHDOG_KEY", "sk-test")
    seen: list[int] = []
    with FakeChatServer(latency_s=0.3) as server:
        config = ClientConfig(
            model="m",
            base_url=server.url,
            api_key_env="WARREN_TEST_WATCHDOG_KEY",
            cache_dir=str(tmp_path),
        )
        requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(3)]

        async def run() -> None:
            task = asyncio.ensure_future(run_requests_async(requests, config))
            await asyncio.sleep(0.15)
            seen.append(watchdog.in_flight())  # sent, not yet answered
            await task

        asyncio.run(run())
    assert seen == [3] and watchdog.in_flight() == 0
    assert len(list(tmp_path.rglob("*.json"))) == 3
