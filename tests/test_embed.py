"""embed and models: tiny open_clip and transformers CLIP models built from configs (no network),
checked against the same models run directly, with rejected rows and the offline error."""

from __future__ import annotations

import gzip
import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from declared_columns import assert_adds_what_it_declares
from PIL import Image

from warren.stages.embed import Embed
from warren.stages.models import ModelNotFoundError, load_clip, register_open_clip_config
from warren.stages.schema import embedding_type, rows_to_table

ARCH = "warren-test-tiny"
DIM = 16
TINY_OPEN_CLIP = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red square", "two dogs on a beach", "  a caption with spaces  ", "x" * 400]


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _images() -> list[Image.Image]:
    """Varied sizes (smaller and larger than the model's 32 px) and modes, from a fixed seed."""
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50), (33, 33)]):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[: h // 2, :, i % 3] = 255  # some structure, different per image
        out.append(Image.fromarray(pixels))
    out[2] = out[2].convert("L")
    out[3] = out[3].convert("RGBA")
    return out


def _batch() -> tuple[pa.Table, dict[str, tuple[Image.Image, str]]]:
    """Good rows g0..g3 (images and captions), and rows with each kind of problem."""
    imgs = _images()
    jpeg = _png(imgs[0], "JPEG")
    # The reference decodes the stored bytes too: JPEG is lossy.
    good = {f"g{i}": (imgs[i], CAPTIONS[i]) for i in range(4)}
    good["g0"] = (Image.open(io.BytesIO(jpeg)), CAPTIONS[0])
    truncated = _png(imgs[1])[:60]
    rows = [
        {"id": "g0", "images": [{"bytes": jpeg, "path": "a.jpg"}]},
        {"id": "no_caption", "images": [{"bytes": _png(imgs[0]), "path": None}], "caption": None},
        {"id": "g1", "images": [{"bytes": _png(imgs[1])}, {"bytes": b"second image ignored"}]},
        {"id": "garbage", "images": [{"bytes": b"<html>not an image</html>"}]},
        {"id": "g2", "images": [{"bytes": _png(imgs[2])}]},
        {"id": "empty_list", "images": [], "caption": "has a caption"},
        {"id": "null_images", "images": None, "caption": None},
        {"id": "truncated", "images": [{"bytes": truncated}]},
        {"id": "null_bytes", "images": [{"bytes": None, "path": "gone.jpg"}]},
        {"id": "blank_caption", "images": [{"bytes": _png(imgs[3])}], "caption": " \t "},
        {"id": "g3", "images": [{"bytes": _png(imgs[3])}]},
    ]
    for r in rows:
        r.setdefault("caption", good[r["id"]][1] if r["id"] in good else "some caption")
        r["images"] = (
            None
            if r["images"] is None
            else [{"bytes": im.get("bytes"), "path": im.get("path")} for im in r["images"]]
        )
    table = rows_to_table(rows)
    # Two chunks, the second a slice: offsets of list columns must be honoured.
    return pa.concat_tables([table.slice(0, 4), table.slice(4)]), good


EXPECTED_REASONS = {
    "no_caption": "embed: missing caption",
    "empty_list": "embed: no image",
    "null_images": "embed: no image",
    "null_bytes": "embed: undecodable image (null bytes)",
    "blank_caption": "embed: missing caption",
}


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    rows = column.to_pylist()
    return np.array([r if r is not None else [np.nan] * DIM for r in rows], dtype=np.float32)


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A tiny open_clip model with seeded weights saved as a checkpoint, and its own transforms."""
    import open_clip

    register_open_clip_config(ARCH, TINY_OPEN_CLIP)
    torch.manual_seed(1234)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    model.eval()
    ckpt = tmp_path_factory.mktemp("open_clip") / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt, model, preprocess, open_clip.get_tokenizer(ARCH)


def _clip_tokenizer():
    """The CLIP BPE tokenizer built from the vocabulary open_clip ships (no download)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=16
    )


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny transformers CLIPModel and CLIPProcessor saved to a directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=DIM,
    )
    torch.manual_seed(1234)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=_clip_tokenizer(),
    )
    path = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_output(out: pa.Table, batch: pa.Table, good, ref_img, ref_txt, name: str) -> None:
    assert out.num_rows == batch.num_rows
    assert out.column("id").to_pylist() == batch.column("id").to_pylist()
    assert out.schema.field("image_emb").type == embedding_type(DIM)
    assert out.schema.field("text_emb").type == embedding_type(DIM)
    assert set(out.column("emb_model").to_pylist()) == {name}
    ids = out.column("id").to_pylist()
    img, txt = _vectors(out.column("image_emb")), _vectors(out.column("text_emb"))
    for k, rid in enumerate(good):
        i = ids.index(rid)
        assert np.linalg.norm(img[i]) == pytest.approx(1.0, abs=2e-3)
        assert np.linalg.norm(txt[i]) == pytest.approx(1.0, abs=2e-3)
        np.testing.assert_allclose(img[i], ref_img[k], atol=2e-3)
        np.testing.assert_allclose(txt[i], ref_txt[k], atol=2e-3)
    reasons = dict(zip(ids, out.column("_reject").to_pylist(), strict=True))
    assert {rid for rid, r in reasons.items() if r is None} == set(good)
    for rid, reason in EXPECTED_REASONS.items():
        assert reasons[rid] == reason
    assert reasons["garbage"] == (
        "embed: undecodable image (unknown format, 25 bytes, starts 3c68746d6c3e6e6f)"
    )
    assert reasons["truncated"].startswith("embed: undecodable image (")
    # Rows without a usable image have a null image_emb; rows without a caption a null text_emb.
    no_image = {"empty_list", "null_images", "null_bytes", "garbage", "truncated"}
    assert {ids[i] for i in np.flatnonzero(np.isnan(img[:, 0]))} == no_image
    assert {ids[i] for i in np.flatnonzero(np.isnan(txt[:, 0]))} == {
        "no_caption",
        "blank_caption",
        "null_images",
    }


