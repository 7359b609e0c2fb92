"""warren installs as one import package and runs from anywhere: the checkout is built and
installed NON-editable into a fresh virtual environment, and a recipe runs from another folder.

The venv is made with --system-site-packages (torch, ray and the other dependencies come from this
machine) and --without-pip (pip runs from the system site, so the venv's own site-packages starts
empty and holds exactly what the install put there). The machine may also hold an editable install
of warren (a checkout's path hook in the system site): the venv's copy must win, because its
site-packages comes first on sys.path and the import system's PathFinder runs before the editable
finder. The tests prove it by where the modules load from.

Slow (about 35 s on 2 CPUs, mostly the demo run): marked `packaging`; deselect with
`-m "not packaging"` for a quick pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("stages", "pipelines", "trainers", "prompts")
DIST = "warren_vlm"  # the distribution warren-vlm, as its dist-info folder spells it
# What a client of the install must not see: Ray, the runner or pytest pointed elsewhere.
_FOREIGN_VARS = ("PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS", "VIRTUAL_ENV")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _source_tree(dst: Path) -> None:
    """What a fresh clone holds: the checkout's tracked and not-ignored files (no build/, no
    egg-info, no outputs), so the build can write its own build/ without touching the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace').strip()}")
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not in a clone
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("packaging")
    src, env_dir, elsewhere = base / "src", base / "venv", base / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    _source_tree(src)
    made = _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
        base,
        120,
    )
    assert made.returncode == 0, made.stderr
    python = env_dir / "bin" / "python"
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            base,
            60,
        ).stdout.strip()
    )
    before = set(os.listdir(purelib)) if purelib.is_dir() else set()
    # pip comes from the system site; it installs into the interpreter that runs it: the venv's.
    installed = _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        base,
        300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return {
        "python": python,
        "bin": env_dir / "bin",
        "purelib": purelib,
        "added": set(os.listdir(purelib)) - before,
        "elsewhere": elsewhere,
    }


def test_site_packages_gains_only_warren_and_its_dist_info(venv: dict) -> None:
    added = {n for n in venv["added"] if n != "__pycache__"}
    dist_info = {n for n in added if n.endswith(".dist-info")}
    assert added - dist_info == {"warren"}, sorted(added)
    assert [n.split("-")[0] for n in dist_info] == [DIST], sorted(added)
    pkg = venv["purelib"] / "warren"
    assert not (pkg / "__init__.py").exists(), "warren is a namespace package"
    assert sorted(p.name for p in pkg.iterdir() if p.name != "__pycache__") == sorted(SUBPACKAGES)


def test_package_data_is_installed_and_the_build_tools_are_not(venv: dict) -> None:
    pkg = venv["purelib"] / "warren"
    for rel in ("pipelines/demo_data/demo.parquet", "pipelines/demo_data/README.md"):
        assert (pkg / rel).is_file(), rel
    clip = ROOT / "pipelines" / "demo_data" / "demo_clip"
    assert {p.name for p in clip.iterdir()} <= {
        p.name for p in (pkg / "pipelines/demo_data/demo_clip").iterdir()
    }
    prompts = {p.relative_to(ROOT / "prompts") for p in (ROOT / "prompts").rglob("*.*")}
    prompts = {p for p in prompts if "__pycache__" not in p.parts}
    assert prompts and all((pkg / "prompts" / p).is_file() for p in prompts)
    # demo-data build tools live in tools/, outside the package
    assert not list((pkg / "pipelines" / "demo_data").glob("*.py"))
    assert (venv["bin"] / "warren").is_file()


def test_the_venvs_copy_wins_over_any_other_install(venv: dict) -> None:
    code = (
        "import json, importlib\n"
        "names = ['warren.stages', 'warren.stages.base', 'warren.pipelines.cli', "
        "'warren.pipelines.recipe', 'warren.trainers', 'warren.prompts']\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    res = _run([str(venv["python"]), "-c", code], venv["elsewhere"], 120)
    assert res.returncode == 0, res.stderr
    for name, file in json.loads(res.stdout).items():
        path = Path(file).resolve()
        assert path.is_relative_to(venv["purelib"].resolve()), (name, file)
        assert not path.is_relative_to(ROOT), (name, file)


def test_a_recipe_runs_from_another_folder_on_the_installed_package(venv: dict) -> None:
    out = venv["elsewhere"] / "out"
    res = _run(
        [str(venv["bin"] / "warren"), "run", "demo", "--output", str(out)],
        venv["elsewhere"],
        400,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    stages = run["stages"]
    assert stages and all(s["rows_in"] == s["kept"] + s["rejected"] for s in stages), stages
    # The demo pool it read is the installed package data, not the checkout's file.
    assert str(venv["purelib"] / "warren" / "pipelines" / "demo_data") in res.stdout, res.stdout
    assert stages[0]["rows_in"] == 658  # the demo pool's rows (pipelines/demo_data/README.md)
