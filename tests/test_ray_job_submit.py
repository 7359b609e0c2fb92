"""A recipe script runs unchanged as a Ray job: `ray job submit --working-dir . -- python pipelines/demo.py`.

The test starts its own one-node cluster with `ray start --head` (dashboard, hence the job server, on
127.0.0.1), submits the demo recipe with the repo as working_dir, and checks the job's status, its
run.json and the funnel table in its logs.

Token authentication: Ray turns it on for `ray start --head` as soon as a token exists (RAY_AUTH_TOKEN,
the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which any in-process `ray.init()` -- e.g. the
`ray_session` fixture -- writes), but `ray job` commands only send the token when RAY_AUTH_MODE=token
is set in their own environment. So whether the machine has ~/.ray/auth_token decides if a bare
`ray start` + `ray job submit` pair works. The test does not depend on that: it runs a token-protected
cluster with its own token, and passes RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to `ray start` and
to every `ray job` command (never to this process: os.environ is left alone, and RAY_ADDRESS and
friends are removed from the child environments so nothing joins the wrong cluster).

Teardown never runs `ray stop` (it stops every Ray on the machine, including the session's in-process
one): it kills the processes of the cluster's own session (started with start_new_session=True),
anything naming its private temp dir, and their children.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The client-side variables that would point `ray` commands at another cluster or another token.
_FOREIGN_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)
# working_dir is zipped and uploaded (limit: 512 MiB; .git, .venv, venv and __pycache__ are
# excluded by default). Leave out local caches and build leftovers too.
_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "warren-out",
]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

JOB_TIMEOUT_S = 150


def _ray_cli() -> list[str]:
    exe = BIN / "ray"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ray")
    if found:
        return [found]
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, the job server
    temp_dir: str
    token_path: Path
    session: int = -1
    log: Path | None = None
    env: dict = field(default_factory=dict)

    def ray(
        self, *args: str, timeout: float = 60, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this cluster (with its token)."""
        return subprocess.run(
            [*_ray_cli(), *args],
            env=self.env if env is None else env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    def job(self, verb: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.ray("job", verb, "--address", self.dashboard, *args, timeout=timeout)


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    # The job's entrypoint says `python`: make that this interpreter (the one with ray and warren).
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def _kill_cluster(session: int, temp_dir: str, grace_s: float = 1.0) -> None:
    """Kill this cluster's processes only: its session, anything naming its temp dir, their children."""
    import psutil

    me = os.getpid()
    mine = re.escape(temp_dir) + r"[/\s]"
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid == me:
                continue
            cmd = " ".join(p.info["cmdline"] or []) + " "
            if (session > 0 and os.getsid(p.pid) == session) or re.search(mine, cmd):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except (psutil.Error, OSError):
            continue
    procs.pop(me, None)
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A private, token-protected one-node Ray cluster started with `ray start --head`."""
    pytest.importorskip("aiohttp", reason="the job server needs ray[default]")
    work = tmp_path_factory.mktemp("ray_cluster")
    token_path = work / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    # Unix socket paths are capped at ~107 bytes and Ray nests session_<date>_<pid>/sockets/... under
    # the temp dir, so pytest's tmp_path is too long: use a short /tmp directory.
    temp_dir = tempfile.mkdtemp(prefix="wr-", dir="/tmp")
    dash_port = _free_port()
    cluster = Cluster(
        dashboard=f"http://127.0.0.1:{dash_port}",
        temp_dir=temp_dir,
        token_path=token_path,
        log=work / "ray_start.log",
        env=_child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path)),
    )
    start = [
        *_ray_cli(),
        "start",
        "--head",
        f"--port={_free_port()}",
        "--num-cpus=2",
        "--object-store-memory=268435456",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        # The fixed defaults (10001, 52365) would collide with another Ray on this machine.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        with open(cluster.log, "w") as log:
            # Output to a file, not a pipe: the daemons `ray start` leaves behind could hold a pipe open.
            proc = subprocess.Popen(
                start,
                env=cluster.env,
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            cluster.session = proc.pid  # the session leader's pid is the session id
            rc = proc.wait(timeout=90)
        if rc != 0:
            pytest.fail(f"`ray start --head` exited {rc}:\n{cluster.log.read_text()}")
        # Wait for the job server, authenticating with the cluster's token.
        deadline = time.monotonic() + 45
        while True:
            res = cluster.job("list", timeout=30)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job server at {cluster.dashboard} not ready:\n{res.stdout}\n{cluster.log.read_text()}"
                )
            time.sleep(1)
        yield cluster
    finally:
        _kill_cluster(cluster.session, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _status(cluster: Cluster, job_id: str) -> str | None:
    res = cluster.job("status", job_id)
    out = _plain(res.stdout)
    if f"Job '{job_id}' succeeded" in out:
        return "SUCCEEDED"
    if f"Job '{job_id}' failed" in out:
        return "FAILED"
    if f"Job '{job_id}' was stopped" in out:
        return "STOPPED"
    m = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
    return m.group(1).split(".")[-1] if m else None


def submit_and_wait(
    cluster: Cluster, working_dir: Path, entrypoint: list[str], timeout: float = JOB_TIMEOUT_S
) -> tuple[str | None, str]:
    """`ray job submit` (blocking: it tails the logs until the job ends), then `ray job status` and
    `ray job logs`. A job still running after `timeout` s is stopped. Returns (status, logs)."""
    job_id = f"warren_test_{secrets.token_hex(4)}"
    submit = [
        "--submission-id",
        job_id,
        "--working-dir",
        str(working_dir),
        "--runtime-env-json",
        json.dumps({"excludes": _EXCLUDES}),
        "--",
        *entrypoint,
    ]
    try:
        # One mostly idle process instead of a `ray job status` poll loop: each `ray` command costs
        # about a CPU-second, which the job would lose on a 2-core machine.
        res = cluster.job("submit", *submit, timeout=timeout)
        submitted = _plain(res.stdout)
    except subprocess.TimeoutExpired:
        submitted = f"`ray job submit` still waiting after {timeout} s: stopping the job"
        cluster.job("stop", job_id)
    status = _status(cluster, job_id)
    fetched = cluster.job("logs", job_id)
    logs = _plain(fetched.stdout) if fetched.returncode == 0 else submitted
    if status != "SUCCEEDED":
        print(
            f"--- job {job_id} ended as {status}\n--- ray job submit:\n{submitted}\n--- logs:\n{logs}"
        )
    return status, logs


def test_cluster_rejects_job_commands_without_ray_auth_mode_token(ray_cluster):
    """The token being at hand is not enough: `ray job` sends it only with RAY_AUTH_MODE=token."""
    no_mode = _child_env(RAY_AUTH_TOKEN_PATH=str(ray_cluster.token_path))
    res = ray_cluster.ray("job", "list", "--address", ray_cluster.dashboard, env=no_mode)
    assert res.returncode != 0, res.stdout
    assert "Unauthorized" in res.stdout, res.stdout


def test_ray_job_submit_runs_the_demo_recipe(ray_cluster, tmp_path):
    """The command docs/cluster.md gives, run from the repo root with the repo as working_dir."""
    assert (ROOT / "pipelines" / "demo.py").is_file()
    out = tmp_path / "out"
    status, logs = submit_and_wait(
        ray_cluster, ROOT, ["python", "pipelines/demo.py", "--output", str(out)]
    )
    assert status == "SUCCEEDED", f"job ended as {status}; logs:\n{logs}"

    run = json.loads((out / "run.json").read_text())
    assert run["stages"], run
    for stage in run["stages"]:
        assert stage["rows_in"] == stage["kept"] + stage["rejected"], stage
    names = {s.get("name") for s in run["stages"]}
    from pipelines.demo import pipeline

    assert {s.name for s in pipeline().stages} <= names, names

    # The funnel table the driver printed is the one run.json describes.
    from pipelines.runner import format_funnel

    title, header = format_funnel(run).splitlines()[:2]
    assert title in logs and header in logs, logs
