"""A global stage killed with kill -9 half way resumes from what it finished and writes the same
output as a run never interrupted: same files, same bytes (so the same ids, rows and reasons).

Each run is a script with a Ray of its own (tests/global_resume_run.py). The stage is slowed by a
test hook (tests/slow_hook: one of its functions sleeps before each call, in every worker) so the
kill lands inside it, at a point the test picks by watching the stage's folder:

- semdedup, once a shuffle partition's decisions are kept in `_work/checkpoint/`;
- semdedup, once the first output piece is committed (the apply step);
- phash_dedup, once the first piece's hashes are kept in `_work/narrow/` (the prepare step);
- cluster (a stage that `fits`), once its first output piece is committed: the resumed run keeps
  the centroids it fitted (`_work/decisions/_state.pkl`) and transforms the pieces left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_determinism import assert_same_output, kill_when
from worker_env import worker_pythonpath

from warren.pipelines.recipe import DEMO_DATA
from warren.pipelines.run_map import GLOBAL_ROWS_PER_PART

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "global_resume_run.py"


def _env(slow: str | None = None) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS / "slow_hook"), worker_pythonpath()])
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("WARREN_TEST_SLOW", None)
    if slow:
        env["WARREN_TEST_SLOW"] = slow
    return env


def _command(kind: str, pool: Path, out: Path, cpus: int) -> list[str]:
    return [sys.executable, str(SCRIPT), kind, str(pool), str(out), str(cpus)]


def _run(kind: str, pool: Path, out: Path, cpus: int = 2) -> str:
    proc = subprocess.run(
        _command(kind, pool, out, cpus),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _kill_when(kind: str, pool: Path, out: Path, cpus: int, slow: str, ready) -> None:
    """Start a run with `slow` in force and kill -9 its whole process group once `ready(out)`."""
    kill_when(_command(kind, pool, out, cpus), _env(slow), lambda: ready(out), "the kill point")


def _any(folder: Path, pattern: str) -> bool:
    return folder.exists() and any(not p.name.startswith(".tmp") for p in folder.glob(pattern))


def _embedding_pool(folder: Path, n: int = 1500) -> Path:
    """`n` rows of 32-d unit embeddings around 8 centres, a third of them near copies of another
    row, in 5 shards of uneven sizes."""
    rng = np.random.default_rng(7)
    d = 32
    centres = rng.normal(size=(8, d))
    x = centres[rng.integers(0, 8, n)] + 0.6 * rng.normal(size=(n, d))
    copies = rng.choice(n, n // 3, replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.01 * rng.normal(size=(len(copies), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = pa.array(x.astype(np.float16).ravel(), pa.float16())
    table = pa.table(
        {
            "id": [f"e-{i:05d}" for i in range(n)],
            "caption": [f"row {i}" for i in range(n)],
            "image_emb": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )
    folder.mkdir()
    cuts = [0, *(round(n * f) for f in (0.13, 0.43, 0.47, 0.8)), n]
    for s, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        pq.write_table(table.slice(a, b - a), folder / f"shard-{s}.parquet")
    return folder


def _image_pool(folder: Path) -> Path:
    """The demo pool seven times over (new ids): every image has six exact copies, and the pool
    spans three output pieces."""
    demo = pq.read_table(DEMO_DATA)
    folder.mkdir()
    for k in range(7):
        ids = pa.array([f"{i}-copy{k}" for i in demo.column("id").to_pylist()])
        pq.write_table(demo.set_column(0, "id", ids), folder / f"shard-{k}.parquet")
    assert 7 * demo.num_rows > 2 * GLOBAL_ROWS_PER_PART
    return folder


def _status(out: Path, folder: str) -> str:
    import json

    return json.loads((out / folder / "_manifest.json").read_text())["status"]


@pytest.fixture(scope="module")
def semdedup_run(tmp_path_factory) -> tuple[Path, Path]:
    """The embedding pool and its uninterrupted run."""
    folder = tmp_path_factory.mktemp("semdedup")
    # Two output pieces: a kill after the first one is committed lands before the second.
    pool = _embedding_pool(folder / "pool", n=GLOBAL_ROWS_PER_PART + 600)
    plain = folder / "plain"
    _run("semdedup", pool, plain)
    assert (plain / "02-semdedup" / "_manifest.json").exists()
    rejected = pq.read_table(plain / "02-semdedup" / "rejected").num_rows
    assert rejected > 100, "the pool must give semdedup duplicates to decide"
    return pool, plain


@pytest.mark.parametrize("point", ["checkpoint", "apply"])
def test_semdedup_killed_half_way_resumes_to_the_same_output(tmp_path, semdedup_run, point):
    pool, plain = semdedup_run

    stage = tmp_path / "resumed" / "02-semdedup"
    if point == "checkpoint":
        ready = lambda out: _any(stage / "_work" / "checkpoint", "*.parquet")  # noqa: E731
        slow = "warren.stages.semdedup:dedup_cluster_table:0.3"
    else:
        ready = lambda out: _any(stage / "_progress", "*.json")  # noqa: E731
        slow = "warren.pipelines.run_global:read_piece:1.0"
    _kill_when("semdedup", pool, tmp_path / "resumed", 2, slow, ready)
    assert not (stage / "_manifest.json").exists(), "semdedup finished before the kill"
    if point == "apply":
        assert len(list((stage / "_progress").glob("*.json"))) < 2, "every piece was written"

    log = _run("semdedup", pool, tmp_path / "resumed")
    assert _status(tmp_path / "resumed", "02-semdedup") == "resumed"
    if point == "apply":
        assert "decisions already made" in log
        assert "pieces already written" in log
    assert_same_output(plain, tmp_path / "resumed")


def test_phash_dedup_killed_while_hashing_resumes_to_the_same_output(tmp_path):
    pool = _image_pool(tmp_path / "pool")
    plain = tmp_path / "plain"
    _run("phash", pool, plain)
    stage = tmp_path / "resumed" / "01-phash_dedup"
    _kill_when(
        "phash",
        pool,
        tmp_path / "resumed",
        1,
        "warren.stages.phash_dedup:hash_batch:1.0",
        lambda out: _any(stage / "_work" / "narrow", "*.parquet"),
    )
    assert not (stage / "_manifest.json").exists(), "phash_dedup finished before the kill"
    log = _run("phash", pool, tmp_path / "resumed")
    assert "pieces already prepared" in log
    assert _status(tmp_path / "resumed", "01-phash_dedup") == "resumed"
    assert_same_output(plain, tmp_path / "resumed")


def test_cluster_killed_while_applying_keeps_its_centroids_and_resumes_to_the_same_output(
    tmp_path, semdedup_run
):
    """cluster `fits`: its centroids are kept once fitted, and each piece is transformed as it is
    written. Killed after the first of two pieces, the resumed run fits nothing again."""
    pool, plain = semdedup_run
    stage = tmp_path / "resumed" / "01-cluster"
    ready = lambda out: _any(stage / "_progress", "*.json")  # noqa: E731
    slow = "warren.pipelines.run_global:read_piece:2.0"
    _kill_when("semdedup", pool, tmp_path / "resumed", 2, slow, ready)
    assert (stage / "_work" / "decisions" / "_state.pkl").exists()
    assert len(list((stage / "_progress").glob("*.json"))) < 2, "cluster finished before the kill"

    log = _run("semdedup", pool, tmp_path / "resumed")
    assert _status(tmp_path / "resumed", "01-cluster") == "resumed"
    assert "decisions already made" in log and "pieces already written" in log
    assert_same_output(plain, tmp_path / "resumed")