def test_open_clip_embeddings_equal_the_model_run_directly(open_clip_model):
    ckpt, model, preprocess, tokenizer = open_clip_model
    batch, good = _batch()
    stage = Embed(model=f"open_clip:{ARCH}:{ckpt}", model_batch_size=3)
    stage.setup()
    out = stage.process(batch)
    assert_adds_what_it_declares(stage, batch.schema, out.schema)

    with torch.no_grad():
        pixels = torch.stack([preprocess(im.convert("RGB")) for im, _ in good.values()])
        ref_img = F.normalize(model.encode_image(pixels), dim=-1).numpy()
        tokens = tokenizer([caption for _, caption in good.values()])
        ref_txt = F.normalize(model.encode_text(tokens), dim=-1).numpy()
    _check_output(out, batch, good, ref_img, ref_txt, f"open_clip:{ARCH}:{ckpt}")


def test_hf_clip_embeddings_equal_the_model_run_directly(hf_model):
    path, model, processor = hf_model
    batch, good = _batch()
    stage = Embed(model=f"hf:{path}", model_batch_size=2)
    stage.setup()
    out = stage.process(batch)

    with torch.no_grad():
        pixels = processor(
            images=[im.convert("RGB") for im, _ in good.values()], return_tensors="pt"
        )["pixel_values"]
        ref_img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        text = processor.tokenizer(
            [caption for _, caption in good.values()],
            padding=True,
            truncation=True,
            max_length=16,
            return_tensors="pt",
        )
        ref_txt = F.normalize(_features(model.get_text_features(**text)), dim=-1)
    _check_output(out, batch, good, ref_img.numpy(), ref_txt.numpy(), f"hf:{path}")


@pytest.mark.parametrize("kind", ["open_clip random init", "hf directory"])
def test_two_setups_of_the_same_spec_give_identical_embeddings(kind, open_clip_model, hf_model):
    spec = f"open_clip:{ARCH}" if kind == "open_clip random init" else str(hf_model[0])
    batch, _ = _batch()
    first = Embed(model=spec)
    first.setup()
    torch.manual_seed(99)  # the global RNG must not matter
    second = Embed(model=spec)
    second.setup()
    a, b = first.process(batch), second.process(batch)
    assert a.equals(b)
    assert first.model.dim == DIM
    assert not np.isnan(_vectors(a.column("image_emb"))[0]).any()


def test_a_slice_of_a_batch_gets_the_rows_the_whole_batch_gets(open_clip_model):
    batch, _ = _batch()
    whole = pa.Table.from_batches(batch.combine_chunks().to_batches())
    stage = Embed(model=f"open_clip:{ARCH}")
    stage.setup()
    assert stage.process(whole.slice(3, 6)).equals(stage.process(whole).slice(3, 6))


