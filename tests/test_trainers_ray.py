"""Training on two Ray Train workers (CPU, gloo, DDP) with tiny models built from configs: the
ranks read different shares of uneven row groups and still run the same number of optimizer
steps, the count brute-forced here from the files; the replicas stay identical; the final
checkpoint loads and generates; a run resumed from a mid-epoch checkpoint ends on the weights of
the unbroken run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainers_data import color_row, image_processor, word_tokenizer, write_shards
from tiny_models import llm_config, vision_config
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from warren.trainers.data import assign_units, iter_rows, plan_units
from warren.trainers.llava import TrainConfig, train
from warren.trainers.model import build_llava

BATCH_SIZE, GRAD_ACCUM, WORLD = 4, 2, 2
BAD_ROW = "row-0048"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionModel(vision_config())
    vision.save_pretrained(root / "vision")
    image_processor().save_pretrained(root / "vision")
    lm = LlamaForCausalLM(llm_config(len(tok)))
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 rows in 3 files of 16, in row groups of 5, 5, 5 and 1: the two ranks get 26 and 22
    rows. One row's image has no bytes (skipped, counted)."""
    folder = tmp_path_factory.mktemp("shards")
    rows = [color_row(i) for i in range(47)]
    rows.insert(20, color_row(48, images=[{"bytes": None, "path": "gone.png"}]))
    write_shards(folder, rows, rows_per_file=16, row_group_size=5)
    return folder


def good_rows_per_rank(shards: Path) -> list[int]:
    """Trainable rows each rank reads in epoch 0, from the plan and the files themselves."""
    units = plan_units(shards)
    counts = []
    for rank in range(WORLD):
        mine = assign_units(units, seed=0, epoch=0, rank=rank, world_size=WORLD)
        counts.append(sum(1 for _, row in iter_rows(mine) if row["id"] != BAD_ROW))
    return counts


def config(models: Path, shards: Path, output: Path, **kw) -> TrainConfig:
    base = {
        "stage": "align",
        "data": [str(shards)],
        "output": str(output),
        "vision": str(models / "vision"),
        "llm": str(models / "llm"),
        "batch_size": BATCH_SIZE,
        "grad_accum": GRAD_ACCUM,
        "num_workers": 0,
        "shuffle_buffer": 8,
        "length_group_batches": 2,
        "log_every": 1,
        "save_every": 2,
        "keep_checkpoints": 5,
        "max_bad_share": 0.05,
        "lr": 1e-2,
        "workers": WORLD,
        "cpus_per_worker": 0.5,
    }
    return TrainConfig(**{**base, **kw})


def sha256_of(tensors: dict[str, torch.Tensor]) -> str:
    """The digest run_loop reports per replica: names and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def whole(ray_session, models, shards, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("ray") / "whole"
    return output, train(config(models, shards, output))


def test_both_ranks_run_the_step_count_of_the_rank_with_fewer_rows(shards, whole):
    output, summary = whole
    good = good_rows_per_rank(shards)
    steps = [math.ceil(math.ceil(n / BATCH_SIZE) / GRAD_ACCUM) for n in good]
    assert steps[0] != steps[1]  # the data makes the ranks disagree, or the test proves nothing
    checkpoint = Path(summary["checkpoint"])
    state = json.loads((checkpoint / "warren_state.json").read_text())
    assert state["step"] == summary["steps"] == min(steps)
    assert (state["world_size"], summary["world_size"], summary["parallelism"]) == (2, 2, "ddp")
    # Every good row was batched once: trained on, or left over by the rank with more.
    assert summary["samples"] + summary["unused_samples"] == sum(good) == 47
    assert summary["unused_samples"] > 0
    data = summary["data"]
    assert (data["rows"], data["samples"], data["missing_image"]) == (48, 47, 1)
    problems = [
        json.loads(line)
        for path in sorted(output.glob("data_problems.rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert [(p["id"], p["kind"]) for p in problems] == [(BAD_ROW, "missing_image")]
    logged = [
        json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, min(steps) + 1))


def test_replicas_stay_identical_and_equal_the_saved_weights(models, whole):
    _, summary = whole
    checkpoint = Path(summary["checkpoint"])
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert summary["replica_sha256"] == [sha256_of(saved)] * WORLD
    # Training moved the projector away from its seeded initial weights.
    torch.manual_seed(0)
    initial = build_llava(str(models / "vision"), str(models / "llm")).model.state_dict()
    assert saved.keys() and all(not torch.equal(initial[k], v) for k, v in saved.items())


def test_the_final_ray_checkpoint_loads_and_generates(whole):
    output, summary = whole
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.parent == output / "checkpoints"
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    processor = AutoProcessor.from_pretrained(checkpoint)
    from PIL import Image

    inputs = processor(text="<image>", images=[Image.new("RGB", (40, 48))], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_resumed_two_worker_run_reaches_the_unbroken_runs_weights(
    models, shards, whole, tmp_path
):
    output, summary = whole
    broken = tmp_path / "broken"
    step = Path("checkpoints") / "checkpoint-2"  # mid-epoch: the run has 3 steps
    shutil.copytree(output / step, broken / step)
    resumed = train(config(models, shards, broken, resume=True))
    assert resumed["steps"] == summary["steps"]
    assert resumed["replica_sha256"] == summary["replica_sha256"]
    for key in ("samples", "unused_samples", "tokens", "data"):
        assert resumed[key] == summary[key]
    with pytest.raises(ValueError, match="resume with --workers 2"):
        train(config(models, shards, broken, resume=True, workers=0))
