"""`warren compare`: the verdict rule, the spread and overlap figures and the data statistics
against hand-worked values, and a whole comparison of two tiny recipes with a tiny proxy."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_trainers_data import COLORS, color_row, save_untrained_parts, write_shards

from warren.trainers.compare import data_stats, overlap, render_html, spread, verdicts


def test_a_verdict_needs_every_seed_of_the_winner_above_every_seed_of_the_other():
    scores = {
        "pope": {
            "a": spread([50.0, 52.0, 51.0]),
            "b": spread([40.0, 45.0, 44.0]),
            "c": spread([49.0, 53.0, 47.0]),
        }
    }
    got = {tuple(v["recipes"]): v for v in verdicts(scores)}
    # a's worst seed (50) beats b's best (45): a wins by the difference of the means, 51 - 43.
    assert got[("a", "b")]["winner"] == "a" and got[("a", "b")]["loser"] == "b"
    assert got[("a", "b")]["difference"] == pytest.approx(8.0)
    # a and c overlap (c's 53 is above a's 50): no verdict, whatever the means say.
    assert got[("a", "c")]["winner"] is None
    assert got[("a", "c")]["difference"] == pytest.approx(51.0 - (49 + 53 + 47) / 3)
    # c (47..53) and b (40..45): c's worst beats b's best.
    assert got[("b", "c")]["winner"] == "c"


def test_spread_and_overlap_by_hand():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"]) == (2.0, 1.0, 1.0, 3.0)
    got = overlap({"a": {"1", "2", "3"}, "b": {"2", "3", "4"}, "c": set()})
    assert got["a"]["b"] == {"shared": 2, "jaccard": 0.5}  # {2, 3} of {1, 2, 3, 4}
    assert got["a"]["c"] == {"shared": 0, "jaccard": 0.0}


def test_data_stats_count_rows_sources_caption_words_and_clip_scores(tmp_path):
    table = pa.table(
        {
            "id": ["r1", "r2", "r3", "r4"],
            "source": ["laion", "laion", "coco", None],
            "caption": ["a red cat", "two dogs on grass", None, "sky"],
            "clip_score": [0.2, 0.3, 0.4, None],
        }
    )
    pq.write_table(table, tmp_path / "part-00000.parquet")
    stats, ids = data_stats(str(tmp_path))
    assert ids == {"r1", "r2", "r3", "r4"} and stats["rows"] == 4
    assert stats["sources"] == {"laion": 2, "coco": 1}
    # Words 3, 4, 1 (sorted 1, 3, 4): mean 8/3; p10 is the 0th, p50 the 1st, p90 the 2nd.
    assert stats["caption_words"] == pytest.approx({"mean": 8 / 3, "p10": 1, "p50": 3, "p90": 4})
    assert stats["clip_score"]["mean"] == pytest.approx(0.3)


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Path:
    return save_untrained_parts(tmp_path_factory.mktemp("proxy"))


def test_two_recipes_are_trained_per_seed_evaluated_and_reported(proxy, tmp_path):
    from warren.pipelines.cli import main as cli

    # Recipe "red" keeps red and green rows, "blue" blue and yellow ones, with captions six
    # words longer; 6 rows shared.
    rows = [color_row(i) for i in range(24)]
    red = [r for r in rows if "red" in r["caption"] or "green" in r["caption"]]
    blue = [
        {**r, "caption": r["caption"] + " it is a very bright one ."}
        for r in rows
        if "blue" in r["caption"] or "yellow" in r["caption"]
    ] + red[:6]
    write_shards(tmp_path / "red", red, 6, 6)
    write_shards(tmp_path / "blue", blue, 6, 6)
    task = tmp_path / "eval" / "coco_caption"
    task.mkdir(parents=True)
    from PIL import Image

    for k, rgb in enumerate(COLORS.values()):
        Image.new("RGB", (40, 48), rgb).save(task / f"{k}.png")
    (task / "captions.json").write_text(
        json.dumps(
            {
                "images": [{"id": k, "file_name": f"{k}.png"} for k in range(4)],
                "annotations": [
                    {"image_id": k, "caption": f"this is a {c} picture ."}
                    for k, c in enumerate(COLORS)
                ],
            }
        )
    )
    out = tmp_path / "cmp"
    # A red row is 16 image tokens + bos + 6 words + eos = 24 tokens (`plain` template), a blue
    # one 31: 96 a step of 4 red rows, so the budget takes 4 steps of them, fewer of blue rows.
    budget = 300
    code = cli(
        ["compare", "--recipes", f"red={tmp_path / 'red'},blue={tmp_path / 'blue'}",
         "--output", str(out),
         "--tasks", "coco_caption", "--data", str(tmp_path / "eval"),
         "--vision", str(proxy / "vision"), "--llm", str(proxy / "llm"),
         "--steps", "8", "--tokens", str(budget), "--batch-size", "4", "--seeds", "2",
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    assert set(report["runs"]) == {"red", "blue"} and report["seeds"] == [0, 1]
    assert report["budget"]["tokens"] == budget
    for name in ("red", "blue"):
        for seed in (0, 1):
            folder = out / "runs" / name / f"seed-{seed}"
            assert (folder / "eval" / "results.json").exists()
            # The token budget: each run ends at the first step whose running total reaches it.
            seen = [
                json.loads(line)["tokens"]
                for line in (folder / "model" / "metrics.jsonl").read_text().splitlines()
            ]
            run = report["runs"][name][str(seed)]
            assert seen[-1] == run["tokens"] >= budget > seen[-2]
            assert run["steps"] == len(seen) < 8
    # Same tokens, so the recipe of longer captions trained on fewer samples.
    samples = {n: sum(r["samples"] for r in report["runs"][n].values()) for n in ("red", "blue")}
    assert samples["blue"] < samples["red"]
    values = report["scores"]["coco_caption"]["red"]["values"]
    assert len(values) == 2 and report["metric"]["coco_caption"] == "cider"
    assert report["data"]["red"]["rows"] == 12 and report["data"]["blue"]["rows"] == 18
    assert report["overlap"]["red"]["blue"]["shared"] == 6
    page = _Text()
    page.feed((out / "compare.html").read_text())
    text = " ".join(page.chunks)
    # The verdict comes first, in words.
    assert text.index("Verdict") < text.index("Scores over seeds")
    assert ("beats" in text) or ("within the seed spread" in text)


def test_the_page_names_the_winner_at_the_top(tmp_path):
    report = {
        "recipes": {"a": "x", "b": "y"},
        "seeds": [0, 1, 2],
        "budget": {"stage": "align", "steps": 10, "batch_size": 8, "grad_accum": 1, "lr": 1e-3},
        "metric": {"pope": "accuracy"},
        "scores": {"pope": {"a": spread([60.0, 61.0, 62.0]), "b": spread([50.0, 51.0, 52.0])}},
        "data": {
            n: {"rows": 10, "sources": {}, "caption_words": None, "clip_score": None} for n in "ab"
        },
        "overlap": {"a": {"b": {"shared": 1, "jaccard": 0.05}}},
        "runs": {n: {"0": {"tokens": 100}} for n in "ab"},
    }
    report["verdicts"] = verdicts(report["scores"])
    page = _Text()
    page.feed(render_html(report))
    text = " ".join(" ".join(page.chunks).split())
    assert "a beats b on pope (accuracy +10.00, beyond the seed spread)" in text
