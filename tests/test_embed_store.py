"""The embedding store: a dataset is embedded once whatever recipe or output folder asks, a changed
model or preprocessing computes anew, vectors read back are the ones computed (bit for bit), and a
damaged store costs time, never a result. Model calls are counted (tests/embed_counting.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embed_counting import CountingEmbed, model_calls
from safetensors.numpy import load_file, save_file

from warren.pipelines import bunny_pretrain, semdedup
from warren.pipelines.recipe import DEMO_CLIP, DEMO_DATA
from warren.pipelines.recipe import main as recipe_main
from warren.stages.embed import Embed
from warren.stages.embed_store import EmbeddingStore, content_keys, store_location
from warren.stages.shards import Location

DIM = 4
SPEC = {"kind": "image", "dim": DIM, "model": "m"}


def _vectors(table: pa.Table, column: str) -> np.ndarray:
    """The float16 bits of an embedding column (nulls as NaN rows), in row order."""
    col = table.column(column).combine_chunks()
    out = np.full((len(col), col.type.list_size), np.nan, dtype=np.float16)
    valid = ~np.asarray(col.is_null())
    out[valid] = col.filter(pa.array(valid)).flatten().to_numpy().reshape(-1, col.type.list_size)
    return out.view(np.uint16)


def _embedded(folder: Path) -> pa.Table:
    table = pq.read_table(sorted((folder / "03-embed").glob("*.parquet")))
    return table.sort_by("id")


def _with_counting_embed(pipeline):
    names = [s.name for s in pipeline.stages]
    i = names.index("embed")
    pipeline.stages[i] = CountingEmbed(pipeline.stages[i].params)
    return pipeline


def test_semdedup_after_bunny_on_the_same_pool_computes_no_embedding(ray_session, tmp_path):
    """Slow (~40 s on 2 cores): two recipes, two output folders, one store."""
    store = str(tmp_path / "store")
    first, second = tmp_path / "first", tmp_path / "second"
    pipe = _with_counting_embed(bunny_pretrain.pipeline())
    argv = ["--output", str(first), "--quiet", "--no-report", "--embed.store", store]
    assert recipe_main(pipe, argv) == 0
    rows = _embedded(first)
    calls = tmp_path / "calls"
    images, texts = model_calls(calls, "image"), model_calls(calls, "text")
    # Each distinct image once at least (a copy met in a later batch is already stored).
    distinct = {r[0]["bytes"] for r in rows.column("images").to_pylist()}
    assert len(distinct) <= images <= rows.num_rows and len(distinct) > 600 and texts > 600
    pipe = _with_counting_embed(semdedup.pipeline())
    argv = ["--output", str(second), "--quiet", "--no-report", "--embed.store", store]
    assert recipe_main(pipe, argv) == 0
    assert model_calls(calls, "image") == images and model_calls(calls, "text") == texts
    again = _embedded(second)
    assert again.column("id").equals(rows.column("id"))
    # Bit for bit what a fresh computation gives: the same model run here without a store.
    fresh = Embed(model=DEMO_CLIP, store="none").process(
        pq.read_table(DEMO_DATA).filter(pa.compute.is_in(pa.compute.field("id"), rows["id"]))
    )
    fresh = fresh.sort_by("id")
    for column in ("image_emb", "text_emb"):
        assert np.array_equal(_vectors(again, column), _vectors(fresh, column))
        assert np.array_equal(_vectors(rows, column), _vectors(fresh, column))


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return pq.read_table(DEMO_DATA).slice(0, 24)


def _embed(rows: pa.Table, model: str, store: str, calls: Path) -> tuple[pa.Table, int]:
    """The rows through a counting embed, and the images its model embedded."""
    stage = CountingEmbed(model=model, store=store, model_batch_size=8)
    stage.count_dir = str(calls)
    stage.setup()
    before = model_calls(calls, "image")
    out = stage.process(rows)
    return out, model_calls(calls, "image") - before


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_changed_model_or_preprocessing_computes_new_embeddings(rows, tmp_path):
    store, calls = str(tmp_path / "store"), tmp_path / "calls"
    fresh, n = _embed(rows, DEMO_CLIP, "none", calls)
    assert n == rows.num_rows
    out, n = _embed(rows, DEMO_CLIP, store, calls)
    assert n == rows.num_rows
    out, n = _embed(rows, DEMO_CLIP, store, calls)
    assert n == 0 and np.array_equal(_vectors(out, "image_emb"), _vectors(fresh, "image_emb"))
    assert np.array_equal(_vectors(out, "text_emb"), _vectors(fresh, "text_emb"))
    # A copy of the model folder is the same model (known by its weights' content)...
    same = _copy_model(DEMO_CLIP, tmp_path / "copy")
    assert _embed(rows, str(same), store, calls)[1] == 0
    # ...other preprocessing (mean/std) is not...
    other_pre = _copy_model(DEMO_CLIP, tmp_path / "other_pre")
    config = json.loads((other_pre / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (other_pre / "open_clip_config.json").write_text(json.dumps(config))
    assert _embed(rows, str(other_pre), store, calls)[1] == rows.num_rows
    # ...nor are other weights.
    other_weights = _copy_model(DEMO_CLIP, tmp_path / "other_weights")
    weights = load_file(other_weights / "open_clip_model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + np.float32(1e-3)
    save_file(weights, other_weights / "open_clip_model.safetensors")
    assert _embed(rows, str(other_weights), store, calls)[1] == rows.num_rows
    # The other models' vectors were stored too: a second run of each computes nothing.
    assert _embed(rows, str(other_pre), store, calls)[1] == 0


def test_the_store_location_is_not_part_of_the_stage_cache_key():
    assert Embed(store="none").params_hash == Embed(store="s3://b/e").params_hash
    assert Embed(store="none").params_hash != Embed(model="x", store="none").params_hash


def test_off_writes_nothing(rows, tmp_path, monkeypatch):
    monkeypatch.setenv("WARREN_CACHE", str(tmp_path / "cache"))
    # The suite turns the default store off (conftest); here `cache` means the user's cache.
    monkeypatch.delenv("WARREN_EMBED_STORE")
    _embed(rows.slice(0, 2), DEMO_CLIP, "none", tmp_path / "calls")
    assert not (tmp_path / "cache").exists()
    _embed(rows.slice(0, 2), DEMO_CLIP, "cache", tmp_path / "calls")
    assert list((tmp_path / "cache" / "embeddings").rglob("*.emb"))


def _store(path: Path, **spec) -> EmbeddingStore:
    return EmbeddingStore(Location.of(path), {**SPEC, **spec})


def test_store_returns_what_was_put_and_nothing_else(tmp_path):
    keys = content_keys([b"a", b"b", "c", b"\x00"])
    vecs = np.arange(16, dtype=np.float16).reshape(4, DIM) / 7
    _store(tmp_path).put(keys[:3], vecs[:3])
    got, found = _store(tmp_path).get(keys)  # a new actor: reads the files
    assert found.tolist() == [True, True, True, False]
    assert np.array_equal(got[:3].view(np.uint16), vecs[:3].view(np.uint16))
    assert not _store(tmp_path, model="other").get(keys)[1].any()
    assert not _store(tmp_path, kind="text").get(keys)[1].any()


def _files(store: EmbeddingStore) -> list[Path]:
    return sorted(Path(store.folder.path).glob("*.emb"))


def test_damaged_store_files_are_skipped_with_a_warning_and_recomputed(tmp_path, caplog):
    keys = content_keys([b"a", b"b", b"c", b"d"])
    vecs = np.arange(4 * DIM, dtype=np.float16).reshape(4, DIM)
    for k in range(4):  # one file per key
        _store(tmp_path).put(keys[k : k + 1], vecs[k : k + 1])
    store = _store(tmp_path)
    files = {_store(tmp_path)._read_keys(str(f))[0]: f for f in _files(store)}
    # b: truncated; c: one bit of its vector flipped; d: a header naming another width.
    b, c, d = (files[k] for k in keys[1:])
    b.write_bytes(b.read_bytes()[:-3])
    raw = bytearray(c.read_bytes())
    raw[-6] ^= 1
    c.write_bytes(bytes(raw))
    d.write_bytes(d.read_bytes().replace(b'"dim": 4', b'"dim": 8'))
    with caplog.at_level(logging.WARNING, logger="warren.stages.embed_store"):
        got, found = store.get(keys)
    assert found.tolist() == [True, False, False, False]
    assert np.array_equal(got[0], vecs[0])
    assert caplog.text.count("skipping") == 3, caplog.text
    assert all(f.name in caplog.text for f in (b, c, d))
    # NaN vectors under a valid key: found by the index, refused on read.
    _store(tmp_path / "nan").put(keys[:1], np.full((1, DIM), np.nan, dtype=np.float16))
    assert not _store(tmp_path / "nan").get(keys[:1])[1].any()
    # A file of another store (another spec) in this folder is skipped too.
    other = _store(tmp_path / "other", model="other")
    other.put(keys[1:2], vecs[1:2])
    shutil.copy(_files(other)[0], Path(store.folder.path) / "stray.emb")
    assert not _store(tmp_path).get(keys[1:2])[1].any()


def test_an_embed_run_survives_a_corrupt_store(rows, tmp_path):
    store, calls = tmp_path / "store", tmp_path / "calls"
    fresh, _ = _embed(rows, DEMO_CLIP, "none", calls)
    _embed(rows, DEMO_CLIP, str(store), calls)
    for f in store.rglob("*.emb"):
        f.write_bytes(b"not a store file")
    out, n = _embed(rows, DEMO_CLIP, str(store), calls)
    assert n == rows.num_rows
    assert np.array_equal(_vectors(out, "image_emb"), _vectors(fresh, "image_emb"))


def test_warren_embed_store_points_the_default_elsewhere_or_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("WARREN_EMBED_STORE", str(tmp_path / "site"))
    assert store_location("cache").path == str(tmp_path / "site")
    assert store_location(str(tmp_path / "mine")).path == str(tmp_path / "mine")
    monkeypatch.setenv("WARREN_EMBED_STORE", "none")
    assert store_location("cache") is None