def test_images_or_texts_off_leaves_that_column_and_its_rejections_out(open_clip_model):
    batch, _ = _batch()
    ids = batch.column("id").to_pylist()
    texts_only = Embed(model=f"open_clip:{ARCH}", images=False)
    texts_only.setup()
    out = texts_only.process(batch)
    assert "image_emb" not in out.column_names and "text_emb" in out.column_names
    rejected = {i for i, r in zip(ids, out.column("_reject").to_pylist(), strict=True) if r}
    assert rejected == {"no_caption", "blank_caption", "null_images"}

    images_only = Embed(model=f"open_clip:{ARCH}", texts=False)
    images_only.setup()
    out = images_only.process(batch)
    assert "text_emb" not in out.column_names and "image_emb" in out.column_names
    reasons = dict(zip(ids, out.column("_reject").to_pylist(), strict=True))
    assert reasons["no_caption"] is None and reasons["blank_caption"] is None
    assert reasons["empty_list"] == "embed: no image"


def test_default_model_offline_fails_in_setup_naming_the_flag(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # No hub, and empty caches, whatever this machine holds.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    stage = Embed()  # constructing the stage loads nothing
    assert stage.params.model == "open_clip:ViT-L-14:openai"
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        stage.setup()
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "open_clip:ViT-L-14:openai" in message and "--embed.model" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("open_clip:ViT-L-14:no_such_tag", "known tags"),
        ("open_clip:No-Such-Arch", "no architecture"),
        (f"open_clip:{ARCH}:/nonexistent/weights.pt", "does not exist"),
        ("/nonexistent/model_dir", "no such directory"),
    ],
)
def test_unloadable_specs_are_model_not_found_errors(spec, words, open_clip_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="--embed.model") as err:
        load_clip(spec, device="cpu")
    assert words in str(err.value) and spec in str(err.value)


def test_an_open_clip_directory_loads_the_model_its_checkpoint_holds(open_clip_model, tmp_path):
    """The form a Ray worker can load: config and weights in one directory, no registration."""
    import json

    from safetensors.torch import save_file

    ckpt, model, _, _ = open_clip_model
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    save_file(model.state_dict(), tmp_path / "open_clip_model.safetensors")
    from_dir = load_clip(str(tmp_path), device="cpu")
    from_ckpt = load_clip(f"open_clip:{ARCH}:{ckpt}", device="cpu")
    images = [im.convert("RGB") for im in _images()]
    assert from_dir.dim == DIM and from_dir.name == str(tmp_path)
    np.testing.assert_array_equal(from_dir.encode_images(images), from_ckpt.encode_images(images))
    np.testing.assert_array_equal(from_dir.encode_texts(CAPTIONS), from_ckpt.encode_texts(CAPTIONS))


def test_a_siglip_directory_pads_texts_to_full_length_as_siglip_was_trained(tmp_path):
    """Saved without a processor config: the processor is assembled from its two parts."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = SiglipConfig(
        text_config={**tower, "num_attention_heads": 2, "vocab_size": 49408},
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    config.text_config.max_position_embeddings = 16
    torch.manual_seed(7)
    model = SiglipModel(config).eval()
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    tokenizer = _clip_tokenizer()
    model.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    clip = load_clip(f"hf:{tmp_path}", device="cpu")
    images = [im.convert("RGB") for im in _images()]
    with torch.no_grad():
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        ref_img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        # What the tokenizer returns goes to the model (SigLIP's own tokenizer returns no mask).
        text = tokenizer(
            CAPTIONS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
        )
        ref_txt = F.normalize(_features(model.get_text_features(**text)), dim=-1)
    assert clip.dim == 32
    np.testing.assert_allclose(clip.encode_images(images), ref_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip.encode_texts(CAPTIONS), ref_txt.numpy(), atol=1e-5)


def test_registered_open_clip_configs_leave_no_folder_behind(tmp_path):
    """Each process that registers an architecture writes its config to a temp folder, which
    must go when the process ends (one folder per test worker and Ray worker piled up before)."""
    import subprocess
    import sys

    code = (
        "from warren.stages import models\n"
        f"models.register_open_clip_config('leak-check', {TINY_OPEN_CLIP!r})\n"
        "print(models._REGISTRY_DIR)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path  # it was made, where the temp folder is
    assert not folder.exists()
