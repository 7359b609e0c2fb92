"""warren's `instruct` training (transformers' Trainer over warren's data stream) against two
baselines: the plain PyTorch loop warren had before it rode the Trainer, and a plain Hugging Face
`transformers.Trainer` over an in-memory list.

    python benchmarks/train_throughput.py --steps 30 --batch-size 8

All three train the same tiny LLaVA model (a CLIP tower and a Llama LM built from configs, with
the test suite's word tokenizer; full fine-tuning of projector and LM, vision frozen) on the CPU,
one thread, in this process, for the same number of steps at the same batch size, from the same
encoded samples (trainers.templates' vicuna_v1 encoding of the same canonical rows). warren and
the plain loop stream them from Parquet shards through trainers.data (the same loader: the loop
is warren's former one on one process, its per-step work kept and its logging files left out:
AdamW, warmup and cosine decay, the loss over the step's answer tokens, clipping, the loss, norm
and rate read back each step); the
plain Trainer gets them as a list, and its collator decodes the images and pads with
trainers.data's `collate`, the same work per batch. Prints samples/s and tokens/s (attended
positions, image tokens included) of each, over the training steps only (model loading
excluded), and warren's ratio to each. Numbers only: it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from warren.trainers.data import (
    LlavaStream,
    StreamingLoader,
    StreamOptions,
    collate,
    iter_rows,
    plan_units,
)
from warren.trainers.llava import TrainConfig, train
from warren.trainers.model import build_llava, load_llava
from warren.trainers.templates import ConversationEncoder


def _tests_module(name: str) -> ModuleType:
    """A helper module of the test suite (tests/NAME.py), loaded from its file: the suite is not
    installed, and the benchmarks do not edit sys.path."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tests" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the helpers import each other by bare name
        spec.loader.exec_module(module)
    return sys.modules[name]


# tiny_models first: test_trainers_data imports it by name.
_tests_module("tiny_models")
_data_tests = _tests_module("test_trainers_data")
color_row, image_processor = _data_tests.color_row, _data_tests.image_processor
word_tokenizer, write_shards = _data_tests.word_tokenizer, _data_tests.write_shards


def build_models(root: Path, hidden: int) -> Path:
    tok = word_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    llm = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    parts = build_llava(vision, llm, tokenizer=tok, image_processor=image_processor())
    parts.save_pretrained(root / "base")
    return root / "base"


class _Clock(TrainerCallback):
    """Wall time from the start of training to the end of each step: the same span as
    trainers.llava's `train_seconds` (data loading included)."""

    def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, D102
        self.start = self.end = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, D102
        self.end = time.perf_counter()


def hf_trainer(base: Path, data: Path, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    parts = _instruct_model(base)
    model = parts.model
    encoder = ConversationEncoder(
        parts.tokenizer,
        "vicuna_v1",
        num_image_tokens=parts.num_image_tokens,
        image_token=parts.image_token,
    )
    samples = [
        {"sample": encoder.encode(row), "image": row["images"][0]["bytes"]}
        for _, row in iter_rows(plan_units(data))
    ]
    tokens = [0]
    pad = parts.tokenizer.pad_token_id

    def collator(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [Image.open(io.BytesIO(i["image"])).convert("RGB") for i in items]
        pixels = parts.image_processor(images=images, return_tensors="pt")["pixel_values"]
        batch = collate([i["sample"] for i in items], pad, pixels)
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    clock = _Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,  # a float below 1: a share of the steps
            max_grad_norm=1.0,
            weight_decay=0.0,
            use_cpu=True,
            dataloader_num_workers=0,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        Trainer(
            model=model, args=args, train_dataset=samples, data_collator=collator, callbacks=[clock]
        ).train()
    seconds = clock.end - clock.start
    return {"samples_per_s": steps * batch_size / seconds, "tokens_per_s": tokens[0] / seconds}


def _instruct_model(base: Path) -> Any:
    parts = load_llava(base)
    model = parts.model
    model.requires_grad_(False)
    for module in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
        module.requires_grad_(True)
    return parts


def plain_loop(base: Path, data: Path, steps: int, batch_size: int, lr: float) -> dict:
    """warren's training loop before the Trainer: the same stream, AdamW, cosine, clipping."""
    import math

    from transformers import get_cosine_schedule_with_warmup

    parts = _instruct_model(base)
    model = parts.model
    model.train()
    encoder = ConversationEncoder(
        parts.tokenizer,
        "vicuna_v1",
        num_image_tokens=parts.num_image_tokens,
        image_token=parts.image_token,
        max_length=2048,
    )
    options = StreamOptions(
        batch_size=batch_size,
        seed=0,
        shuffle_buffer=1024,
        length_group_batches=16,
        max_bad_share=0.01,
        rank=0,
        world_size=1,
    )
    stream = LlavaStream(
        plan_units(data), encoder, parts.image_processor, parts.tokenizer.pad_token_id, options
    )
    loader = StreamingLoader(stream, num_workers=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    pixel_dtype = next(model.model.vision_tower.parameters()).dtype
    losses: list[float] = []
    norms: list[float] = []
    rates: list[float] = []
    done, tokens, epoch = 0, 0, 0
    start = time.perf_counter()
    while done < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            # As the former loop did each step: the loss over the step's answer tokens, its
            # value read back, the gradient norm, the rate of the step.
            inputs = dict(batch.inputs)
            inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
            out = model(**inputs, num_items_in_batch=batch.num_loss_tokens, use_cache=False)
            out.loss.backward()
            losses.append(float(out.loss.detach()))
            norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, 1.0)))
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch.num_tokens
            done += 1
            if done == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / seconds, "tokens_per_s": tokens / seconds}


def ours(base: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float) -> dict:
    summary = train(
        TrainConfig(
            stage="instruct",
            data=[str(data)],
            output=str(out),
            from_checkpoint=str(base),
            max_steps=steps,
            batch_size=batch_size,
            lr=lr,
            projector_lr=lr,
            num_workers=0,
            log_every=steps,
            device="cpu",
        )
    )
    return {k: summary[k] for k in ("samples_per_s", "tokens_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256, help="rows in the shards")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of tower and LM")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_models(root, args.hidden)
        data = root / "shards"
        write_shards(data, [color_row(i) for i in range(args.rows)], 64, 16)
        loop = plain_loop(base, data, args.steps, args.batch_size, 2e-5)
        mine = ours(base, data, root / "run", args.steps, args.batch_size, 2e-5)
        theirs = hf_trainer(base, data, args.steps, args.batch_size, 2e-5)
    print(
        f"instruct, tiny model (hidden {args.hidden}), CPU, {args.threads} thread(s), "
        f"{args.steps} steps of {args.batch_size}"
    )
    print(f"{'':<28}{'samples/s':>12}{'tokens/s':>12}")
    for name, got in (
        ("warren (Trainer + stream)", mine),
        ("former plain loop", loop),
        ("plain transformers.Trainer", theirs),
    ):
        print(f"{name:<28}{got['samples_per_s']:>12.1f}{got['tokens_per_s']:>12.0f}")
    for name, base_line in (("former loop", loop), ("plain Trainer", theirs)):
        print(
            f"{'warren / ' + name:<28}{mine['samples_per_s'] / base_line['samples_per_s']:>12.2f}"
            f"{mine['tokens_per_s'] / base_line['tokens_per_s']:>12.2f}"
        )


if __name__ == "__main__":
    main()
