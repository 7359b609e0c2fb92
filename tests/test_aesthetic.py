"""aesthetic: the LAION-Aesthetics v2 predictor over stored image embeddings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from warren.stages.aesthetic import Aesthetic, predictor
from warren.stages.model_fetch import ModelNotFoundError


def embeddings(n: int, width: int, missing: set[int] = frozenset()) -> pa.Table:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, width))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = pa.array(vectors.astype(np.float16).ravel(), pa.float16())
    col = pa.FixedSizeListArray.from_arrays(flat, width)
    mask = pa.array([i in missing for i in range(n)])
    col = pa.compute.if_else(mask, pa.scalar(None, col.type), col)
    return pa.table({"id": [f"r{i}" for i in range(n)], "image_emb": col})


def by_hand(state: dict, x: np.ndarray) -> np.ndarray:
    """The five linear layers, one matrix product after another (dropout is off at inference)."""
    for k in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{k}.weight"].numpy().T + state[f"layers.{k}.bias"].numpy()
    return x[:, 0]


def test_the_predictor_has_the_published_weights_keys():
    # The keys of sac+logos+ava1-l14-linearMSE.pth: five Linear layers of a Sequential with
    # Dropout at 1, 3 and 5.
    shapes = {k: tuple(v.shape) for k, v in predictor(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip


def test_scores_are_the_layers_applied_to_the_embedding_and_the_threshold_rejects(tmp_path):
    torch.manual_seed(3)
    state = predictor(16).state_dict()
    state["layers.7.bias"] += 5.0  # scores around 5, as the real predictor's
    torch.save(state, tmp_path / "aesthetic.pth")
    table = embeddings(40, 16, missing={5})
    stage = Aesthetic(model=str(tmp_path / "aesthetic.pth"), min_score=0.0)
    stage.setup()
    out = stage.process(table)
    x = np.stack([v for v in table.column("image_emb").to_pylist() if v is not None]).astype(
        np.float32
    )
    want = by_hand(state, x)
    got = out.column("aesthetic_score").to_pylist()
    assert got[5] is None and out.column("_reject")[5].as_py() == "aesthetic: missing embedding"
    assert np.allclose([g for i, g in enumerate(got) if i != 5], want, atol=1e-5)
    # A threshold at the median rejects the lower half, naming the score.
    cut = float(np.median(want))
    out = Aesthetic(model=str(tmp_path / "aesthetic.pth"), min_score=cut).process(table)
    reasons = out.column("_reject").to_pylist()
    for score, why in zip(out.column("aesthetic_score").to_pylist(), reasons, strict=True):
        if score is not None and score < cut:
            assert why.startswith("aesthetic: below min_score (aesthetic_score ")
        elif score is not None:
            assert why is None


def test_embeddings_of_another_width_and_weights_not_here_are_clear_errors(tmp_path, monkeypatch):
    torch.save(predictor(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="takes 768-d image embeddings .* is 16-d"):
        Aesthetic(model=str(tmp_path / "l14.pth")).process(embeddings(4, 16))
    # Offline, the default URL is a clear error naming the flag, never a hang or a traceback.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WARREN_WEIGHTS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="--aesthetic.model"):
        Aesthetic().setup()
    with pytest.raises(ModelNotFoundError, match="no such file"):
        Aesthetic(model=str(tmp_path / "nope.pth")).setup()


def test_the_demo_predictor_scores_any_width_the_same_every_time_and_0_filters_nothing():
    table = embeddings(8, 32)
    a = Aesthetic(model="demo").process(table)
    b = Aesthetic(model="demo").process(table).column("aesthetic_score").to_pylist()
    assert a.column("aesthetic_score").to_pylist() == b and all(v is not None for v in b)
    # min_score 0 is off, even for scores below it (the demo predictor's are near 0).
    assert "_reject" not in a.column_names or a.column("_reject").null_count == 8
