"""Training LLaVA models end to end on CPU: tiny models saved to tmp_path and passed by path, as
a user passes real ones. The tiny LM is first taught to copy a colour word that precedes a
caption, so that aligning only the projector can make the model name an image's colour: the
tests can then check that training learned the task, not just that the loss moved."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_eval_metrics import _cider_d
from test_trainers_data import (
    COLORS,
    CORPUS,
    color_row,
    image_processor,
    word_tokenizer,
    write_shards,
)
from tiny_models import llm_config, vision_config
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from warren.pipelines.cli import main as main_cli
from warren.trainers.data import DataProblemError
from warren.trainers.llava import PROJECTOR_FILE, TrainConfig, build_parser, main, resolve, train
from warren.trainers.model import build_llava
from warren.trainers.templates import VICUNA_V1_SYSTEM

PROJECTOR_NAMES = {
    f"model.multi_modal_projector.linear_{k}.{p}" for k in (1, 2) for p in ("weight", "bias")
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices gain nothing from threads, and lose a lot when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """vision/: a tiny CLIP vision tower and its image processor; llm/: a tiny Llama and its
    tokenizer, trained to say "this is a C picture ." after 16 copies of the colour word C."""
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionModel(vision_config())
    vision.save_pretrained(root / "vision")
    image_processor().save_pretrained(root / "vision")
    lm = LlamaForCausalLM(llm_config(len(tok)))
    # The captions after 16 copies of their colour word (as many as the image tokens that will
    # stand in for them), and the rest of the vocabulary in sentences, so that no token the
    # templates use keeps an untrained embedding (LoRA cannot train embeddings).
    texts = [" ".join([c] * 16) + f" this is a {c} picture ." for c in COLORS]
    batch = tok([t + tok.eos_token for t in texts + CORPUS[:2]], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[: len(COLORS), :17] = -100
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(60):
        lm(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """64 rows of the four colours in 4 files of 2 row groups, plus a row whose image has no
    bytes and one whose image is not an image."""
    folder = tmp_path_factory.mktemp("shards")
    rows = [color_row(i) for i in range(64)]
    rows.insert(10, color_row(64, images=[{"bytes": None, "path": "gone.png"}]))
    rows.insert(40, color_row(65, images=[{"bytes": b"GIF89a-nope", "path": None}]))
    write_shards(folder, rows, rows_per_file=17, row_group_size=9)
    return folder


def config(models: Path, shards: Path, output: Path, **kw) -> TrainConfig:
    base = {
        "stage": "align",
        "data": [str(shards)],
        "output": str(output),
        "vision": str(models / "vision"),
        "llm": str(models / "llm"),
        "batch_size": 8,
        "num_workers": 0,
        "log_every": 1,
        "max_bad_share": 0.05,
        "lr": 1e-2,
    }
    return TrainConfig(**{**base, **kw})


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def state(path: Path) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def describe(path: Path, template: str, system: str = VICUNA_V1_SYSTEM) -> dict[str, str]:
    """Greedy answers of the checkpoint at `path` for an image of each colour, asked through
    the chat template the checkpoint carries, which must render the training format."""
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what color is the picture?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # The training format, written out by hand (plain: the image alone).
    expected = "<image>"
    if template == "vicuna_v1":
        expected = f"{system} USER: <image>\nwhat color is the picture? ASSISTANT:"
    assert prompt == expected
    out = {}
    for color, rgb in COLORS.items():
        inputs = processor(
            text=prompt, images=[Image.new("RGB", (40, 48), rgb)], return_tensors="pt"
        )
        generated = model.generate(**inputs, max_new_tokens=7, do_sample=False)
        new = generated[0, inputs["input_ids"].shape[1] :]
        out[color] = processor.tokenizer.decode(new, skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def aligned(models, shards, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("align") / "run"
    return output, train(config(models, shards, output, max_steps=40))


def test_align_lowers_the_loss_and_trains_the_projector_alone(models, aligned):
    output, summary = aligned
    curve = losses(output)
    assert len(curve) == summary["steps"] == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 / 10
    # The model the run started from: the same parts, the projector drawn after the same seed.
    torch.manual_seed(0)
    initial = build_llava(str(models / "vision"), str(models / "llm")).model.state_dict()
    after = state(output)
    assert changed(initial, after) == PROJECTOR_NAMES
    projector = load_file(str(output / PROJECTOR_FILE))
    assert projector.keys() == PROJECTOR_NAMES
    assert all(torch.equal(projector[k], after[k]) for k in PROJECTOR_NAMES)


def test_a_token_budget_ends_the_run_at_the_step_that_reaches_it(models, shards, aligned, tmp_path):
    output, summary = aligned
    # The unbroken run's running token totals, step by step: the budget is one token past
    # step 2's, so the budgeted run takes a third step and stops there.
    seen = [
        json.loads(line)["tokens"] for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert seen[-1] == summary["tokens"] and len(set(seen)) == len(seen)
    run = train(config(models, shards, tmp_path / "run", max_steps=40, max_tokens=seen[1] + 1))
    assert (run["steps"], run["tokens"], run["max_tokens_reached"]) == (3, seen[2], True)


def test_the_aligned_checkpoint_reloads_and_names_each_colour(aligned):
    output, _ = aligned
    assert describe(output, "plain") == {c: f"this is a {c} picture ." for c in COLORS}


def test_skipped_rows_are_counted_in_the_summary_and_listed_by_id(aligned):
    output, summary = aligned
    # 40 steps of 8 = five passes over the 64 good rows; every pass reads the two bad rows.
    data = summary["data"]
    assert (data["rows"], data["samples"], data["skipped"]) == (66 * 5, 64 * 5, 2 * 5)
    assert (data["missing_image"], data["bad_image"]) == (5, 5)
    problems = [
        json.loads(line) for line in (output / "data_problems.jsonl").read_text().splitlines()
    ]
    assert sorted({(p["id"], p["kind"]) for p in problems}) == [
        ("row-0064", "missing_image"),
        ("row-0065", "bad_image"),
    ]
    assert json.loads((output / "train_summary.json").read_text())["data"] == data


def test_too_many_skipped_rows_fail_the_run_with_the_counts(models, shards, tmp_path):
    with pytest.raises(
        DataProblemError,
        match=r"one data worker: 1 of \d+ rows skipped .* already exceed .* of the 66 rows",
    ):
        train(config(models, shards, tmp_path / "run", max_steps=5, max_bad_share=0.001))


def test_instruct_with_lora_learns_the_answers_changing_only_adapted_layers_and_projector(
    aligned, shards, tmp_path
):
    start, _ = aligned
    output = tmp_path / "instruct"
    summary = train(
        TrainConfig(
            stage="instruct",
            data=[str(shards)],
            output=str(output),
            from_checkpoint=str(start),
            lora=True,
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            lr=2e-2,
            projector_lr=1e-3,
            max_steps=40,
            batch_size=8,
            num_workers=0,
            log_every=1,
            max_bad_share=0.05,
        )
    )
    curve = losses(output)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 / 20
    assert summary["lora_merged"] and not (output / "adapter_config.json").exists()
    # Merged: the adapted linear layers of the LM and the projector differ from the start.
    adapted = {
        f"model.language_model.layers.{i}.{block}.{name}.weight"
        for i in range(2)
        for block, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names
    }
    after = state(output)
    assert changed(state(start), after) == adapted | PROJECTOR_NAMES
    projector = load_file(str(output / PROJECTOR_FILE))
    assert all(torch.equal(projector[k], after[k]) for k in PROJECTOR_NAMES)
    assert describe(output, "vicuna_v1") == {c: f"the picture is {c} ." for c in COLORS}


def test_an_unmerged_lora_adapter_reloads_with_from_pretrained(aligned, shards, tmp_path):
    start, _ = aligned
    output = tmp_path / "adapter"
    train(
        TrainConfig(
            stage="instruct",
            data=[str(shards)],
            output=str(output),
            from_checkpoint=str(start),
            lora=True,
            lora_r=4,
            lora_alpha=8,
            lora_target_modules=["q_proj", "v_proj"],
            lora_merge=False,
            lr=1e-2,
            max_steps=4,
            batch_size=8,
            num_workers=0,
            max_bad_share=0.05,
        )
    )
    adapter = load_file(str(output / "adapter_model.safetensors"))
    # Only the adapters of the targeted layers and the projector's trained copy are saved.
    assert all(
        ("lora_" in k and ("q_proj" in k or "v_proj" in k)) or "multi_modal_projector" in k
        for k in adapter
    )
    assert len([k for k in adapter if "lora_" in k]) == 2 * 2 * 2
    config_json = json.loads((output / "adapter_config.json").read_text())
    assert Path(config_json["base_model_name_or_path"]) == start.resolve()
    # peft's own way to apply it, merged: only the adapted layers and the projector moved.
    from peft import PeftModel

    base = LlavaForConditionalGeneration.from_pretrained(start)
    merged = PeftModel.from_pretrained(base, output).merge_and_unload()
    weights = merged.state_dict()
    projector = load_file(str(output / PROJECTOR_FILE))
    assert all(torch.equal(projector[k], weights[k]) for k in PROJECTOR_NAMES)
    assert changed(state(start), weights) == PROJECTOR_NAMES | {
        f"model.language_model.layers.{i}.self_attn.{p}.weight"
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    # transformers loads base and adapter from the output folder alone, to the same model.
    loaded = LlavaForConditionalGeneration.from_pretrained(output)
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7]])}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, merged(**inputs).logits, atol=1e-5)
    assert set(describe(output, "vicuna_v1")) == set(COLORS)  # it generates


def test_full_instruct_trains_lm_and_projector_each_at_its_own_rate(aligned, shards, tmp_path):
    start, _ = aligned
    output = tmp_path / "full"
    train(
        TrainConfig(
            stage="instruct",
            data=[str(shards)],
            output=str(output),
            from_checkpoint=str(start),
            lr=1e-3,
            projector_lr=0.0,  # the projector's group must not move at all
            unfreeze_vision=True,
            max_steps=3,
            batch_size=8,
            num_workers=0,
            max_bad_share=0.05,
        )
    )
    moved = changed(state(start), state(output))
    names = state(start).keys()
    lm = {k for k in names if k.startswith(("model.language_model.", "lm_head."))}
    assert lm <= moved
    assert not moved & PROJECTOR_NAMES
    # The tower's features come from its penultimate layer: what lies after it gets no gradient.
    vision = {k for k in moved if k.startswith("model.vision_tower.")}
    assert "model.vision_tower.embeddings.patch_embedding.weight" in vision
    assert not {k for k in vision if ".layers.1." in k or "post_layernorm" in k}


def test_instruct_from_parts_starts_from_an_align_runs_projector_file(
    models, shards, aligned, tmp_path
):
    start, _ = aligned
    # The same weights under original LLaVA's key names load the same way.
    ours = load_file(str(start / PROJECTOR_FILE))
    llava_keys = {
        k.replace("multi_modal_projector.linear_1", "mm_projector.0").replace(
            "multi_modal_projector.linear_2", "mm_projector.2"
        ): v
        for k, v in ours.items()
    }
    save_file(llava_keys, str(tmp_path / "mm_projector_llava.safetensors"))
    for name, path in (
        ("ours", start / PROJECTOR_FILE),
        ("llava", tmp_path / "mm_projector_llava.safetensors"),
    ):
        output = tmp_path / name
        train(config(models, shards, output, stage="instruct", projector=str(path), max_steps=0))
        assert changed(state(start), state(output)) == set()


def test_resume_from_a_checkpoint_reaches_the_weights_of_an_unbroken_run(aligned, shards, tmp_path):
    start, _ = aligned
    # Two data workers, gradient accumulation and LoRA dropout: the checkpoint at step 5 is
    # mid-epoch (10 batches of 4 of the 64 good rows), and the rest of the run has to see the
    # same batches and random draws as the unbroken run, into its second epoch.
    run = TrainConfig(
        stage="instruct",
        data=[str(shards)],
        output=str(tmp_path / "whole"),
        from_checkpoint=str(start),
        lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        lr=1e-2,
        max_steps=10,
        grad_accum=2,
        batch_size=4,
        num_workers=2,
        shuffle_buffer=8,
        length_group_batches=2,
        save_every=5,
        log_every=1,
        max_bad_share=0.05,
    )
    whole = train(run)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(
        tmp_path / "whole" / "checkpoints" / "checkpoint-5",
        broken / "checkpoints" / "checkpoint-5",
    )
    # What the interrupted run logged, up to its last step (10); resuming drops steps 6 to 10,
    # and the skipped rows of the epoch it goes back into.
    for name in ("metrics.jsonl", "data_problems.jsonl"):
        shutil.copy(tmp_path / "whole" / name, broken / name)
    resumed = train(dataclasses.replace(run, output=str(broken), resume=True))
    assert changed(state(tmp_path / "whole"), state(broken)) == set()
    assert losses(broken) == losses(tmp_path / "whole")
    # The same skipped rows, arriving from the workers in another order where the resumed run's
    # first batches were passed over: both bad rows in epoch 0, what was read of epoch 1.
    problems = [
        sorted((tmp_path / d / "data_problems.jsonl").read_text().splitlines())
        for d in ("whole", "broken")
    ]
    assert problems[0] == problems[1]
    records = [json.loads(line) for line in problems[0]]
    assert sorted(r["id"] for r in records if r["epoch"] == 0) == ["row-0064", "row-0065"]
    for key in ("steps", "samples", "tokens", "epochs_completed", "data"):
        assert resumed[key] == whole[key]
    with pytest.raises(ValueError, match="lr: 0.01 then, 0.02 now"):
        train(dataclasses.replace(run, output=str(broken), resume=True, lr=2e-2))


def test_the_command_line_trains_and_prints_the_summary(models, shards, tmp_path, capsys):
    output = tmp_path / "cli"
    argv = [
        "--stage", "align",
        "--data", str(shards),
        "--vision", str(models / "vision"),
        "--llm", str(models / "llm"),
        "--output", str(output),
        "--max-steps", "3",
        "--batch-size", "4",
        "--num-workers", "0",
        "--max-bad-share", "0.05",
        "--save-every", "2",
        "--gradient-checkpointing",
    ]  # fmt: skip
    summary = main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((output / "train_summary.json").read_text())
    assert (summary["steps"], summary["samples"]) == (3, 12)
    assert summary["config"]["template"] == "plain" and summary["config"]["lr"] == 1e-3
    assert {"config.json", "model.safetensors", PROJECTOR_FILE} <= set(summary["files"])
    # Every 2 steps, and (the Trainer's way) at the last step.
    names = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert names == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(ValueError, match="holds an earlier run"):
        main(argv)


def test_flags_come_from_the_config_and_bad_combinations_name_the_flag(tmp_path):
    args = build_parser().parse_args(
        ["--stage", "instruct", "--data", "a", "b", "--output", "o", "--from-checkpoint", "c",
         "--lora", "--no-lora-merge", "--lora-target-modules", "q_proj", "v_proj"]
    )  # fmt: skip
    c = resolve(TrainConfig(**vars(args)))
    assert (c.data, c.template, c.lr, c.projector_lr) == (["a", "b"], "vicuna_v1", 2e-4, 2e-5)
    assert (c.lora, c.lora_merge, c.lora_target_modules) == (True, False, ["q_proj", "v_proj"])
    common = {"data": ["d"], "output": "o"}
    with pytest.raises(ValueError, match="--lora: instruct only"):
        resolve(TrainConfig(stage="align", vision="v", llm="l", lora=True, **common))
    with pytest.raises(ValueError, match="not both"):
        resolve(TrainConfig(stage="align", vision="v", llm="l", from_checkpoint="c", **common))
    with pytest.raises(ValueError, match="give --vision and --llm"):
        resolve(TrainConfig(stage="instruct", llm="l", **common))
    # accelerate would replicate the model on CPU workers: --fsdp there is refused, not ignored.
    with pytest.raises(ValueError, match="--fsdp shards over GPU workers only"):
        resolve(
            TrainConfig(
                stage="align", vision="v", llm="l", fsdp=True, workers=2, use_gpu=False, **common
            )
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--qlora needs a CUDA GPU"):
            resolve(TrainConfig(stage="instruct", from_checkpoint="c", qlora=True, **common))


def test_warren_train_takes_a_run_folder_for_its_final_stage(models, shards, tmp_path, capsys):
    from warren.pipelines import cli

    # A finished run by hand: 00-ingest and 01-sample, run.json naming 01-sample the final stage.
    run = tmp_path / "run"
    for folder, files in (("00-ingest", []), ("01-sample", sorted(shards.glob("*.parquet")))):
        (run / folder).mkdir(parents=True)
        listed = []
        for f in files:
            shutil.copy(f, run / folder / f.name)
            rows = pq.read_metadata(f).num_rows
            listed.append({"name": f.name, "rows": rows, "bytes": f.stat().st_size})
        manifest = {"stage": folder.split("-", 1)[1], "files": listed, "rejected_files": []}
        (run / folder / "_manifest.json").write_text(json.dumps(manifest))
    (run / "run.json").write_text(
        json.dumps({"stages": [{"folder": "00-ingest"}, {"folder": "01-sample"}],
                    "final": {"folder": "01-sample"}})
    )  # fmt: skip
    common = ["--data", str(run), "--output", str(tmp_path / "out"), "--max-steps", "1"]
    parts = ["--vision", str(models / "vision"), "--llm", str(models / "llm")]
    rest = ["--batch-size", "4", "--num-workers", "0", "--max-bad-share", "0.05"]
    assert cli.main(["train", *common, *parts, *rest]) == 0
    summary = json.loads(capsys.readouterr().out)
    # stage align by default; the data is the final stage's folder, not the run's
    assert summary["config"]["stage"] == "align"
    assert summary["config"]["data"] == [str(run / "01-sample")]
    assert summary["steps"] == 1
    # a setting that cannot run: exit 2, the trainer's message naming the flag
    assert cli.main(["train", *common[:2], "--output", str(tmp_path / "o2"), "--llm", "x"]) == 2
    assert "give --vision and --llm" in capsys.readouterr().err


def test_warren_eval_scores_the_aligned_checkpoint_in_process(aligned, tmp_path, capsys):
    # A caption task in COCO's format, one image of each colour, its reference the caption the
    # model was aligned to say: the checkpoint, loaded as `warren eval` loads it, says each.
    output, _ = aligned
    root = tmp_path / "data" / "coco_caption"
    root.mkdir(parents=True)
    references = {str(k): [f"this is a {c} picture ."] for k, c in enumerate(COLORS)}
    refs_json = {
        "images": [{"id": k, "file_name": f"{c}.png"} for k, c in enumerate(COLORS)],
        "annotations": [{"image_id": k, "caption": references[str(k)][0]} for k in range(4)],
    }
    (root / "captions.json").write_text(json.dumps(refs_json))
    for color, rgb in COLORS.items():
        Image.new("RGB", (40, 48), rgb).save(root / f"{color}.png")
    code = main_cli(
        ["eval", str(output), "--tasks", "coco_caption", "--data", str(tmp_path / "data"),
         "--output", str(tmp_path / "eval"), "--batch-size", "3", "--max-new-tokens", "7"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    said = {
        json.loads(line)["id"]: json.loads(line)["prediction"]
        for line in (tmp_path / "eval" / "predictions" / "coco_caption.jsonl")
        .read_text()
        .split("\n")
        if line
    }
    assert said == {k: refs[0] for k, refs in references.items()}
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # Each prediction is its reference, but every reference shares "this is a ... picture .":
    # CIDEr-D's idf weighs only the colour word, so the score is finite, not a fixed maximum.
    expected = _cider_d(said, references)
    assert results["tasks"]["coco_caption"]["metrics"]["cider"] == pytest.approx(
        100 * sum(expected.values()) / 4
    )
    assert "| coco_caption | cider |" in capsys.readouterr().out


def test_trainer_flags_pass_through_after_warrens_own(models, shards, tmp_path, capsys):
    # transformers' own spelling, after warren's flags: a constant schedule without warmup keeps
    # the rate at --lr on every step (warren's default is warmup and cosine decay), and a
    # logging interval of 2 logs steps 2 and 4.
    def argv(output: Path, *trainer_flags: str) -> list[str]:
        return [
            "--stage", "align", "--data", str(shards), "--output", str(output),
            "--vision", str(models / "vision"), "--llm", str(models / "llm"), "--max-steps", "4",
            "--batch-size", "4", "--num-workers", "0", "--max-bad-share", "0.05", *trainer_flags,
        ]  # fmt: skip

    output = tmp_path / "passthrough"
    flags = ["--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "2"]
    summary = main(argv(output, *flags))
    capsys.readouterr()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in records] == [(2, 1e-3), (4, 1e-3)]
    given = summary["config"]["training_args"]
    assert (given["lr_scheduler_type"], given["warmup_steps"], given["logging_steps"]) == (
        "constant",
        0,
        2,
    )
    with pytest.raises(SystemExit):
        main(argv(tmp_path / "o1", "--no_such_trainer_flag", "1"))
    assert "unrecognized arguments: --no_such_trainer_flag" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max_steps: set by warren"):
        main(argv(tmp_path / "o2", "--max_steps", "3"))
