"""A two-node Ray cluster loses its worker node in the middle of a stage, and the run's output is
still exactly an uninterrupted run's.

The cluster is started on this machine as on a real one, each node with `ray start` on 127.0.0.1
with ports and a temp dir of its own: a head with no CPUs (it runs the GCS, the job server and the
job's driver, as KubeRay recommends for a head) and a worker node with 2 CPUs, so every task and
actor of the run lands on the worker node. `bunny_pretrain` is submitted with `ray job submit`;
once `embed` (a model stage, an actor pool) has committed a piece and before it completes, every
process of the worker node (its `ray start`, raylet, agents and workers) is killed with SIGKILL,
the way a node is lost when its machine dies. A replacement node joins (as an autoscaler or KubeRay
would start one). The job either finishes on it, or fails and is re-submitted with the same
command, which resumes; either way every stage's kept and rejected rows, reasons and shard bytes
equal those of an uninterrupted run of the same command (tests/test_determinism.py's comparison).

Every process this test starts runs in a session of its own (start_new_session); teardown kills
those sessions' processes and anything naming the nodes' private temp dirs, by pid, never with
`ray stop` (which would stop every Ray on the machine). HOME is a temporary folder, so the real
~/.ray (its token) is never touched. Marked `multinode` (about 2 minutes on 2 idle cores): `.ci/run`
runs it in a step of its own, after the main suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_determinism import FLAGS, SCRIPT, SHARD_SIZES, assert_same_output
from worker_env import worker_pythonpath

from warren.pipelines.recipe import DEMO_DATA

pytestmark = pytest.mark.multinode

BIN = Path(sys.executable).parent
# Variables that would point `ray` commands at another cluster or another token.
_FOREIGN_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)
WORKER_CPUS = 2
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    exe = BIN / "ray"
    return str(exe) if exe.exists() else shutil.which("ray") or "ray"


class Node:
    """One `ray start --block` of this cluster: its process (a session leader), temp dir, log."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path) -> None:
        self.name = name
        self.temp_dir = tempfile.mkdtemp(prefix=f"wm{name[0]}-", dir="/tmp")
        ports = [
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        lo = _free_port_range()
        cmd = [
            _ray(),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000",
            f"--min-worker-port={lo}",
            f"--max-worker-port={lo + 99}",
            "--disable-usage-stats",
            *ports,
            *args,
        ]
        self.log = logs / f"{name}.log"
        with open(self.log, "w") as out:
            # A file, not a pipe: the node's daemons would hold a pipe open.
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def pids(self) -> set[int]:
        """This node's processes: its session's, their children, anything naming its temp dir."""
        import psutil

        mine = re.escape(self.temp_dir) + r"[/\s]"
        found: set[int] = set()
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or []) + " "
                if os.getsid(p.pid) == self.proc.pid or re.search(mine, cmd):
                    found.add(p.pid)
                    found.update(c.pid for c in p.children(recursive=True))
            except (psutil.Error, OSError):
                continue
        found.discard(os.getpid())
        return found

    def kill(self, sig: int = signal.SIGKILL) -> set[int]:
        import psutil

        pids = self.pids()
        procs = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                p.send_signal(sig)
                procs.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return pids

    def stop(self) -> None:
        self.kill(signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_port_range(width: int = 100) -> int:
    """The lowest of `width` consecutive ports that are free now (workers bind them later)."""
    for _ in range(50):
        lo = _free_port()
        if lo + width > 65535:
            continue
        taken = False
        for port in range(lo, lo + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return lo
    raise RuntimeError("no range of free ports for Ray workers")


def _run(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def _cluster_cpus(gcs: str, env: dict) -> float:
    res = _run([_ray(), "status", f"--address={gcs}"], env)
    m = re.search(r"([\d.]+)/([\d.]+) CPU", res.stdout)
    return float(m.group(2)) if m else -1.0


def _wait_for(what: str, check, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def _pool(folder: Path) -> Path:
    """tests/test_determinism.py's slice of the demo pool in uneven shards: several embed pieces."""
    folder.mkdir()
    rows = pq.read_table(DEMO_DATA).slice(0, sum(SHARD_SIZES))
    start = 0
    for i, n in enumerate(SHARD_SIZES):
        pq.write_table(rows.slice(start, n), folder / f"shard-{i}.parquet")
        start += n
    return folder


def _reference(pool: Path, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env["PYTHONPATH"] = worker_pythonpath()
    res = _run(
        [sys.executable, str(SCRIPT), "--input", str(pool), "--output", str(out), *FLAGS],
        env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:]


def test_losing_the_worker_node_in_the_middle_of_embed_changes_no_output_row(tmp_path):
    pytest.importorskip("aiohttp", reason="the job server needs ray[default]")
    pool = _pool(tmp_path / "pool")
    reference = tmp_path / "reference"
    _reference(pool, reference)

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        PYTHONPATH=worker_pythonpath(),
        RAY_USAGE_STATS_ENABLED="0",
    )
    # The README's two lines: a token (in the temporary HOME), and the mode for every command.
    _run([_ray(), "get-auth-token", "--generate"], env).check_returncode()
    env["RAY_AUTH_MODE"] = "token"

    logs = tmp_path / "logs"
    logs.mkdir()
    gcs_port, dash_port = _free_port(), _free_port()
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
    nodes: list[Node] = []
    job = logs / "job.log"
    out = tmp_path / "out"
    submit = [
        _ray(),
        "job",
        "submit",
        f"--address={dashboard}",
        "--",
        "python",
        str(SCRIPT),
        "--input",
        str(pool),
        "--output",
        str(out),
        *FLAGS,
    ]
    try:
        head = Node(
            "head",
            [
                "--head",
                f"--port={gcs_port}",
                "--num-cpus=0",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={_free_port()}",
            ],
            env,
            logs,
        )
        nodes.append(head)
        all_logs = [head.log, job]
        _wait_for(
            "the head's job server",
            lambda: _run([_ray(), "job", "list", f"--address={dashboard}"], env).returncode == 0,
            START_TIMEOUT_S,
            all_logs,
        )

        def join(name: str) -> Node:
            node = Node(
                name,
                [
                    f"--address={gcs}",
                    f"--num-cpus={WORKER_CPUS}",
                    f'--resources={{"{name}": 1}}',
                    "--include-log-monitor=false",
                ],
                env,
                logs,
            )
            nodes.append(node)
            all_logs.append(node.log)
            _wait_for(
                f"{name} to join",
                lambda: _cluster_cpus(gcs, env) == WORKER_CPUS,
                START_TIMEOUT_S,
                all_logs,
            )
            return node

        worker = join("worker")

        # Submit, and kill the worker node once embed has committed a piece, before it completes.
        embed = out / "03-embed"
        with open(job, "w") as job_log:
            proc = subprocess.Popen(
                submit, env=env, stdout=job_log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not (embed / "_progress").is_dir() or not any(
                (embed / "_progress").glob("*.json")
            ):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the job never reached embed:\n{job.read_text()[-3000:]}")
                time.sleep(0.02)
            killed = worker.kill()
            committed = {p.name: p.stat().st_mtime_ns for p in (embed / "_progress").glob("*.json")}
            done_at_kill = len(committed)
            assert not (embed / "_manifest.json").exists(), "embed completed before the kill"
            assert len(killed) >= 3, f"the worker node had only processes {killed}"

            join("replacement")
            try:
                rc = proc.wait(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
        first = job.read_text()
        resubmitted = rc != 0
        if resubmitted:
            # The job failed with its node: the same command again resumes it.
            assert rc is not None, f"the job hung after losing its node:\n{first[-3000:]}"
            again = _run(submit, env, timeout=JOB_TIMEOUT_S)
            assert again.returncode == 0, first[-3000:] + "\n---\n" + again.stdout[-3000:]

        manifest = json.loads((embed / "_manifest.json").read_text())
        assert_same_output(reference, out)
        run = json.loads((out / "run.json").read_text())
        ref_run = json.loads((reference / "run.json").read_text())
        assert [(s["name"], s["kept"], s["rejected"], s["reasons"]) for s in run["stages"]] == [
            (s["name"], s["kept"], s["rejected"], s["reasons"]) for s in ref_run["stages"]
        ]
        # The pieces embed committed before the kill were kept, not recomputed.
        assert done_at_kill >= 1
        after = {p.name: p.stat().st_mtime_ns for p in (embed / "_progress").glob("*.json")}
        assert {k: after.get(k) for k in committed} == committed
        if resubmitted:
            assert manifest["status"] == "resumed", manifest["status"]
        print(
            f"worker node killed with {done_at_kill} embed piece(s) committed; "
            + (
                "the job failed and a re-submission resumed it"
                if resubmitted
                else "the job finished"
            )
        )
    finally:
        for node in reversed(nodes):
            node.stop()
