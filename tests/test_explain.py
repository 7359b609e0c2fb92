"""`warren explain`: one row's journey through a run, on a real demo run and on a hand-built
output whose ranks and duplicate provenance are known."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import outputs
import pyarrow as pa
import pytest
from report_outputs import threshold, with_provenance, write_stage

from warren.pipelines import commands, demo
from warren.pipelines.cli import main as cli_main
from warren.pipelines.explain import explain, format_journey
from warren.pipelines.recipe import main as recipe_main


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory) -> Path:
    """The demo recipe on the bundled pool, run once for the module."""
    out = tmp_path_factory.mktemp("explain") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert recipe_main(demo.pipeline(), ["--output", str(out), "--quiet", "--no-report"]) == 0
    return out


def test_explain_names_the_stage_rule_and_kept_copy_of_a_removed_duplicate(
    demo_run, tmp_path, capsys
):
    # the kept copy comes from exact_dedup's duplicate_of column (filled in where the stage
    # version at hand does not write it yet); the reason text is the test's ground truth
    out = with_provenance(demo_run, tmp_path / "run")
    reasons = outputs.rejected_reasons(out / "03-exact_dedup")
    row, reason = sorted(reasons.items())[0]
    kept = re.search(r"of ([^)]+)\)", reason).group(1)
    assert cli_main(["explain", str(out), row]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"row {row!r} in {out}"
    for folder in ("00-ingest", "01-image_check", "02-caption_check"):
        assert any(line.split()[:2] == [folder, "passed"] for line in lines), printed
    removed = next(line for line in lines if "REMOVED" in line)
    assert "03-exact_dedup" in removed and "exact_dedup: duplicate" in removed and kept in removed
    assert f"duplicate of {kept} (kept to the end (03-exact_dedup))" in printed
    assert f"duplicate_of {kept!r}, similarity 1" in printed
    assert (
        lines[-1]
        == "ended: removed at 03-exact_dedup (stage exact_dedup), rule 'exact_dedup: duplicate'"
    )


def test_explain_shows_scores_of_a_kept_row_and_skips_stages_after_a_removal(demo_run, capsys):
    out = demo_run
    final = outputs.table(out / "03-exact_dedup").to_pylist()[0]
    assert cli_main(["explain", str(out), final["id"]]) == 0
    printed = capsys.readouterr().out
    assert f"width {final['width']}, height {final['height']}" in printed
    assert printed.rstrip().endswith("ended: kept, in the final output 03-exact_dedup")

    broken = sorted(outputs.rejected_reasons(out / "01-image_check").items())[0]
    assert cli_main(["explain", str(out), broken[0]]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"01-image_check +REMOVED +{re.escape(broken[1])}", printed), printed
    assert printed.count("not in the input of this stage") == 2


def test_explain_an_unknown_id_is_a_clear_error_with_exit_code_1(demo_run, capsys):
    out = demo_run
    assert cli_main(["explain", str(out), "no-such-row"]) == 1
    err = capsys.readouterr().err
    assert "no row with id 'no-such-row'" in err and "00-ingest" in err


# ---- a hand-built output: ranks and duplicate provenance known by construction --------------


@pytest.fixture()
def built(tmp_path) -> Path:
    """ingest -> semdedup (r3 a copy of r1, r4 a copy of r9 that a later stage removes) -> a
    clip_score window keeping ranks [0.25, 0.75) of 8 rows, ranked highest first."""
    ids = [f"r{i}" for i in range(10)]
    t = write_stage(tmp_path, 0, "ingest", {}, pa.table({"id": ids, "caption": ids}), {}, [])
    of = {"r3": "r1", "r4": "r9"}
    reasons = {"r3": "semdedup: duplicate (of zz, cos 0.97)", "r4": "semdedup: duplicate"}
    columns = {"duplicate_of": of, "similarity": {"r3": 0.96875, "r4": 0.9375}}
    t = write_stage(tmp_path, 1, "semdedup", {}, t, reasons, [], columns)
    left = t.column("id").to_pylist()  # r0 r1 r2 r5 r6 r7 r8 r9
    scores = [0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6]
    # by hand, highest first: r1 .9, r7 .8, r5 .7, r9 .6, r0 .5, r6 .3, r8 .2, r2 .1
    ranks = {"r1": 0, "r7": 1, "r5": 2, "r9": 3, "r0": 4, "r6": 5, "r8": 6, "r2": 7}
    t = t.append_column("clip_score", pa.array(scores, pa.float32()))
    t = t.append_column("clip_score_rank", pa.array([ranks[i] for i in left], pa.int64()))
    outside = {i: "clip_score: outside window 25-75%" for i, r in ranks.items() if r < 2 or r >= 6}
    window = [
        threshold("lo", "rank_lo", "clip_score", 0.25),
        threshold("hi", "rank_hi", "clip_score", 0.75),
    ]
    write_stage(tmp_path, 2, "clip_score", {"lo": 0.25, "hi": 0.75}, t, outside, window)
    return tmp_path


def test_explain_shows_a_window_stages_rank_of_a_kept_and_a_removed_row(built):
    kept = format_journey(explain(built, "r5"), str(built))
    assert re.search(r"02-clip_score +passed +clip_score 0\.7, clip_score_rank 2$", kept, re.M)
    removed = explain(built, "r1")
    assert removed.removed_at.folder == "02-clip_score"
    assert removed.removed_at.values == {"clip_score": pytest.approx(0.9), "clip_score_rank": 0}
    assert removed.duplicate_of is None


def test_explain_shows_the_rank_a_window_rewrote_on_a_column_its_input_had(tmp_path):
    # the input already ranks clip_score (an earlier run's output): the window stage adds no
    # column, and its rank column is still shown
    ids = ["a", "b", "c"]
    t = pa.table(
        {
            "id": ids,
            "clip_score": pa.array([0.1, 0.3, 0.2], pa.float32()),
            "clip_score_rank": pa.array([0, 1, 2], pa.int64()),
        }
    )
    t = write_stage(tmp_path, 0, "ingest", {}, t, {}, [])
    t = t.set_column(2, "clip_score_rank", pa.array([2, 0, 1], pa.int64()))  # by hand: b, c, a
    window = [threshold("hi", "rank_hi", "clip_score", 2 / 3)]
    write_stage(tmp_path, 1, "rank_window", {}, t, {"a": "rank_window: below window"}, window)
    removed = explain(tmp_path, "a").removed_at
    assert removed.values == {"clip_score": pytest.approx(0.1), "clip_score_rank": 2}


def test_explain_an_id_that_looks_like_a_flag(tmp_path, capsys):
    # ids are any strings (a LLaVA JSON's "-7", a user's "--x"): the command takes them as ids
    ids = ["-7", "--x"]
    write_stage(tmp_path, 0, "ingest", {}, pa.table({"id": ids, "caption": ids}), {}, [])
    assert commands.explain(str(tmp_path), "--x") == 0
    assert cli_main(["explain", str(tmp_path), "--", "--x"]) == 0
    assert "row '--x'" in capsys.readouterr().out


def test_explain_reads_the_kept_copy_from_duplicate_of_not_from_the_reason(built):
    journey = explain(built, "r3")
    assert journey.removed_at.values == {"duplicate_of": "r1", "similarity": 0.96875}
    # "(of zz ...)" in the reason names no row: the column does
    assert journey.duplicate_of == "r1"
    assert journey.duplicate_fate == "removed at 02-clip_score: clip_score: outside window 25-75%"
    printed = format_journey(journey, str(built))
    assert "duplicate of r1 (removed at 02-clip_score: " in printed
    # a reason without "(of ...)" still names its kept copy
    journey = explain(built, "r4")
    assert (journey.duplicate_of, journey.duplicate_fate) == (
        "r9",
        "kept to the end (02-clip_score)",
    )
    # rows the dedup passed carry null provenance, which is not shown
    assert explain(built, "r0").steps[1].values == {}


def test_explain_of_an_output_without_duplicate_of_names_no_kept_copy(tmp_path):
    ids = ["a", "b"]
    t = write_stage(tmp_path, 0, "ingest", {}, pa.table({"id": ids, "caption": ids}), {}, None)
    write_stage(tmp_path, 1, "exact_dedup", {}, t, {"b": "exact_dedup: duplicate (of a)"}, None)
    journey = explain(tmp_path, "b")
    assert journey.removed_at.reason == "exact_dedup: duplicate (of a)"
    assert journey.duplicate_of is None
    assert "duplicate of" not in format_journey(journey, str(tmp_path))
