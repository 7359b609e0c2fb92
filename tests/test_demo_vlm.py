"""The demo VLM of stages/demo_vlm.py is the model the trainers' build_llava assembles from the same
parts and seed: same config, same processor, bit-identical weights. So the recaptioning demo
funnels stay the same now that the stages build it without importing the trainers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPVisionConfig  # noqa: E402

from warren.stages import demo_vlm  # noqa: E402
from warren.stages.lm import SMOLLM2, resolve  # noqa: E402
from warren.stages.models import ModelNotFoundError  # noqa: E402
from warren.trainers.model import build_llava  # noqa: E402


def _smollm2() -> str:
    try:
        return resolve(SMOLLM2)[0]
    except ModelNotFoundError as exc:
        pytest.skip(f"SmolLM2 is not installed: {exc}")


def _built_by_the_trainers(folder: Path) -> None:
    """What the demo VLM was before it moved into the stages: build_llava from the seed."""
    tower = CLIPVisionConfig(
        image_size=64,
        patch_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = build_llava(tower, _smollm2())
    parts.processor.chat_template = demo_vlm.CHAT_TEMPLATE
    parts.save_pretrained(folder)


def test_the_stages_demo_vlm_is_bit_identical_to_build_llavas(tmp_path: Path) -> None:
    _smollm2()
    ours, theirs = tmp_path / "stages", tmp_path / "trainers"
    demo_vlm.build_demo_vlm(ours)
    _built_by_the_trainers(theirs)

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    # the projector is the part drawn from the seed after the LM loaded: not all zeros or equal
    proj = [n for n in a if "multi_modal_projector" in n]
    assert proj and any(a[n].abs().sum() > 0 for n in proj)

    files = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == files
    for name in files:
        if name.endswith(".json") or name.endswith(".jinja") or name.endswith(".txt"):
            left, right = (ours / name).read_text(), (theirs / name).read_text()
            if name.endswith(".json"):
                left, right = json.loads(left), json.loads(right)
            assert left == right, name
