"""A worker that pays for requests stops when the run it works for is gone.

When the driver of an in-process Ray is killed (kill -9, OOM), Ray's kernel fate-sharing takes the
raylet down with it, but each worker only notices the raylet's death on its own schedule (about 1.5
to 2 s here, longer on a loaded machine) and is then shut down at once, with whatever requests it
had in flight: an endpoint bills them, and their answers never reach the cache. On a cluster, a
dead job's workers are killed by their raylets the same way.

`start()` (called by the generation stages' `setup()` and by the chat client in a Ray worker) runs a
daemon thread that checks every `interval_s` (0.25 s; the GCS at most once a second) whether the
run is gone:

- the driver's process, when it runs on this node: its pid, with its start time so that a reused
  pid does not pass for it, and a zombie (killed, not yet reaped) counting as dead;
- the job's record in the GCS (`is_dead`), when the driver runs on another node;
- this worker's parent, the raylet: a worker re-parented to init (or a subreaper) has lost it.

When it is gone, the watchdog closes the gate (`gate()` then never lets a new request out), waits
up to `grace_s` for the requests already sent to come back and be written to the cache, and exits
the process. Outside a Ray worker (a test, a notebook calling `process()` itself) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger(__name__)

INTERVAL_S = 0.25  # local checks (a pid, the parent): microseconds each
GCS_INTERVAL_S = 1.0  # a driver on another node: one GCS request a second
GRACE_S = 30.0
EXIT_CODE = 3

_lock = threading.Lock()
_drained = threading.Condition(_lock)
_in_flight = 0
_stopping = threading.Event()
_started = False


def stopping() -> bool:
    """True once the run is gone: no new request may be sent."""
    return _stopping.is_set()


@contextlib.asynccontextmanager
async def gate() -> AsyncIterator[None]:
    """Wrap one request from before it is sent until its answer is on disk.

    Counted before the check, so the watchdog either sees this request in flight and waits for
    it, or this request sees the gate closed and is never sent. A closed gate parks the caller
    until the process exits."""
    global _in_flight
    with _lock:
        _in_flight += 1
        closed = _stopping.is_set()
        if closed:
            _in_flight -= 1
            _drained.notify_all()
    if closed:
        while True:  # the watchdog exits the process; nothing must be sent meanwhile
            await asyncio.sleep(3600)
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1
            _drained.notify_all()


def in_flight() -> int:
    with _lock:
        return _in_flight


class _Driver:
    """How to tell whether the run is gone, resolved once in the worker."""

    def __init__(self) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.job_id = ctx.get_job_id()
        self.parent = os.getppid()
        self.pid: int | None = None
        self.started: float | None = None
        self.gcs: Any = None
        self.asked = 0.0  # when the GCS was last asked about the job
        try:
            worker = ray._private.worker.global_worker
            info = worker.gcs_client.get_all_job_info(
                job_or_submission_id=self.job_id,
                skip_submission_job_info_field=True,
                skip_is_running_tasks_field=True,
                timeout=10,
            )
            record = next((v for k, v in info.items() if k.hex() == self.job_id), None)
        except Exception as err:  # noqa: BLE001 - the parent check still works without it
            log.warning("watchdog: cannot read job %s from the GCS: %s", self.job_id, err)
            record = None
        if record is None:
            return
        if record.driver_address.ip_address == ray.util.get_node_ip_address():
            import psutil

            try:
                proc = psutil.Process(record.driver_pid)
                self.pid, self.started = proc.pid, proc.create_time()
            except psutil.Error:
                self.pid, self.started = record.driver_pid, None  # already gone
        else:
            self.gcs = worker.gcs_client

    def gone(self) -> str | None:
        """Why the run is gone, or None while it is alive."""
        if os.getppid() != self.parent:
            return f"the raylet (pid {self.parent}) is gone"
        if self.pid is not None:
            import psutil

            try:
                proc = psutil.Process(self.pid)
                if self.started is None or proc.create_time() != self.started:
                    return f"the driver (pid {self.pid}) is gone"
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return f"the driver (pid {self.pid}) was killed"
            except psutil.Error:
                return f"the driver (pid {self.pid}) is gone"
        elif self.gcs is not None and time.monotonic() - self.asked >= GCS_INTERVAL_S:
            self.asked = time.monotonic()
            try:
                info = self.gcs.get_all_job_info(
                    job_or_submission_id=self.job_id,
                    skip_submission_job_info_field=True,
                    skip_is_running_tasks_field=True,
                    timeout=5,
                )
            except Exception:  # noqa: BLE001 - a slow GCS is not a dead job
                return None
            for key, record in info.items():
                if key.hex() == self.job_id and record.is_dead:
                    return f"job {self.job_id} is finished"
        return None


def _watch(driver: _Driver, interval_s: float, grace_s: float) -> None:
    while True:
        why = driver.gone()
        if why is not None:
            break
        time.sleep(interval_s)
    with _lock:
        _stopping.set()
        waiting = _in_flight
        deadline = time.monotonic() + grace_s
        while _in_flight and time.monotonic() < deadline:
            _drained.wait(timeout=0.05)
        left = _in_flight
    message = (
        f"warren watchdog (pid {os.getpid()}): {why}; no new request sent, "
        f"{waiting - left} of {waiting} in flight written to the cache; exiting"
    )
    # stderr, not logging: the process exits on the next line, and Ray keeps a worker's stderr.
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def start(interval_s: float = INTERVAL_S, grace_s: float = GRACE_S) -> bool:
    """Start the watchdog once per process, in a Ray worker only. True when it runs."""
    global _started
    with _lock:
        if _started:
            return True
        try:
            import ray

            if not ray.is_initialized():
                return False
            if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
                return False
        except Exception:  # noqa: BLE001 - no Ray, no run to watch
            return False
        _started = True
    try:
        driver = _Driver()
    except Exception as err:  # noqa: BLE001 - never let the watchdog break the stage
        log.warning("watchdog not started: %s", err)
        with _lock:
            _started = False  # a later call tries again
        return False
    threading.Thread(
        target=_watch, args=(driver, interval_s, grace_s), name="warren-watchdog", daemon=True
    ).start()
    return True


__all__ = ["gate", "in_flight", "start", "stopping"]
