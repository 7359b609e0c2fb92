"""The layers of ARCHITECTURE.md hold: `lint-imports` keeps the contracts in pyproject.toml, an
upward import breaks them, and no two warren modules import each other.

import-linter (and grimp, which builds its graph) finds a package by walking the folders of
`warren.__path__`; an editable install reaches them through a path hook it cannot walk. So each
test gives the tool a folder of its own: `warren/` holding links to this checkout's four folders
(or copies of their .py files, for the tests that plant an import), alone on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="the dev extra installs import-linter")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
SUBPACKAGES = ("stages", "pipelines", "trainers", "prompts")


def _lint_imports_cmd() -> list[str]:
    beside = Path(sys.executable).parent / "lint-imports"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("lint-imports")
    assert found, "lint-imports is not installed (pip install -e '.[dev]')"
    return [found]


def _linked_view(tmp: Path) -> Path:
    """A folder whose warren/ links to this checkout's subpackages."""
    pkg = tmp / "view" / "warren"
    pkg.mkdir(parents=True)
    for name in SUBPACKAGES:
        (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    return pkg.parent


def _copied_view(tmp: Path) -> Path:
    """A folder whose warren/ holds copies of the checkout's .py files, free to edit."""
    pkg = tmp / "copy" / "warren"
    pkg.mkdir(parents=True)

    def not_python(folder: str, names: list[str]) -> set[str]:
        return {
            n for n in names if not n.endswith(".py") and not os.path.isdir(os.path.join(folder, n))
        } | {"__pycache__"}

    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, pkg / name, ignore=not_python)
    return pkg.parent


def _env(view: Path) -> dict[str, str]:
    # The view alone: another checkout on PYTHONPATH would add its own portion of the namespace.
    return {**os.environ, "PYTHONPATH": str(view)}


def _lint(view: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_lint_imports_cmd(), str(CONFIG), "--no-cache", "--no-logo"],
        cwd=view,
        env=_env(view),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lint_imports_keeps_every_contract(tmp_path: Path) -> None:
    res = _lint(_linked_view(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "0 broken" in out, out
    # The graph really is warren's: a view the tool could not walk would break the layers
    # contract with "module does not exist" instead.
    assert "Analyzed" in out and "KEPT" in out, out


@pytest.mark.parametrize(
    ("importer", "line", "named"),
    [
        # a stage reaching up into the recipe layer
        ("stages/select.py", "import warren.pipelines.runner", "warren.pipelines.runner"),
        # a recipe using the trainers (only the CLI may, for `warren train`)
        ("pipelines/demo.py", "import warren.trainers.templates", "warren.trainers.templates"),
        # a trainer using a stage beyond schema, shards, images and the run layout
        ("trainers/data.py", "import warren.stages.embed", "warren.stages.embed"),
        # the prompts importing code
        ("prompts/__init__.py", "import warren.stages.schema", "warren.stages.schema"),
    ],
)
def test_lint_imports_fails_on_a_planted_import_and_names_it(
    tmp_path: Path, importer: str, line: str, named: str
) -> None:
    view = _copied_view(tmp_path)
    path = view / "warren" / importer
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # planted\n", encoding="utf-8")
    res = _lint(view)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "BROKEN" in out, out
    module = "warren." + importer.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert f"{module} -> {named}" in out, out


# --- cycles ---------------------------------------------------------------------------------

_EDGES = """
import json, grimp
# Imports under `if TYPE_CHECKING:` run only for type checkers: they close no loop at import time.
graph = grimp.build_graph("warren", cache_dir=None, exclude_type_checking_imports=True)
print(json.dumps(sorted(
    [m, i] for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
)))
"""


def import_cycles(edges: list[tuple[str, str]]) -> set[frozenset[str]]:
    """The modules that reach each other through imports: strongly connected components of two
    or more modules (Tarjan's algorithm, iterative so a deep graph cannot overflow the stack)."""
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(succ[node]):
                work.append((node, i + 1))
                nxt = succ[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.add(frozenset(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_import_cycles_finds_each_loop_and_nothing_else() -> None:
    # a -> b -> c -> a is one loop; d <-> e another; c -> d joins them one way only; f stands alone.
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("e", "d"), ("f", "a")]
    assert import_cycles(edges) == {frozenset("abc"), frozenset("de")}
    assert import_cycles([("a", "b"), ("b", "c")]) == set()


@pytest.fixture(scope="module")
def warren_edges(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    view = _linked_view(tmp_path_factory.mktemp("cycles"))
    res = subprocess.run(
        [sys.executable, "-c", _EDGES],
        cwd=view,
        env=_env(view),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    edges = [tuple(e) for e in json.loads(res.stdout)]
    assert any(a == "warren.pipelines.runner" for a, _ in edges), "the graph misses the runner"
    return edges


@pytest.fixture(scope="module")
def warren_cycles(warren_edges: list[tuple[str, str]]) -> set[frozenset[str]]:
    return import_cycles(warren_edges)


# ARCHITECTURE.md: stages -> (schema, shards, models, clients). The modules every operator
# builds on: the row schema, shard and layout I/O, image decoding, model loading, the endpoint
# client and the stage contract. They import each other and nothing else of warren.stages.
FOUNDATION = {
    f"warren.stages.{name}"
    for name in (
        "schema", "shards", "run_layout", "images", "models", "model_fetch", "lm",
        "llm_client", "chat_request", "request_limits", "response_cache", "watchdog",
        "base", "conversation",
    )
}  # fmt: skip


def test_the_foundation_of_stages_imports_no_operator(
    warren_edges: list[tuple[str, str]],
) -> None:
    modules = {m for edge in warren_edges for m in edge}
    assert FOUNDATION <= modules, sorted(FOUNDATION - modules)
    upward = sorted(
        f"{a} -> {b}"
        for a, b in warren_edges
        if a in FOUNDATION and b.startswith("warren.") and b not in FOUNDATION
    )
    assert not upward, upward


def test_no_module_imports_itself_back(warren_cycles: set[frozenset[str]]) -> None:
    assert warren_cycles == set(), sorted(sorted(c) for c in warren_cycles)
