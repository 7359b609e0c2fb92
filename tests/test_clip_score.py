"""clip_score: the cosine per row, the threshold, and exact top-fraction and window filters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray

from warren.stages.base import GlobalContext
from warren.stages.clip_score import ClipScore


def _emb_col(x: np.ndarray, missing: set[int]) -> pa.Array:
    mask = pa.array([i in missing for i in range(len(x))])
    return pa.FixedSizeListArray.from_arrays(
        pa.array(x.astype(np.float16).reshape(-1), pa.float16()), x.shape[1], mask=mask
    )


def _pool(n: int = 240, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim))
    txt = img + rng.normal(
        scale=rng.uniform(0.2, 3.0, size=(n, 1)), size=(n, dim)
    )  # varied agreement
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ids = [f"p{i:04d}" for i in range(n)]
    missing_img, missing_txt = {5, 77}, {5, 130}
    table = pa.table(
        {"id": ids, "image_emb": _emb_col(img, missing_img), "text_emb": _emb_col(txt, missing_txt)}
    )
    parts = [table.slice(i, 60) for i in range(0, n, 60)]
    # brute force: cosine of the stored (float16) vectors
    i16 = img.astype(np.float16).astype(np.float64)
    t16 = txt.astype(np.float16).astype(np.float64)
    truth = {
        ids[k]: float(i16[k] @ t16[k] / np.linalg.norm(i16[k]) / np.linalg.norm(t16[k]))
        for k in range(n)
        if k not in missing_img | missing_txt
    }
    return ray.data.from_arrow(parts), ids, truth


def _run(stage, ds, n):
    return {
        r["id"]: r
        for r in stage.run(ds, GlobalContext(num_rows=n, num_shards=4, num_cpus=2)).take_all()
    }


def test_scores_are_the_cosine_and_missing_embeddings_are_rejected(ray_session):
    ds, ids, truth = _pool()
    out = _run(ClipScore(), ds, len(ids))
    assert len(out) == len(ids)
    for rid, row in out.items():
        if rid in truth:
            assert row["clip_score"] == pytest.approx(truth[rid], abs=1e-5)
            assert row["_reject"] is None
        else:
            assert row["clip_score"] is None and row["_reject"] == "clip_score: missing embedding"


@pytest.mark.parametrize("lo,hi", [(0.0, 0.3), (0.4, 0.6)])
def test_window_keeps_exactly_the_brute_force_ranks(ray_session, lo, hi):
    ds, ids, truth = _pool(seed=1)
    out = _run(ClipScore(lo=lo, hi=hi), ds, len(ids))
    scores = {rid: row["clip_score"] for rid, row in out.items() if row["clip_score"] is not None}
    ranked = sorted(scores, key=lambda rid: (-scores[rid], rid))
    n = len(ranked)
    expected = set(ranked[round(lo * n) : round(hi * n)])
    assert {rid for rid, row in out.items() if row["_reject"] is None} == expected


def test_threshold_rejects_low_scores_with_the_value(ray_session):
    ds, ids, truth = _pool(seed=2)
    out = _run(ClipScore(threshold=0.5), ds, len(ids))
    kept = {rid for rid, row in out.items() if row["_reject"] is None}
    assert kept == {rid for rid, s in truth.items() if out[rid]["clip_score"] >= 0.5}
    low = next(rid for rid, s in truth.items() if out[rid]["clip_score"] < 0.5)
    assert (
        out[low]["_reject"]
        == f"clip_score: below threshold (clip_score {out[low]['clip_score']:.4f} < 0.5)"
    )
