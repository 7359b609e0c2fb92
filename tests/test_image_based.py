"""image_based (DataComp's image-based clustering filter) and require, on planted blobs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from warren.stages.base import GlobalContext
from warren.stages.image_based import ImageBased, chosen_clusters
from warren.stages.require import Require

DIM = 24
BLOBS = 6
PER_BLOB = 60


def _emb_col(x: np.ndarray, missing: set[int] = frozenset()) -> pa.Array:
    mask = pa.array([i in missing for i in range(len(x))])
    return pa.FixedSizeListArray.from_arrays(
        pa.array(x.astype(np.float16).reshape(-1), pa.float16()), x.shape[1], mask=mask
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _blobs(seed: int = 0):
    """Six tight, far-apart blobs of 60 rows; row ids say their blob."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(BLOBS, DIM)) * 3)
    rows = np.concatenate(
        [_unit(c + rng.normal(scale=0.05, size=(PER_BLOB, DIM))) for c in centres]
    )
    ids = [f"b{b}-{i:03d}" for b in range(BLOBS) for i in range(PER_BLOB)]
    return centres, rows, ids


def _run(stage, table: pa.Table):
    parts = [table.slice(i, 90) for i in range(0, table.num_rows, 90)]
    ctx = GlobalContext(num_rows=table.num_rows, num_shards=len(parts), num_cpus=2)
    return {r["id"]: r for r in stage.run(ray.data.from_arrow(parts), ctx).take_all()}


def _reference(tmp_path, vectors: np.ndarray, column: str = "image_emb") -> str:
    path = tmp_path / "reference.parquet"
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(len(vectors))], column: _emb_col(vectors)}), path
    )
    return str(path)


def test_rows_of_blobs_a_reference_image_falls_into_are_kept(ray_session, tmp_path):
    centres, rows, ids = _blobs()
    rng = np.random.default_rng(1)
    # reference images near blobs 1 and 4 only (ImageNet-like pictures of two concepts)
    ref = _unit(centres[[1, 1, 4]] + rng.normal(scale=0.05, size=(3, DIM)))
    table = pa.table({"id": ids, "image_emb": _emb_col(rows, missing={7})})
    out = _run(ImageBased(reference=_reference(tmp_path, ref), n_clusters=BLOBS, nredo=10), table)
    assert len(out) == len(ids)
    kept = {i for i, r in out.items() if r["_reject"] is None}
    assert kept == {i for i in ids if i.startswith(("b1-", "b4-"))}
    assert out[ids[7]]["_reject"] == "image_based: missing embedding"
    rejected = out["b2-000"]["_reject"]
    assert rejected.startswith("image_based: no reference image nearest (cluster ")
    assert int(rejected.rsplit(" ", 1)[1].rstrip(")")) == out["b2-000"]["image_cluster"]
    # every blob is one cluster: its rows share an id, different blobs have different ids
    by_blob = {
        b: {out[i]["image_cluster"] for i in ids if i.startswith(f"b{b}-") and i != ids[7]}
        for b in range(BLOBS)
    }
    assert all(len(c) == 1 for c in by_blob.values())
    assert len(set().union(*by_blob.values())) == BLOBS


def test_mark_only_rejects_nothing_and_require_applies_the_mark(ray_session, tmp_path):
    centres, rows, ids = _blobs(seed=3)
    table = pa.table({"id": ids, "image_emb": _emb_col(rows)})
    ref = _reference(tmp_path, centres[[0]])
    marked = _run(ImageBased(reference=ref, n_clusters=BLOBS, nredo=10, reject=False), table)
    assert all(r["_reject"] is None for r in marked.values())
    assert {i for i, r in marked.items() if r["near_reference"]} == {
        i for i in ids if i.startswith("b0-")
    }
    back = pa.Table.from_pylist(
        [{"id": i, "near_reference": r["near_reference"]} for i, r in marked.items()]
    )
    back = back.append_column(
        "clip_score", pa.array(np.linspace(0, 1, back.num_rows), pa.float32())
    )
    got = Require().process(back)
    reasons = dict(
        zip(got.column("id").to_pylist(), got.column("_reject").to_pylist(), strict=True)
    )
    assert {i for i, r in reasons.items() if r is None} == {i for i in ids if i.startswith("b0-")}
    assert reasons["b3-001"] == "image_based: no reference image nearest"


def test_without_a_reference_every_row_passes(ray_session):
    _, rows, ids = _blobs()
    out = _run(ImageBased(), pa.table({"id": ids, "image_emb": _emb_col(rows)}))
    assert all(r["_reject"] is None and r["near_reference"] for r in out.values())


def test_chosen_clusters_is_each_reference_vectors_nearest_centroid():
    rng = np.random.default_rng(5)
    centroids = _unit(rng.normal(size=(50, 8))).astype(np.float32)
    ref = _unit(rng.normal(size=(20000, 8))).astype(np.float32)  # more than one 8192 chunk
    brute = sorted({int(np.argmax([r @ c for c in centroids])) for r in ref[::1]})
    assert chosen_clusters(centroids, ref).tolist() == brute


def test_bad_references_are_clear_errors(ray_session, tmp_path):
    _, rows, ids = _blobs()
    table = pa.table({"id": ids, "image_emb": _emb_col(rows)})
    wrong_dim = _reference(tmp_path, _unit(np.ones((2, DIM + 1))))
    with pytest.raises(ValueError, match="reference embeddings have 25 dimensions, the pool's 24"):
        _run(ImageBased(reference=wrong_dim, n_clusters=3), table)
    other_column = _reference(tmp_path, _unit(np.ones((2, DIM))), column="emb")
    with pytest.raises(ValueError, match="has no column 'image_emb'.*reference_column"):
        _run(ImageBased(reference=other_column, n_clusters=3), table)
    with pytest.raises(ValueError, match="cannot read reference"):
        _run(ImageBased(reference=str(tmp_path / "nope.parquet"), n_clusters=3), table)


def test_require_rejects_nulls_with_their_own_reason_and_needs_its_column():
    t = pa.table({"id": ["a", "b", "c"], "ok": pa.array([True, None, False])})
    got = Require(column="ok", reason="rule: not ok").process(t)
    assert got.column("_reject").to_pylist() == [None, "rule: not ok (null ok)", "rule: not ok"]
    with pytest.raises(ValueError, match="no column 'near_reference'"):
        Require().process(t)
    with pytest.raises(ValueError, match="type string, expected bool"):
        Require(column="id").process(t)
