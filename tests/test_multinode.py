"""A two-node Ray cluster loses its worker node in the middle of a stage, and the run's output is
still exactly an uninterrupted run's.

The cluster is started on this machine as on a real one, each node with `ray start` on 127.0.0.1
with ports and a temp dir of its own: a head with no CPUs (it runs the GCS, the job server and the
job's driver, as KubeRay recommends for a head) and a worker node with 2 CPUs, so every task and
actor of the run lands on the worker node. `bunny_pretrain` is submitted with `ray job submit`;
once `embed` (a model stage, an actor pool) has committed a piece and before it completes, every
process of the worker node (its `ray start`, raylet, agents and workers) is killed with SIGKILL,
the way a node is lost when its machine dies. Then, in two runs:

1. a replacement node joins (as an autoscaler or KubeRay would start one) and the job goes on to
   finish (had it failed, the same command is submitted again);
2. the job is stopped while no node is left (`ray job stop`), a node joins, and the same command
   submitted again resumes embed from the pieces it had committed.

Either way every stage's kept and rejected rows, reasons and shard bytes equal those of an
uninterrupted run of the same command (tests/test_determinism.py's comparison), and the embed
pieces committed before the loss are not written again.

Every process this test starts runs in a session of its own (start_new_session); teardown kills
those sessions' processes and anything naming the nodes' private temp dirs, by pid, never with
`ray stop` (which would stop every Ray on the machine). HOME is a temporary folder, so the real
~/.ray (its token) is never touched. Marked `multinode` (minutes): `.ci/run` runs it in a step of
its own, after the main suite.
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

import pytest
from test_determinism import FLAGS, SCRIPT, assert_same_output, demo_slice_pool
from worker_env import worker_pythonpath

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


#: Every port this module handed out: Ray refuses a node whose worker port range holds a port
#: given to another of its components.
_TAKEN: set[int] = set()


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _ray() -> str:
    exe = BIN / "ray"
    return str(exe) if exe.exists() else shutil.which("ray") or "ray"


class Node:
    """One `ray start --block` of this cluster: its process (a session leader), temp dir, log."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path) -> None:
        self.name = name
        self.alive = True
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

        self.alive = False

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
    """The lowest of `width` consecutive ports that are free now (workers bind them later) and
    that no other component of this test was given."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            lo = s.getsockname()[1]
        ports = range(lo, lo + width)
        if lo + width > 65535 or _TAKEN.intersection(ports):
            continue
        taken = False
        for port in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            _TAKEN.update(ports)
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


def _has_node(gcs: str, env: dict, name: str) -> bool:
    """True once the cluster counts the node's own resource (`ray status`: `0.0/1.0 NAME`)."""
    res = _run([_ray(), "status", f"--address={gcs}"], env)
    return re.search(rf"/1\.0 {re.escape(name)}\b", res.stdout) is not None


