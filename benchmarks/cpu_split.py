"""Where a machine's CPU time went while a block ran: Ray's workers, Ray's own processes, the driver.

    with CpuSplit() as split:
        run_the_stage()
    print(split.line())

On a small machine the processes Ray runs beside the work (the raylet, the GCS, the agents, the
driver's streaming executor) take a share of the cores that a plain loop keeps. This prints that
share, so that a ratio against a plain loop can be read: what the stage's own work cost, and what
the runtime around it did.

CPU seconds are user + system time from psutil, per process, over the block: a process that
started during the block counts whole, one that ended during it is lost (Ray's processes and its
workers outlive a stage). `workers` are Ray's worker processes (the `ray::` ones: tasks and
actors), `ray` every other process of the Ray session, `driver` this process.
"""

from __future__ import annotations

import os
import time

import psutil

RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")


def is_ray_worker(proc: psutil.Process) -> bool:
    """A Ray worker process (a task's or an actor's): named `ray::...`."""
    try:
        return proc.name().startswith("ray::") or "default_worker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _kind(proc: psutil.Process, me: int) -> str | None:
    if proc.pid == me:
        return "driver"
    if is_ray_worker(proc):
        return "workers"
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if any(s in name or s in cmd for s in RAY_SYSTEM) or ("/ray/" in cmd and "python" in name):
        return "ray"
    return None


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    me = os.getpid()
    out = {}
    for proc in psutil.process_iter():
        kind = _kind(proc, me)
        if kind is None:
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (kind, t.user + t.system)
    return out


class CpuSplit:
    """CPU seconds by kind of process over a `with` block, and the block's wall seconds."""

    def __enter__(self) -> CpuSplit:
        self._before = _cpu_by_pid()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._start
        after = _cpu_by_pid()
        self.seconds = {"workers": 0.0, "ray": 0.0, "driver": 0.0}
        for pid, (kind, cpu) in after.items():
            before = self._before.get(pid)
            self.seconds[kind] += cpu - (before[1] if before and before[0] == kind else 0.0)

    def line(self, cores: int | None = None) -> str:
        cores = cores or os.cpu_count() or 1
        total = self.wall * cores
        parts = ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in self.seconds.items())
        idle = total - sum(self.seconds.values())
        return (
            f"CPU time over {self.wall:.1f} s x {cores} cores = {total:.1f} core-s: {parts}, "
            f"other or idle {idle:.1f} s ({idle / total:.0%})"
        )
