"""Deterministic output: the same input and parameters give bit-identical output folders, whatever
the number of workers or the point a killed run resumed from.

The recipe is bunny_pretrain (embed with the demo CLIP, k-means, component dedup, two rank windows,
a sample) on a slice of the demo pool cut into shards of uneven sizes, run as a user runs it: as a
script, each run with a Ray of its own. Every stage's kept and rejected shards are compared: the
same file names, and the same bytes (so every column, floats included, is bit-identical).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from worker_env import worker_pythonpath

from warren.pipelines.recipe import DEMO_CLIP, DEMO_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "bunny_pretrain.py"
# Uneven shards: a map stage whose pieces followed Ray's blocks would cut them differently.
SHARD_SIZES = (23, 61, 17, 48, 35, 56)
# Enough clusters, and a draw smaller than what reaches it, that every global stage decides.
FLAGS = [
    "--embed.model",
    DEMO_CLIP,
    # a slice of the demo pool, cut into shards: the demo CLIP's own data, not the bundled file
    "--allow-demo-model",
    "--cluster.n_clusters",
    "6",
    "--sample.n",
    "15",
    "--quiet",
    "--no-report",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    env.pop("RAY_ADDRESS", None)
    return env


def _command(pool: Path, out: Path, num_cpus: int) -> list[str]:
    return (
        [sys.executable, str(SCRIPT), "--input", str(pool), "--output", str(out)]
        + FLAGS
        + [
            "--num-cpus",
            str(num_cpus),
        ]
    )


def _run(pool: Path, out: Path, num_cpus: int) -> None:
    proc = subprocess.run(
        _command(pool, out, num_cpus),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def demo_slice_pool(folder: Path) -> Path:
    """A slice of the demo pool cut into shards of uneven sizes (SHARD_SIZES)."""
    folder.mkdir()
    rows = pq.read_table(DEMO_DATA).slice(0, sum(SHARD_SIZES))
    start = 0
    for i, n in enumerate(SHARD_SIZES):
        pq.write_table(rows.slice(start, n), folder / f"shard-{i}.parquet")
        start += n
    return folder


def _shards(out: Path) -> list[str]:
    """Every kept and rejected shard of every stage, relative to the output folder."""
    return sorted(
        str(p.relative_to(out))
        for p in out.glob("*/**/*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(out).parts)
    )


def _table(out: Path, stage: str, sub: str) -> pa.Table | None:
    files = sorted((out / stage / sub).glob("part-*.parquet"))
    if not files:
        return None
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables, promote_options="default").sort_by("id")


def assert_same_output(a: Path, b: Path) -> None:
    stages = sorted(p.name for p in a.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert stages == sorted(p.name for p in b.iterdir() if p.is_dir() and p.name[:2].isdigit())
    # Rows first, as tables sorted by id, so a failure names the column that differs ...
    for stage in stages:
        for sub in ("", "rejected"):
            ta, tb = _table(a, stage, sub), _table(b, stage, sub)
            assert (ta is None) == (tb is None), f"{stage}/{sub}: rows in only one run"
            if ta is None:
                continue
            assert ta.column_names == tb.column_names, f"{stage}/{sub}"
            assert ta.column("id").equals(tb.column("id")), f"{stage}/{sub}: different rows"
            differ = [c for c in ta.column_names if not ta.column(c).equals(tb.column(c))]
            assert not differ, f"{stage}/{sub}: columns {differ} differ between the runs"
    # ... then shard by shard: the same files, byte for byte.
    files = _shards(a)
    assert files == _shards(b)
    differ = [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not differ, f"shards with different bytes: {differ}"


def kill_when(command: list[str], env: dict[str, str], ready, what: str) -> None:
    """Start `command` in a process group of its own and kill -9 the whole group (driver and
    Ray at once) as soon as `ready()` is true; fail if it ends first or `what` never comes."""
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if ready():
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.02)
        else:
            pytest.fail(f"{what} never came")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_in_embed(pool: Path, out: Path) -> None:
    """Start a run and kill -9 it once embed has written a piece."""
    embed = out / "03-embed"
    progress = embed / "_progress"
    kill_when(
        _command(pool, out, 2),
        _env(),
        lambda: progress.exists() and any(progress.glob("*.json")),
        "embed's first piece",
    )
    assert not (embed / "_manifest.json").exists(), "embed finished before the kill"


def test_runs_with_other_worker_counts_or_a_kill_and_resume_write_identical_shards(tmp_path):
    pool = demo_slice_pool(tmp_path / "pool")
    plain = tmp_path / "plain"
    _run(pool, plain, num_cpus=2)
    assert (plain / "08-sample" / "_manifest.json").exists()

    one_cpu = tmp_path / "one_cpu"
    _run(pool, one_cpu, num_cpus=1)
    assert_same_output(plain, one_cpu)

    resumed = tmp_path / "resumed"
    _kill_in_embed(pool, resumed)
    _run(pool, resumed, num_cpus=2)
    manifest = (resumed / "03-embed" / "_manifest.json").read_text()
    assert '"status": "resumed"' in manifest
    assert_same_output(plain, resumed)


def test_a_global_stage_writes_the_same_shards_in_input_order_however_its_rows_move(
    ray_session, tmp_path
):
    from stages_for_tests import CaptionLength, ScrambleRows

    from warren.pipelines.runner import GLOBAL_ROWS_PER_PART, Pipeline, Runner
    from warren.stages.schema import rows_to_table

    pool = tmp_path / "pool"
    pool.mkdir()
    n = GLOBAL_ROWS_PER_PART + 700  # two output pieces
    rows = [{"id": f"r-{i:05d}", "caption": "x" * (i % 40), "source": "t"} for i in range(n)]
    for s, (a, b) in enumerate([(0, 900), (900, 1000), (1000, n)]):
        pq.write_table(rows_to_table(rows[a:b]), pool / f"shard-{s}.parquet")
    pipe = Pipeline("t", [CaptionLength(max_chars=30), ScrambleRows()])
    outs = []
    for k in range(3):
        out = tmp_path / f"out{k}"
        Runner(pipe, str(pool), str(out), input_format="parquet", progress=False).run()
        outs.append(out)
    assert_same_output(outs[0], outs[1])
    assert_same_output(outs[0], outs[2])
    # Each shard holds its rows in input order (the order of the stage before, shard by shard).
    upstream = [
        r["id"]
        for f in sorted((outs[0] / "01-caption_length").glob("part-*.parquet"))
        for r in pq.read_table(f, columns=["id"]).to_pylist()
    ]
    kept = [
        pq.read_table(f, columns=["id"]).column("id").to_pylist()
        for f in sorted((outs[0] / "02-scramble_rows").glob("part-*.parquet"))
    ]
    assert sorted(i for ids in kept for i in ids) == sorted(i for i in upstream if i[-1] != "3")
    for ids in kept:
        assert ids == sorted(ids, key=upstream.index)


def test_global_pieces_cut_the_files_at_fixed_positions_as_a_scan_of_every_file_would():
    import json
    import random

    from warren.pipelines import run_global, run_map

    step = run_map.GLOBAL_ROWS_PER_PART

    def scan(files, total):  # every piece against every file: obviously right, quadratic
        starts = [sum(n for _, n in files[:i]) for i in range(len(files))]
        items = []
        for k in range(-(-total // step)):
            lo, hi = k * step, min(total, (k + 1) * step)
            segments = [
                [p, max(lo, s) - s, min(hi, s + n) - max(lo, s), max(lo, s)]
                for (p, n), s in zip(files, starts, strict=True)
                if max(lo, s) < min(hi, s + n)
            ]
            items.append({"part": k, "rows": hi - lo, "segments": json.dumps(segments)})
        return items

    rng = random.Random(0)
    sizes = [0, 1, step - 1, step, step + 1, 3 * step + 5]
    for _ in range(200):
        files = [
            (f"f{i}", rng.choice([*sizes, rng.randint(0, 4 * step)]))
            for i in range(rng.randint(1, 25))
        ]
        total = sum(n for _, n in files)
        assert run_global.global_pieces(files, total) == scan(files, total), files


def test_a_map_stage_sees_its_batches_cut_from_each_shard_and_writes_a_file_per_piece(
    ray_session, tmp_path
):
    from stages_for_tests import BatchProbe

    from warren.pipelines.runner import MAP_ROWS_PER_READ, Pipeline, Runner
    from warren.stages.schema import rows_to_table

    pool = tmp_path / "pool"
    pool.mkdir()
    rows = [{"id": f"r-{i:05d}", "caption": "x", "source": "t"} for i in range(2 * 2050 + 9)]
    pq.write_table(rows_to_table(rows), pool / "a.parquet")
    out = tmp_path / "out"
    Runner(
        Pipeline("t", [BatchProbe()]),
        str(pool),
        str(out),
        reader_options={"batch_size": 2050},
        progress=False,
    ).run()
    got = {
        r["id"]: (r["batch_rows"], r["batch_first"])
        for f in (out / "01-batch_probe").glob("part-*.parquet")
        for r in pq.read_table(f).to_pylist()
    }
    # The stage's input shards are ingest's files (2050, 2050 and 9 rows). Expected by hand:
    # pieces of MAP_ROWS_PER_READ // 7 * 7 rows from each shard's start, batches of 7 from each
    # piece's start.
    shards = [
        pq.read_table(f, columns=["id"]).column("id").to_pylist()
        for f in sorted((out / "00-ingest").glob("part-*.parquet"))
    ]
    assert sorted(map(len, shards)) == [9, 2050, 2050]
    per_piece = MAP_ROWS_PER_READ // 7 * 7
    expected, pieces = {}, 0
    for ids in shards:
        for p in range(0, len(ids), per_piece):
            pieces += 1
            piece = ids[p : p + per_piece]
            for b in range(0, len(piece), 7):
                batch = piece[b : b + 7]
                expected.update({i: (len(batch), batch[0]) for i in batch})
    assert got == expected
    assert pieces == 5  # 2044 + 6, twice, and 9
    assert len(list((out / "01-batch_probe").glob("part-*.parquet"))) == pieces