def _wait_for(what: str, check, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def _start_reference(pool: Path, out: Path, log: Path) -> subprocess.Popen:
    """The uninterrupted run, as a script with a Ray of its own (it runs while the cluster starts)."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env["PYTHONPATH"] = worker_pythonpath()
    cmd = [sys.executable, str(SCRIPT), "--input", str(pool), "--output", str(out), *FLAGS]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


class Cluster:
    """A head with no CPUs and the worker nodes that join it, all on 127.0.0.1."""

    def __init__(self, env: dict, logs: Path) -> None:
        self.env, self.logs = env, logs
        gcs_port, dash_port = _free_port(), _free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        self.nodes: list[Node] = []
        head_args = [
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=0",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={_free_port()}",
        ]
        self.nodes.append(Node("head", head_args, env, logs))
        try:
            self.wait_for(
                "the head's job server",
                lambda: self.ray("job", "list", f"--address={self.dashboard}").returncode == 0,
            )
        except BaseException:
            self.stop()  # the caller never gets this object to stop
            raise

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run([_ray(), *args], self.env, timeout)

    def wait_for(self, what: str, check) -> None:
        def ready() -> bool:
            dead = [n.name for n in self.nodes if n.alive and n.proc.poll() is not None]
            if dead:
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-3000:]}" for n in self.nodes)
                pytest.fail(f"`ray start` of {dead} ended while waiting for {what}\n{logs}")
            return check()

        _wait_for(what, ready, START_TIMEOUT_S, [n.log for n in self.nodes])

    def join(self, name: str) -> Node:
        """A worker node with WORKER_CPUS CPUs; returns once the cluster counts them."""
        args = [
            f"--address={self.gcs}",
            f"--num-cpus={WORKER_CPUS}",
            f'--resources={{"{name}": 1}}',
            # One log monitor per host (the head's); this node's logs stay in its temp dir.
            "--include-log-monitor=false",
        ]
        node = Node(name, args, self.env, self.logs)
        self.nodes.append(node)
        self.wait_for(f"{name} to join", lambda: _has_node(self.gcs, self.env, name))
        return node

    def submit(self, args: list[str], log: Path, submission_id: str) -> subprocess.Popen:
        """`ray job submit` (it streams the job's output into `log` and ends with the job)."""
        cmd = [_ray(), "job", "submit", f"--address={self.dashboard}"]
        cmd += [f"--submission-id={submission_id}", "--", "python", str(SCRIPT), *args]
        with open(log, "w") as out:
            return subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def _when_embed_committed_a_piece(embed: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (embed / "_progress").is_dir() or not any((embed / "_progress").glob("*.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the job never reached embed:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _committed(embed: Path) -> dict[str, int]:
    """The embed pieces committed so far, by ledger entry, with the entry's mtime."""
    return {p.name: p.stat().st_mtime_ns for p in (embed / "_progress").glob("*.json")}


def _wait(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None


def _assert_same_run(reference: Path, out: Path, committed: dict[str, int]) -> None:
    assert_same_output(reference, out)
    run = json.loads((out / "run.json").read_text())
    ref_run = json.loads((reference / "run.json").read_text())
    assert [(s["name"], s["kept"], s["rejected"], s["reasons"]) for s in run["stages"]] == [
        (s["name"], s["kept"], s["rejected"], s["reasons"]) for s in ref_run["stages"]
    ]
    # The pieces embed committed before its node was lost were kept, not recomputed.
    assert committed
    after = _committed(out / "03-embed")
    assert {k: after.get(k) for k in committed} == committed


def test_losing_the_worker_node_in_the_middle_of_embed_changes_no_output_row(tmp_path):
    pytest.importorskip("aiohttp", reason="the job server needs ray[default]")
    pool = demo_slice_pool(tmp_path / "pool")
    logs = tmp_path / "logs"
    logs.mkdir()
    reference = tmp_path / "reference"
    ref_proc = _start_reference(pool, reference, logs / "reference.log")

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

    def args(out: Path) -> list[str]:
        return ["--input", str(pool), "--output", str(out), *FLAGS]

    cluster = None
    try:
        cluster = Cluster(env, logs)
        worker = cluster.join("worker1")
        assert ref_proc.wait(timeout=300) == 0, (logs / "reference.log").read_text()[-3000:]

        # 1. The node is lost mid-embed and a replacement joins: the job goes on (or, had it
        # failed, the same command again resumes it).
        out, log = tmp_path / "out1", logs / "job1.log"
        proc = cluster.submit(args(out), log, "lost-node")
        _when_embed_committed_a_piece(out / "03-embed", proc, log)
        killed = worker.kill()
        committed = _committed(out / "03-embed")
        assert not (out / "03-embed" / "_manifest.json").exists(), "embed completed before the kill"
        assert len(killed) >= 3, f"the worker node had only processes {killed}"
        worker = cluster.join("worker2")
        rc = _wait(proc)
        assert rc is not None, f"the job hung after losing its node:\n{log.read_text()[-3000:]}"
        if rc != 0:
            again = cluster.ray(*_submit_args(cluster, args(out)), timeout=JOB_TIMEOUT_S)
            assert again.returncode == 0, log.read_text()[-3000:] + "\n---\n" + again.stdout[-3000:]
        _assert_same_run(reference, out, committed)

        # 2. The node is lost mid-embed and the job is stopped with it (no node to go on with):
        # once a node is back, the same command resumes embed from its committed pieces.
        out, log = tmp_path / "out2", logs / "job2.log"
        proc = cluster.submit(args(out), log, "stopped")
        _when_embed_committed_a_piece(out / "03-embed", proc, log)
        worker.kill()
        committed = _committed(out / "03-embed")
        stop = cluster.ray("job", "stop", f"--address={cluster.dashboard}", "stopped", timeout=120)
        assert stop.returncode == 0, stop.stdout
        # (`ray job submit` itself ends with 0 when its job is stopped.)
        assert _wait(proc) is not None, log.read_text()[-3000:]
        status = cluster.ray("job", "status", f"--address={cluster.dashboard}", "stopped")
        assert "was stopped" in status.stdout, status.stdout
        assert not (out / "03-embed" / "_manifest.json").exists(), "embed completed before the kill"
        cluster.join("worker3")
        again = cluster.ray(*_submit_args(cluster, args(out)), timeout=JOB_TIMEOUT_S)
        assert again.returncode == 0, again.stdout[-3000:]
        manifest = json.loads((out / "03-embed" / "_manifest.json").read_text())
        assert manifest["status"] == "resumed"
        _assert_same_run(reference, out, committed)
    finally:
        if ref_proc.poll() is None:
            os.killpg(ref_proc.pid, signal.SIGKILL)
            ref_proc.wait()
        if cluster is not None:
            cluster.stop()


def _submit_args(cluster: Cluster, args: list[str]) -> list[str]:
    return ["job", "submit", f"--address={cluster.dashboard}", "--", "python", str(SCRIPT), *args]
