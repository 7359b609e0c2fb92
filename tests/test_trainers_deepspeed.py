"""`warren train --deepspeed CONFIG`: DeepSpeed's ZeRO through the Trainer, on the CPU here.

Each run is its own process (DeepSpeed sets up torch.distributed, which would outlive a run in
this one), with the single-process environment DeepSpeed's launcher would give. The ground truth
is the same run without DeepSpeed: ZeRO changes where the optimizer state and weights live, not
the arithmetic, so the trained weights must agree to float rounding. Skipped where deepspeed is not
installed (`pip install deepspeed`; it builds its CPU ops on first use).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainers_data import color_row, save_untrained_parts, write_shards

pytest.importorskip("deepspeed")

ZERO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True},
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = save_untrained_parts(tmp_path_factory.mktemp("ds"))
    write_shards(root / "shards", [color_row(i) for i in range(64)], 16, 8)
    for stage in (2, 3):
        config = {**ZERO, "zero_optimization": {"stage": stage}}
        (root / f"zero{stage}.json").write_text(json.dumps(config))
    return root


def train(root: Path, output: str, *flags: str) -> dict:
    argv = [
        sys.executable, "-m", "warren.trainers.llava", "--stage", "instruct",
        "--data", str(root / "shards"), "--output", str(root / output),
        "--vision", str(root / "vision"), "--llm", str(root / "llm"),
        "--max-steps", "8", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-2",
        "--projector-lr", "1e-2", "--save-every", "4", *flags,
    ]  # fmt: skip
    env = {
        **os.environ,
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / output / "train_summary.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_zero_2_and_3_train_the_weights_a_plain_run_trains_and_resume(setup):
    plain = train(setup, "plain")
    zero2 = train(setup, "zero2", "--deepspeed", str(setup / "zero2.json"))
    # ZeRO-3 without stage3_gather_16bit_weights_on_model_save: warren turns it on, so that
    # the final model is saved whole.
    zero3 = train(setup, "zero3", "--deepspeed", str(setup / "zero3.json"))
    assert (
        plain["parallelism"] is None and zero2["parallelism"] == zero3["parallelism"] == "deepspeed"
    )
    assert plain["last_loss"] < plain["first_loss"] - 0.5
    for run in (zero2, zero3):
        assert run["last_loss"] == pytest.approx(plain["last_loss"], abs=1e-4)
    assert_close(weights(setup / "zero2"), weights(setup / "plain"))
    assert_close(weights(setup / "zero3"), weights(setup / "plain"))
    # Interrupted after step 4: resumed from DeepSpeed's checkpoint, it reaches the same weights.
    broken = setup / "broken"
    shutil.copytree(
        setup / "zero2" / "checkpoints" / "checkpoint-4", broken / "checkpoints" / "checkpoint-4"
    )
    resumed = train(setup, "broken", "--deepspeed", str(setup / "zero2.json"), "--resume")
    assert resumed["steps"] == 8
    assert_close(weights(broken), weights(setup / "zero2"))

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(setup / "zero3")
    assert AutoProcessor.from_pretrained(setup / "zero3").chat_template


def test_lora_under_zero_2_is_merged_like_a_plain_lora_run(setup):
    lora = ("--lora", "--lora-r", "4", "--lora-alpha", "8")
    train(setup, "lora-plain", *lora)
    summary = train(setup, "lora-zero2", *lora, "--deepspeed", str(setup / "zero2.json"))
    assert summary["lora_merged"] and summary["parallelism"] == "deepspeed"
    assert_close(weights(setup / "lora-zero2"), weights(setup / "lora-plain"))
    projector = load_file(str(setup / "lora-zero2" / "mm_projector.safetensors"))
    expected = load_file(str(setup / "lora-plain" / "mm_projector.safetensors"))
    assert_close(projector, expected)
    # The base saved for the merge, and the adapter pointing at it, are gone: one whole model.
    assert not (setup / "lora-zero2" / "base").exists()
    assert not (setup / "lora-zero2" / "adapter").exists()
