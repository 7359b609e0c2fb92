"""The embedding recipes end to end on the bundled demo pool, with the demo CLIP.

Ground truth is recomputed here from the stored embeddings (cosines, ranks by sorting everything,
the planted rows of the pool), not taken from the stages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import outputs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from warren.pipelines import bunny_pretrain, datacomp_filter, recipe, registry, semdedup
from warren.pipelines.recipe import DEMO_CLIP, DEMO_DATA
from warren.pipelines.recipe import main as recipe_main
from warren.stages.base import BatchStage


def _table(folder: Path, rejected: bool = False) -> pa.Table:
    return outputs.table(folder, rejected)


def _rows(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in _table(folder).to_pylist()}


_rejected = outputs.rejected_reasons


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _window(scores: dict[str, float], lo: float, hi: float) -> set[str]:
    """Rows at ranks [lo, hi) of the scores, highest first, ties by id: sort everything."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    n = len(ranked)
    return set(ranked[round(lo * n) : round(hi * n)])


def _planted() -> dict[str, str]:
    rows = pq.read_table(DEMO_DATA, columns=["id", "planted"]).to_pylist()
    return {r["id"]: r["planted"] or "" for r in rows}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "_manifest.json").read_text())


@pytest.fixture(scope="module")
def bunny_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("bunny") / "out"
    assert recipe_main(bunny_pretrain.pipeline(), ["--output", str(out), "--quiet"]) == 0
    return out


def test_bunny_demo_uses_the_demo_clip_and_real_data_the_published_model(bunny_run, capsys):
    assert _manifest(bunny_run / "03-embed")["params"]["model"] == DEMO_CLIP
    assert recipe_main(bunny_pretrain.pipeline(), ["--input", "pool/", "--describe"]) == 0
    described = capsys.readouterr().out
    assert "open_clip:ViT-L-14:openai" in described and DEMO_CLIP not in described


def test_bunny_demo_removes_planted_near_duplicates_and_keeps_distinct_photos(bunny_run):
    planted = _planted()
    embedded = _rows(bunny_run / "03-embed")
    removed = _rejected(bunny_run / "05-semdedup")
    survivors = set(_rows(bunny_run / "05-semdedup"))
    assert set(removed) | survivors == set(embedded)

    pattern = re.compile(r"semdedup: duplicate \(of (\S+), cos (\d\.\d{3}), component of (\d+)\)")
    for rid, reason in removed.items():
        m = pattern.fullmatch(reason)
        assert m, reason
        kept, cos = m.group(1), float(m.group(2))
        assert kept in survivors
        truth = _unit(embedded[rid]["image_emb"]) @ _unit(embedded[kept]["image_emb"])
        assert cos == pytest.approx(truth, abs=2e-3)
        if m.group(3) == "2":  # a pair is linked directly, above the threshold
            assert truth > 0.86

    # every planted copy and its original: never both kept
    copies = {
        i: p.split(":", 1)[1]
        for i, p in planted.items()
        if p.startswith(("near_dup_of:", "exact_dup_of:")) and i in embedded
    }
    assert len(copies) >= 20
    for copy, original in copies.items():
        assert not {copy, original} <= survivors, (copy, original)

    # the scikit-image photographs are 20 different pictures: no photo is removed as a copy of
    # another photo (only of its own planted copies)
    photos = {i for i in embedded if i.startswith("skimage-")}
    for rid in photos & set(removed):
        of = pattern.fullmatch(removed[rid]).group(1)
        assert copies.get(of) == rid, (rid, removed[rid])


def test_bunny_demo_puts_swapped_captions_at_the_bottom_of_clip_scores(bunny_run):
    planted = _planted()
    scored_rows = (
        _table(bunny_run / "06-clip_score").to_pylist()
        + _table(bunny_run / "06-clip_score", rejected=True).to_pylist()
    )
    scores = {r["id"]: float(_unit(r["image_emb"]) @ _unit(r["text_emb"])) for r in scored_rows}
    for r in scored_rows:
        assert r["clip_score"] == pytest.approx(scores[r["id"]], abs=2e-3)
    swapped = [i for i in scores if planted[i].startswith("swapped_caption")]
    assert len(swapped) >= 10
    ordered = sorted(scores, key=lambda i: -scores[i])
    reasons = _rejected(bunny_run / "06-clip_score")
    for rid in swapped:
        rank = ordered.index(rid) / len(ordered)
        assert rank >= 0.9, (rid, rank)
        m = re.fullmatch(
            r"clip_score: below window 40-60% \(rank (\d+\.\d)%, clip_score (.+)\)", reasons[rid]
        )
        assert m, reasons[rid]
        assert float(m.group(1)) == pytest.approx(100 * rank, abs=0.1)


def test_bunny_windows_and_sample_keep_exactly_the_brute_force_ranks(bunny_run):
    into_clip = {r["id"]: r for r in _table(bunny_run / "05-semdedup").to_pylist()}
    scores = {i: float(_unit(r["image_emb"]) @ _unit(r["text_emb"])) for i, r in into_clip.items()}
    stored = {
        r["id"]: r["clip_score"]
        for r in _table(bunny_run / "06-clip_score").to_pylist()
        + _table(bunny_run / "06-clip_score", rejected=True).to_pylist()
    }
    # ranks use the stored float32 score; the brute force sorts those same numbers
    kept_clip = set(_rows(bunny_run / "06-clip_score"))
    assert kept_clip == _window(stored, 0.4, 0.6)
    assert set(scores) == set(stored)

    kept_rows = _rows(bunny_run / "06-clip_score")
    cos = {i: r["cos_to_centroid"] for i, r in kept_rows.items()}
    assert set(_rows(bunny_run / "07-centroid_window")) == _window(cos, 0.15, 0.35)
    # N = 2,000,000 is more than the demo has: the sample keeps every row
    assert set(_rows(bunny_run / "08-sample")) == set(_rows(bunny_run / "07-centroid_window"))


