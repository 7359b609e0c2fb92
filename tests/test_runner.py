"""The runner: accounting, caching, re-runs, --from/--only/--force, errors, and resume after kill -9."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from stages_for_tests import CaptionLength, DropsRows, ModuloModel
from worker_env import worker_pythonpath

from warren.pipelines.runner import Pipeline, PipelineError, Runner
from warren.stages.exact_dedup import ExactDedup
from warren.stages.schema import rows_to_table

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    img = Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_pool(folder: Path, n: int = 120, shards: int = 4) -> list[dict]:
    """n rows over `shards` files; captions of varying length; every 10th row duplicates row 0's image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = _png(0) if i % 10 == 0 else _png(i)
        rows.append(
            {
                "id": f"r-{i:04d}",
                "images": [{"bytes": img, "path": f"{i}.png"}],
                "caption": "x" * (i % 50),
                "source": "test",
            }
        )
    per = n // shards
    for s in range(shards):
        pq.write_table(rows_to_table(rows[s * per : (s + 1) * per]), folder / f"shard-{s}.parquet")
    return rows


def read_folder(folder: Path) -> list[dict]:
    files = sorted(p for p in folder.glob("part-*.parquet"))
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def manifests(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/_manifest.json"))}


def pipeline(max_chars: int = 30, modulo: int = 7) -> Pipeline:
    return Pipeline(
        "t",
        [CaptionLength(max_chars=max_chars), ModuloModel(modulo=modulo), ExactDedup()],
    )


def run(pool: Path, out: Path, pipe: Pipeline, **kw):
    return Runner(pipe, str(pool), str(out), input_format="parquet", progress=False, **kw).run()


def expected_kept(rows: list[dict], max_chars: int, modulo: int) -> set[str]:
    """Brute force of the three stages in plain Python."""
    survivors = [
        r for r in rows if len(r["caption"]) <= max_chars and int(r["id"][2:]) % modulo != 0
    ]
    first_by_image: dict[bytes, str] = {}
    for r in sorted(survivors, key=lambda r: r["id"]):
        first_by_image.setdefault(r["images"][0]["bytes"], r["id"])
    return set(first_by_image.values())


def test_every_stage_accounts_for_every_row_and_rejects_carry_reasons(ray_session, tmp_path):
    rows = make_pool(tmp_path / "pool")
    reports = run(tmp_path / "pool", tmp_path / "out", pipeline())
    assert [r.folder for r in reports] == [
        "00-ingest",
        "01-caption_length",
        "02-modulo_model",
        "03-exact_dedup",
    ]
    for r in reports:
        assert r.rows_in == r.kept + r.rejected
    for prev, nxt in zip(reports, reports[1:], strict=False):
        assert nxt.rows_in == prev.kept
    kept = read_folder(tmp_path / "out" / "03-exact_dedup")
    assert {r["id"] for r in kept} == expected_kept(rows, 30, 7)
    assert len(kept) == len({r["id"] for r in kept})
    # the added columns survive to the end, and the model stage ran in set-up actors
    assert all(r["caption_len"] == len(r["caption"]) for r in kept)
    assert all(r["setup_pid"] > 0 for r in kept)
    rejected = pq.read_table(tmp_path / "out" / "01-caption_length" / "rejected").to_pylist()
    assert {r["id"] for r in rejected} == {r["id"] for r in rows if len(r["caption"]) > 30}
    assert all(
        r["reason"] == f"caption_length: too long ({len(r['caption'])} chars)" for r in rejected
    )
    m = manifests(tmp_path / "out")["01-caption_length"]
    assert m["reasons"] == {"caption_length: too long": len(rejected)}
    # The model stage declared 0.5 CPU; without a GPU the runner gave its actors every CPU (up to
    # 8 a node), and the manifest says what ran, next to what was declared.
    model = manifests(tmp_path / "out")["02-modulo_model"]
    cpus = ray.cluster_resources()["CPU"]
    assert model["resources"]["num_cpus"] == 0.5
    per_actor = min(8.0, cpus)
    assert model["ran_with"] == {
        "num_cpus": per_actor,
        "num_gpus": 0.0,
        "actors": [1, int(cpus // per_actor)],
    }
    assert "actors" not in m["ran_with"]  # tasks, not actors
    assert "ran_with" not in manifests(tmp_path / "out")["03-exact_dedup"]  # a global stage
    dedup_rej = pq.read_table(tmp_path / "out" / "03-exact_dedup" / "rejected").to_pylist()
    assert dedup_rej and all(
        r["reason"].startswith("exact_dedup: duplicate (of r-") for r in dedup_rej
    )
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [s["kept"] for s in summary["stages"]] == [r.kept for r in reports]


def test_summed_columns_are_totalled_over_kept_and_rejected_rows_into_manifest_and_run_json(
    ray_session, tmp_path, capsys
):
    from warren.pipelines.runner import format_funnel

    rows = make_pool(tmp_path / "pool")
    run(tmp_path / "pool", tmp_path / "out", pipeline(max_chars=20))
    expected = sum(len(r["caption"]) for r in rows)  # every row, kept or rejected
    assert manifests(tmp_path / "out")["01-caption_length"]["sums"] == {"caption_len": expected}
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    stage = next(s for s in summary["stages"] if s["folder"] == "01-caption_length")
    assert stage["sums"] == {"caption_len": expected}
    assert f"01-caption_length: caption_len {expected:,}" in format_funnel(summary)


def test_second_run_recomputes_nothing_and_a_parameter_change_recomputes_that_stage_and_after(
    ray_session, tmp_path
):
    make_pool(tmp_path / "pool")
    out = tmp_path / "out"
    run(tmp_path / "pool", out, pipeline())
    first = manifests(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    reports = run(tmp_path / "pool", out, pipeline())
    assert [r.status for r in reports] == ["cached"] * 4
    assert manifests(out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes

    reports = run(tmp_path / "pool", out, pipeline(modulo=5))
    assert [r.status for r in reports] == ["cached", "cached", "computed", "computed"]
    after = manifests(out)
    for folder in ("00-ingest", "01-caption_length"):
        assert after[folder] == first[folder]
    for folder in ("02-modulo_model", "03-exact_dedup"):
        assert after[folder]["completed_at"] >= first[folder]["completed_at"]
        assert after[folder]["fingerprint"] != first[folder]["fingerprint"]
    assert after["02-modulo_model"]["params"] == {"modulo": 5}


def test_from_only_and_force_choose_what_is_recomputed(ray_session, tmp_path):
    make_pool(tmp_path / "pool")
    out = tmp_path / "out"
    run(tmp_path / "pool", out, pipeline())
    assert [
        r.status for r in run(tmp_path / "pool", out, pipeline(), from_stage="modulo_model")
    ] == [
        "cached",
        "cached",
        "computed",
        "computed",
    ]
    reports = run(tmp_path / "pool", out, pipeline(), only="caption_length")
    assert [r.status for r in reports] == ["cached", "computed"]
    assert [r.status for r in run(tmp_path / "pool", out, pipeline(), force=True)] == [
        "computed"
    ] * 4
    with pytest.raises(PipelineError, match="no such stage"):
        run(tmp_path / "pool", out, pipeline(), only="nope")


def test_only_refuses_to_run_on_stale_input(ray_session, tmp_path):
    make_pool(tmp_path / "pool")
    out = tmp_path / "out"
    run(tmp_path / "pool", out, pipeline())
    with pytest.raises(PipelineError, match="out of date"):
        run(tmp_path / "pool", out, pipeline(max_chars=10), only="modulo_model")


def test_a_deleted_output_shard_makes_its_stage_recompute(ray_session, tmp_path):
    make_pool(tmp_path / "pool")
    out = tmp_path / "out"
    run(tmp_path / "pool", out, pipeline())
    before = manifests(out)
    next((out / "02-modulo_model").glob("part-*.parquet")).unlink()
    reports = run(tmp_path / "pool", out, pipeline())
    assert [r.status for r in reports][:3] == ["cached", "cached", "computed"]
    after = manifests(out)
    # what follows is recomputed exactly when the recomputed stage's files came out different
    same = (
        after["02-modulo_model"]["output_fingerprint"]
        == before["02-modulo_model"]["output_fingerprint"]
    )
    assert reports[3].status == ("cached" if same else "computed")
    assert {r["id"] for r in read_folder(out / "03-exact_dedup")} == {
        r["id"] for r in read_folder(out / "03-exact_dedup")
    } and len(read_folder(out / "03-exact_dedup")) == after["03-exact_dedup"]["kept"]


def test_a_stage_that_loses_rows_fails_naming_the_stage(ray_session, tmp_path):
    make_pool(tmp_path / "pool", n=40)
    with pytest.raises(PipelineError, match="drops_rows.*returned"):
        run(tmp_path / "pool", tmp_path / "out", Pipeline("t", [DropsRows()]))


KILL_SCRIPT = """
import sys
from warren.pipelines.runner import Pipeline, Runner
from warren.stages.exact_dedup import ExactDedup
from stages_for_tests import CaptionLength
pool, out = sys.argv[1], sys.argv[2]
pipe = Pipeline("t", [CaptionLength(max_chars=30), ExactDedup()])
Runner(pipe, pool, out, input_format="parquet", progress=False, num_cpus=2).run()
"""


def test_rerun_after_kill_9_in_a_map_stage_loses_and_duplicates_nothing(ray_session, tmp_path):
    rows = make_pool(tmp_path / "pool", n=240, shards=12)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=worker_pythonpath(), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pool"), str(out)],
        env=dict(env, WARREN_TEST_SLEEP_PER_BATCH="0.15"),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    progress = out / "01-caption_length" / "_progress"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if progress.exists() and len(list(progress.glob("*.json"))) >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"run ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
                )
            time.sleep(0.05)
        else:
            pytest.fail("map stage never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
        proc.wait()
    assert not (out / "01-caption_length" / "_manifest.json").exists()
    done_before = len(list(progress.glob("*.json")))

    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pool"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "01-caption_length" / "_manifest.json").read_text())
    assert m["status"] == "resumed"
    assert done_before > 0

    resumed_kept = read_folder(out / "01-caption_length")
    resumed_rej = pq.read_table(out / "01-caption_length" / "rejected").to_pylist()
    clean = tmp_path / "clean"
    Runner(
        Pipeline("t", [CaptionLength(max_chars=30), ExactDedup()]),
        str(tmp_path / "pool"),
        str(clean),
        input_format="parquet",
        progress=False,
    ).run()
    clean_kept = read_folder(clean / "01-caption_length")
    ids = [r["id"] for r in resumed_kept]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(r["id"] for r in clean_kept)
    assert sorted(ids) == sorted(r["id"] for r in rows if len(r["caption"]) <= 30)
    assert sorted(r["id"] for r in resumed_rej) == sorted(
        r["id"] for r in rows if len(r["caption"]) > 30
    )
    final = sorted(r["id"] for r in read_folder(out / "02-exact_dedup"))
    assert final == sorted(r["id"] for r in read_folder(clean / "02-exact_dedup"))


def test_input_and_output_given_as_filesystem_uris_run_and_cache_like_local_paths(
    ray_session, tmp_path
):
    rows = make_pool(tmp_path / "pool", n=40, shards=2)
    pipe = Pipeline("t", [CaptionLength(max_chars=30)])
    pool_uri, out_uri = f"file://{tmp_path / 'pool'}", f"file://{tmp_path / 'out'}"
    reports = Runner(pipe, pool_uri, out_uri, input_format="parquet", progress=False).run()
    assert [r.status for r in reports] == ["computed", "computed"]
    kept = read_folder(tmp_path / "out" / "01-caption_length")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows if len(r["caption"]) <= 30)
    reports = Runner(pipe, pool_uri, out_uri, input_format="parquet", progress=False).run()
    assert [r.status for r in reports] == ["cached", "cached"]


ONE_CPU_SCRIPT = """
import sys
from warren.pipelines.runner import Pipeline, Runner
from stages_for_tests import ModuloModel
Runner(Pipeline("t", [ModuloModel(modulo=3)]), sys.argv[1], sys.argv[2], input_format="parquet",
       progress=False, num_cpus=1).run()
"""


def test_a_model_stage_on_a_one_cpu_ray_does_not_starve_its_reads(tmp_path):
    rows = make_pool(tmp_path / "pool", n=60, shards=3)
    script = tmp_path / "one_cpu.py"
    script.write_text(ONE_CPU_SCRIPT)
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pool"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kept = read_folder(tmp_path / "out" / "01-modulo_model")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows if int(r["id"][2:]) % 3)
