"""sscd and copy-detection dedup: planted copies (re-encodes, crops, resizes, flips) of real
photographs grouped with their original, checked against a brute-force neighbour search.

The model is a tiny TorchScript descriptor built here (a flip-symmetric 8x8 thumbnail, centred
and unit-normed): like SSCD it maps an image and its copies close together, so the test exercises
the real loading path (`sscd:<TorchScript file>`), the embedding store and the dedup rule."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps

from warren.stages.model_fetch import ModelNotFoundError
from warren.stages.semdedup import SemDedupParams, dedup_cluster_table
from warren.stages.sscd import Sscd

THRESHOLD = 0.85
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "page")


class Thumbnail(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        v = (t + torch.flip(t, dims=[3])).flatten(1)
        return torch.nn.functional.normalize(v - v.mean(dim=1, keepdim=True), dim=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sscd") / "thumb.torchscript.pt"
    torch.jit.script(Thumbnail()).save(str(path))
    return f"sscd:{path}"


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def pool() -> tuple[pa.Table, dict[str, str]]:
    """Five photographs with four copies each, three more photographs alone; each row's group
    (its original's id)."""
    from skimage import data

    rows, group = [], {}
    for k, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        versions = {"orig": encoded(img)}
        if k < 5:
            versions |= {
                "jpeg": encoded(img, "JPEG", quality=60),
                "crop": encoded(img.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
                "half": encoded(img.resize((w // 2, h // 2))),
                "flip": encoded(ImageOps.mirror(img)),
            }
        for kind, blob in versions.items():
            rid = f"{k}-{kind}"
            rows.append({"id": rid, "images": [{"bytes": blob, "path": None}]})
            group[rid] = f"{k}-orig" if k < 5 else rid
    order = np.random.default_rng(1).permutation(len(rows))
    return pa.Table.from_pylist([rows[i] for i in order]), group


def brute(ids: list[str], emb: np.ndarray, k: int) -> dict[str, str]:
    """Each row linked to those of its k nearest others above the threshold (float64, all
    pairs), components by depth-first search, the smallest id kept: removed id -> kept id."""
    x = emb.astype(np.float64)
    sim = x @ x.T
    n = len(ids)
    edges = {i: set() for i in range(n)}
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -sim[i, j])[:k]
        for j in others:
            if sim[i, j] > THRESHOLD:
                edges[i].add(j)
                edges[j].add(i)
    seen, out = set(), {}
    for start in range(n):
        if start in seen:
            continue
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                comp.append(i)
                stack += edges[i]
        keep = min(ids[i] for i in comp)
        out |= {ids[i]: keep for i in comp if ids[i] != keep}
    return out


def dedup(table: pa.Table, k: int) -> pa.Table:
    one = table.append_column("cluster_id", pa.array([0] * table.num_rows, pa.int64()))
    one = one.append_column("cos_to_centroid", pa.array([0.0] * one.num_rows, pa.float32()))
    params = SemDedupParams(
        rule="components", column="sscd_emb", threshold=THRESHOLD, k=k, keep="first"
    )
    return dedup_cluster_table(one, params)


def test_planted_copies_group_with_their_original_as_a_brute_force_search_finds(model):
    table, group = pool()
    out = Sscd(model=model, store="none").process(table)
    assert out.column("sscd_model").to_pylist() == [model] * table.num_rows
    ids = out.column("id").to_pylist()
    emb = np.array(out.column("sscd_emb").to_pylist(), np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-2)
    decided = dedup(out, k=10)
    got = {r["id"]: r["duplicate_of"] for r in decided.to_pylist() if r["_reject"] is not None}
    assert got == brute(ids, emb, 10)
    # Each photograph's five versions are one group, kept as its smallest id ("k-crop");
    # distinct photographs stay.
    first = {g: min(r for r in group if group[r] == g) for g in group.values()}
    assert got == {rid: first[g] for rid, g in group.items() if rid != first[g]}
    assert len(got) == 5 * 4
    for r in decided.to_pylist():
        if r["_reject"] is not None:
            assert r["similarity"] > THRESHOLD and r["_reject"].startswith(
                "semdedup: duplicate (of "
            )


def test_k_links_a_row_only_to_its_nearest_neighbours():
    # X and two exact copies of it; Y at cos 0.96 from X, with Z1 and Z2 nearer to it than X is.
    # Every pair above 0.85 (k = 0) makes one group; with k = 2, X's two nearest are its copies
    # and Y's are Z1 and Z2, so X and Y are never linked: two groups.
    def at(deg: float) -> list[float]:
        r = np.radians(deg)
        return [np.cos(r), np.sin(r), 0.0, 0.0]

    theta = np.degrees(np.arccos(0.96))
    rows = {
        "x0": at(0),
        "x1": at(0),
        "x2": at(0),
        "y": at(theta),
        "z1": at(theta + 2),
        "z2": at(theta + 3),
    }
    col = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ravel(list(rows.values())), pa.float16()), 4
    )
    table = pa.table({"id": list(rows), "sscd_emb": col})
    every = {r["id"]: r["duplicate_of"] for r in dedup(table, 0).to_pylist() if r["_reject"]}
    assert every == {"x1": "x0", "x2": "x0", "y": "x0", "z1": "x0", "z2": "x0"}
    nearest = {r["id"]: r["duplicate_of"] for r in dedup(table, 2).to_pylist() if r["_reject"]}
    assert nearest == {"x1": "x0", "x2": "x0", "z1": "y", "z2": "y"}


def test_descriptors_are_stored_once_and_a_missing_model_is_a_clear_error(
    model, tmp_path, monkeypatch
):
    table, _ = pool()
    first = Sscd(model=model, store=str(tmp_path / "store"))
    a = first.process(table)
    again = Sscd(model=model, store=str(tmp_path / "store"))
    b = again.process(table)
    assert again.stats["stored"] == table.num_rows and again.stats["computed"] == 0
    assert a.column("sscd_emb").equals(b.column("sscd_emb"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WARREN_WEIGHTS_CACHE", str(tmp_path / "weights"))
    with pytest.raises(ModelNotFoundError, match="--sscd.model"):
        Sscd(store="none").setup()
    with pytest.raises(ValueError, match="texts must be off"):
        Sscd(texts=True).check_params()
