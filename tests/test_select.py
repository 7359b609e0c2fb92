"""select: exact rank windows and seeded sampling, against sorting everything in Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray

import warren.stages.select as select_mod
from warren.stages.base import GlobalContext
from warren.stages.select import RankWindow, Sample, uniform_key


def _dataset(scores: list[float | None], blocks: int = 4):
    ids = [f"id-{i:05d}" for i in range(len(scores))]
    order = np.random.default_rng(0).permutation(len(ids))  # rows arrive in no useful order
    table = pa.table(
        {
            "id": [ids[i] for i in order],
            "clip_score": pa.array([scores[i] for i in order], pa.float32()),
        }
    )
    size = -(-len(ids) // blocks)
    parts = [table.slice(i, size) for i in range(0, len(ids), size)]
    return ray.data.from_arrow(parts), ids


def _run(stage, ds, n):
    out = stage.run(ds, GlobalContext(num_rows=n, num_shards=4, num_cpus=2)).take_all()
    return {r["id"]: r["_reject"] for r in out}


def _brute_window(ids, scores, lo, hi, descending):
    ranked = [(i, s) for i, s in zip(ids, scores, strict=True) if s is not None]
    ranked.sort(key=lambda t: ((-t[1] if descending else t[1]), t[0]))
    n = len(ranked)
    return {i for i, _ in ranked[round(lo * n) : round(hi * n)]}


def test_rank_window_keeps_exactly_the_brute_force_ranks_with_ties_by_id(ray_session):
    rng = np.random.default_rng(1)
    # coarse values so many rows tie, some rows have no score
    scores = [
        None if i % 37 == 0 else float(np.float32(rng.integers(0, 25) / 25)) for i in range(503)
    ]
    ds, ids = _dataset(scores)
    for lo, hi, desc in [(0.4, 0.6, True), (0.15, 0.35, True), (0.0, 0.3, True), (0.7, 1.0, False)]:
        got = _run(RankWindow(lo=lo, hi=hi, descending=desc), ds, len(ids))
        assert len(got) == len(ids)
        assert {i for i, r in got.items() if r is None} == _brute_window(ids, scores, lo, hi, desc)
        missing = {i for i, s in zip(ids, scores, strict=True) if s is None}
        assert {i for i, r in got.items() if r == "rank_window: missing clip_score"} == missing


def test_rank_window_reasons_say_which_side_of_the_window(ray_session):
    scores = [float(i) for i in range(10)]
    ds, ids = _dataset(scores, blocks=2)
    got = _run(RankWindow(lo=0.2, hi=0.5), ds, 10)
    # descending: ranks 0,1 are scores 9,8 (above); 2..4 kept (7,6,5); the rest below
    assert {i for i, r in got.items() if r is None} == {"id-00007", "id-00006", "id-00005"}
    # each rejected row gives its rank (rows before it / 10) and its score
    assert (
        got["id-00009"]
        == "rank_window: above window 20-50% by clip_score (rank 0.0%, clip_score 9.0000)"
    )
    assert (
        got["id-00008"]
        == "rank_window: above window 20-50% by clip_score (rank 10.0%, clip_score 8.0000)"
    )
    assert (
        got["id-00000"]
        == "rank_window: below window 20-50% by clip_score (rank 90.0%, clip_score 0.0000)"
    )
    assert (
        got["id-00004"]
        == "rank_window: below window 20-50% by clip_score (rank 50.0%, clip_score 4.0000)"
    )


@pytest.mark.parametrize("sample_rows", [20_000, 3])  # 3: brackets miss and must widen
def test_sample_draws_exactly_n_seeded_rows_the_same_way_every_time(
    ray_session, monkeypatch, sample_rows
):
    monkeypatch.setattr(select_mod, "SAMPLE_ROWS", sample_rows)
    scores = [0.0] * 300
    ds, ids = _dataset(scores)
    got = _run(Sample(n=40, seed=5), ds, 300)
    kept = {i for i, r in got.items() if r is None}
    keys = uniform_key(ids, 5)
    expected = {ids[j] for j in np.argsort(keys, kind="stable")[:40]}
    assert kept == expected
    assert _run(Sample(n=40, seed=5), ds, 300) == got
    assert {i for i, r in _run(Sample(n=40, seed=6), ds, 300).items() if r is None} != kept
    assert all(r is None for r in _run(Sample(n=1000), ds, 300).values())


def test_uniform_keys_look_uniform():
    keys = uniform_key([f"x{i}" for i in range(20000)], 0)
    hist, _ = np.histogram(keys, bins=10, range=(0, 1))
    assert hist.min() > 1800 and hist.max() < 2200