def test_changing_the_clip_window_reruns_only_the_windows_and_the_sample(bunny_run, capsys):
    before = {f: _manifest(bunny_run / f)["completed_at"] for f in ("03-embed", "05-semdedup")}
    args = ["--output", str(bunny_run), "--quiet", "--clip_score.lo", "0.3"]
    assert recipe_main(bunny_pretrain.pipeline(), args) == 0
    run = json.loads((bunny_run / "run.json").read_text())
    status = {s["folder"]: s["status"] for s in run["stages"]}
    assert status == {
        "00-ingest": "cached",
        "01-image_check": "cached",
        "02-caption_check": "cached",
        "03-embed": "cached",
        "04-cluster": "cached",
        "05-semdedup": "cached",
        "06-clip_score": "computed",
        "07-centroid_window": "computed",
        "08-sample": "computed",
    }
    assert {f: _manifest(bunny_run / f)["completed_at"] for f in before} == before
    stored = {
        r["id"]: r["clip_score"]
        for r in _table(bunny_run / "06-clip_score").to_pylist()
        + _table(bunny_run / "06-clip_score", rejected=True).to_pylist()
    }
    assert set(_rows(bunny_run / "06-clip_score")) == _window(stored, 0.3, 0.6)
    # back to the defaults for the other tests of this module
    assert recipe_main(bunny_pretrain.pipeline(), ["--output", str(bunny_run), "--quiet"]) == 0


def test_semdedup_recipe_removes_items_too_similar_to_an_earlier_one(ray_session, tmp_path):
    out = tmp_path / "out"
    assert recipe_main(semdedup.pipeline(), ["--output", str(out), "--quiet"]) == 0
    embedded = _rows(out / "03-embed")
    removed = _rejected(out / "05-semdedup")
    kept = _rows(out / "05-semdedup")
    assert set(removed) | set(kept) == set(embedded) and removed
    for rid, reason in removed.items():
        m = re.fullmatch(r"semdedup: duplicate \(of (\S+), cos (\d\.\d{3})\)", reason)
        assert m, reason
        truth = _unit(embedded[rid]["image_emb"]) @ _unit(embedded[m.group(1)]["image_emb"])
        assert truth > 1 - 0.07 - 1e-3
    # SemDeDup keeps no pair of items closer than 1 - eps: brute force over the survivors
    ids = sorted(kept)
    x = np.stack([_unit(kept[i]["image_emb"]) for i in ids])
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    same_cluster = np.equal.outer(
        [kept[i]["cluster_id"] for i in ids], [kept[i]["cluster_id"] for i in ids]
    )
    assert (sims[same_cluster] <= 1 - 0.07 + 1e-3).all()


def test_datacomp_filter_is_the_exact_intersection_of_both_filters(ray_session, tmp_path):
    out = tmp_path / "out"
    args = ["--output", str(out), "--quiet", "--image_based.n_clusters", "8"]
    assert recipe_main(datacomp_filter.pipeline(), args) == 0
    scored = (
        _table(out / "05-clip_score").to_pylist()
        + _table(out / "05-clip_score", rejected=True).to_pylist()
    )
    stored = {r["id"]: r["clip_score"] for r in scored}
    top30 = _window(stored, 0.0, 0.3)
    # no reference given: the image-based filter is off
    assert set(_rows(out / "06-require")) == top30

    # a reference set: three of the pool's own images, so their clusters are the chosen ones
    marked = _rows(out / "04-image_based")
    chosen_ids = sorted(marked)[:: len(marked) // 3][:3]
    ref = tmp_path / "reference.parquet"
    pq.write_table(
        pa.table({"image_emb": [marked[i]["image_emb"] for i in chosen_ids]}).cast(
            pa.schema(
                [("image_emb", pa.list_(pa.float16(), len(marked[chosen_ids[0]]["image_emb"])))]
            )
        ),
        ref,
    )
    assert (
        recipe_main(datacomp_filter.pipeline(), [*args, "--image_based.reference", str(ref)]) == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert {s["folder"]: s["status"] for s in run["stages"]}["03-embed"] == "cached"
    marked = _rows(out / "04-image_based")
    chosen = {marked[i]["image_cluster"] for i in chosen_ids}
    near = {i for i, r in marked.items() if r["image_cluster"] in chosen}
    assert {i for i, r in marked.items() if r["near_reference"]} == near
    assert 0 < len(near) < len(marked)
    # the CLIP-score ranks are still taken over the whole pool
    scored = (
        _table(out / "05-clip_score").to_pylist()
        + _table(out / "05-clip_score", rejected=True).to_pylist()
    )
    assert len(scored) == len(marked)
    assert set(_rows(out / "06-require")) == top30 & near
    reasons = _rejected(out / "06-require")
    assert set(reasons) == top30 - near
    assert set(reasons.values()) == {"image_based: no reference image nearest"}


@pytest.mark.parametrize("name", registry.names())
def test_every_recipe_help_lists_a_flag_for_every_stage_parameter(name, capsys):
    import dataclasses

    pipeline = registry.get(name)()
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(pipeline, ["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for stage in pipeline.stages:
        for field in dataclasses.fields(stage.params):
            assert f"--{stage.name}.{field.name}" in printed
        for resource in recipe.RESOURCE_NAMES:
            # a batch stage's workers take resources; a global stage sizes itself to the cluster
            shown = recipe.resource_flag(stage, resource) in printed
            assert shown == isinstance(stage, BatchStage), (stage.name, resource)
