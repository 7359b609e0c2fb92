"""The README's `ray job submit` commands work as written, whatever state `~/.ray` is in.

Ray 2.60 starts a head with token authentication as soon as a token exists (RAY_AUTH_TOKEN, the file
at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which any in-process `ray.init()` -- a local recipe run,
the `ray_session` fixture -- writes), but `ray job` commands only send the token when
RAY_AUTH_MODE=token is set in their own environment: on a machine that ever ran warren locally, a bare
`ray start --head` + `ray job submit` pair fails with `Missing authentication token`.

The test takes the bash block of the README's "On a Ray cluster" section and runs it as written, in
a temporary HOME (the real ~/.ray is never touched) that is either fresh or holds the token an
in-process `ray.init()` left there. Only what must differ on a shared test machine is substituted:
the head's ports and temp dir (so it cannot collide with another Ray), its address, and the output
folder. It then checks the job's run.json and funnel table, that the job imported warren as
installed (the README: every node needs warren installed; `--working-dir .` ships the scripts, and
the copy of the package folders it ships is never imported), and that the head really requires a
token (a `ray job` command without RAY_AUTH_MODE=token is refused).

Teardown never runs `ray stop` (it stops every Ray on the machine, including the session's in-process
one): it kills the processes of the commands' own session (started with start_new_session=True),
anything naming the cluster's private temp dir, and their children.
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
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

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


README = ROOT / "README.md"
SECTION = "### On a Ray cluster"


def documented_commands() -> str:
    """The first bash block of the README's cluster section, as written."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def _substitute(script: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, script, flags=re.MULTILINE)
    assert count == 1, f"README cluster commands: expected one match of {pattern!r} in\n{script}"
    return new


def _on_this_machine(script: str, dash_port: int, temp_dir: str, out: Path) -> str:
    """The README's commands with private ports, temp dir and output folder."""
    start = " ".join(
        [
            "ray start --head",
            f"--port={_free_port()}",
            "--num-cpus=2",
            "--object-store-memory=268435456",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            # The fixed defaults (10001, 52365) would collide with another Ray on this machine.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
    )
    script = _substitute(script, r"^ray start --head\b.*$", start)
    script = _substitute(script, r"\bHEAD:8265\b", f"127.0.0.1:{dash_port}")
    return _substitute(script, r"/shared/warren-out/demo\b", str(out))


def _token_left_by_ray_init(home: Path, env: dict) -> None:
    """What a local recipe run leaves in HOME: an in-process ray.init() writes ~/.ray/auth_token."""
    temp_dir = tempfile.mkdtemp(prefix="wi-", dir="/tmp")
    code = (
        "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False, "
        f"_temp_dir={temp_dir!r}); ray.shutdown()"
    )
    try:
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
            start_new_session=True,
        )
    finally:
        _kill_cluster(-1, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert (home / ".ray" / "auth_token").is_file(), "ray.init() no longer writes ~/.ray/auth_token"


@pytest.mark.parametrize("state", ["fresh", "token_from_ray_init"])
def test_readme_commands_submit_the_demo_recipe_on_a_fresh_head(state: str, tmp_path: Path) -> None:
    pytest.importorskip("aiohttp", reason="the job server needs ray[default]")
    home = tmp_path / "home"
    home.mkdir()
    env = _child_env(HOME=str(home))
    if state == "token_from_ray_init":
        _token_left_by_ray_init(home, env)
    # Unix socket paths are capped at ~107 bytes and Ray nests session_<date>_<pid>/sockets/...
    # under the temp dir, so pytest's tmp_path is too long: use a short /tmp directory.
    temp_dir = tempfile.mkdtemp(prefix="wr-", dir="/tmp")
    dash_port = _free_port()
    out = tmp_path / "out"
    script = _on_this_machine(documented_commands(), dash_port, temp_dir, out)
    log_path = tmp_path / "commands.log"
    session = -1
    try:
        with open(log_path, "w") as log:
            # Output to a file, not a pipe: the daemons `ray start` leaves behind hold it open.
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            session = proc.pid  # the session leader's pid is the session id
            try:
                rc = proc.wait(timeout=JOB_TIMEOUT_S + 90)
            except subprocess.TimeoutExpired:
                rc = None
        logs = _plain(log_path.read_text())
        assert rc == 0, f"the README's commands ended with {rc}:\n{script}\n---\n{logs}"

        run = json.loads((out / "run.json").read_text())
        assert run["stages"], run
        for stage in run["stages"]:
            assert stage["rows_in"] == stage["kept"] + stage["rejected"], stage
        from warren.pipelines.demo import pipeline
        from warren.pipelines.recipe import DEMO_DATA
        from warren.pipelines.runner import format_funnel

        # The job's driver read the demo pool through the warren this interpreter imports (the
        # install, or the checkout a PYTHONPATH names), not through the shipped working dir.
        assert str(DEMO_DATA) in logs, logs

        assert {s.name for s in pipeline().stages} <= {s.get("name") for s in run["stages"]}
        # The funnel table the job's driver printed (streamed by `ray job submit`) is run.json's.
        title, header = format_funnel(run).splitlines()[:2]
        assert title in logs and header in logs, logs

        # The head the commands started requires the token: without RAY_AUTH_MODE=token, even
        # with the token file at hand, `ray job` is refused (the failure the README's first two
        # lines prevent).
        bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        res = subprocess.run(
            [*_ray_cli(), "job", "list", "--address", f"http://127.0.0.1:{dash_port}"],
            env=bare,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0 and "Unauthorized" in res.stdout, res.stdout
    finally:
        _kill_cluster(session, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
