"""config: what a training run takes (TrainConfig) and its command line, one flag per field.

`python -m warren.trainers.llava` and `warren train` parse their flags with `build_parser`;
trainers.llava runs the loop, trainers.ray_train runs it on Ray Train workers. Both import the
settings from here, so neither imports the other's module for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from warren.trainers.templates import TEMPLATES

STAGES = ("align", "instruct")
PROJECTOR_FILE = "mm_projector.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTS = "checkpoints"
# accelerate builds FSDP on GPUs only: on CPUs the Trainer would replicate the model (DDP)
# without a word, so --fsdp there is refused.
FSDP_NEEDS_GPUS = (
    "--fsdp shards over GPU workers only (accelerate replicates the model on CPUs instead): "
    "drop --fsdp to train replicas (DDP) on CPU workers"
)


def _opt(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help, **{k: kw.pop(k) for k in ("choices",) if k in kw}}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run takes; the command-line flags are generated from these fields
    (`--from-checkpoint` for `from_checkpoint`). None means the stage's default."""

    stage: str = _opt("align (projector only) or instruct (projector + LM)", choices=STAGES)
    data: list[str] = _opt("Parquet shards: stage folders and/or files")
    output: str = _opt("folder for the checkpoint, logs and summary")
    vision: str | None = _opt(
        "vision tower: hub id or local directory (CLIP, SigLIP)", default=None
    )
    llm: str | None = _opt("causal LM: hub id or local directory", default=None)
    from_checkpoint: str | None = _opt(
        "a Hugging Face LLaVA checkpoint to continue from, instead of --vision/--llm", default=None
    )
    projector: str | None = _opt(
        f"projector weights ({PROJECTOR_FILE} of an align run) for a model built from parts",
        default=None,
    )
    template: str | None = _opt(
        "conversation template (default: plain for align, vicuna_v1 for instruct)",
        default=None,
        choices=TEMPLATES,
    )
    system_prompt: str | None = _opt("vicuna_v1's system prompt, replacing LLaVA's", default=None)
    max_length: int = _opt(
        "tokens per sample, image tokens included; longer ones are cut", default=2048
    )
    batch_size: int = _opt("samples per micro-batch", default=16)
    grad_accum: int = _opt("micro-batches per optimizer step", default=1)
    epochs: int = _opt("passes over the data (unless --max-steps)", default=1)
    max_steps: int | None = _opt("optimizer steps to run, across epochs", default=None)
    max_tokens: int | None = _opt(
        "stop after the step that reaches this many tokens, all ranks, image tokens included "
        "(the schedule is still planned over --max-steps or --epochs)",
        default=None,
    )
    lr: float | None = _opt(
        "learning rate (default: 1e-3 align, 2e-4 instruct LoRA, 2e-5 instruct)", default=None
    )
    projector_lr: float | None = _opt(
        "instruct: the projector's learning rate (default 2e-5)", default=None
    )
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
    warmup_ratio: float = _opt("share of steps of linear warmup before cosine decay", default=0.03)
    max_grad_norm: float = _opt("clip the gradient norm to this (0: no clipping)", default=1.0)
    lora: bool = _opt(
        "instruct: train LoRA adapters on the LM instead of all its weights", default=False
    )
    lora_r: int = _opt("LoRA rank", default=128)
    lora_alpha: int = _opt("LoRA alpha", default=256)
    lora_dropout: float = _opt("LoRA dropout", default=0.05)
    lora_target_modules: list[str] = _opt(
        "names of the LM's linear layers that get adapters",
        default_factory=lambda: list(LORA_TARGETS),
    )
    lora_merge: bool = _opt(
        "merge LoRA into the saved weights (else save the adapter)", default=True
    )
    qlora: bool = _opt(
        "LoRA on a 4-bit LM (bitsandbytes; CUDA only; needs --from-checkpoint)", default=False
    )
    unfreeze_vision: bool = _opt("instruct: train the vision tower too", default=False)
    gradient_checkpointing: bool = _opt(
        "recompute activations in backward to save memory", default=False
    )
    precision: str = _opt(
        "auto: bf16 autocast on CUDA, fp32 elsewhere",
        default="auto",
        choices=("auto", "fp32", "bf16"),
    )
    device: str = _opt("auto, cpu, cuda or cuda:N", default="auto")
    seed: int = _opt("seeds the model's new weights and the data order", default=0)
    num_workers: int = _opt("data-loader worker processes", default=2)
    shuffle_buffer: int = _opt("samples mixed per data worker", default=1024)
    length_group_batches: int = _opt(
        "batches per length-sorting window (1: no grouping)", default=16
    )
    max_bad_share: float = _opt("fail when more than this share of rows is skipped", default=0.01)
    log_every: int = _opt("log every N optimizer steps", default=10)
    save_every: int = _opt(
        "write a resumable checkpoint every N steps (0: at the end only)", default=0
    )
    keep_checkpoints: int = _opt("resumable checkpoints kept (the newest)", default=2)
    resume: bool = _opt(
        f"continue from the newest OUTPUT/{CHECKPOINTS}/checkpoint-N", default=False
    )
    workers: int = _opt(
        "Ray Train workers (one process per GPU); 0: train in this process", default=0
    )
    use_gpu: bool | None = _opt(
        "Ray Train workers take a GPU each (default: when the Ray cluster has GPUs)", default=None
    )
    fsdp: bool = _opt(
        "shard weights, gradients and optimizer state over the Ray Train GPU workers (FSDP) "
        "instead of keeping a replica on each (DDP); for models that do not fit on one GPU",
        default=False,
    )
    cpus_per_worker: float = _opt("CPUs each Ray Train worker asks for", default=1.0)
    training_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "transformers TrainingArguments settings, over warren's", "flag": False},
    )


def build_parser(prog: str = "python -m warren.trainers.llava") -> argparse.ArgumentParser:
    """The flags of TrainConfig, one per field, with its default and help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a LLaVA model on warren shards: align (projector) or instruct.",
        epilog="Any transformers TrainingArguments flag, in its own spelling, may follow "
        "warren's (--deepspeed ds.json, --report_to wandb, --lr_scheduler_type linear, "
        "--optim ..., --logging_steps N, ...); it wins over warren's equivalent.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.metadata.get("flag") is False:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            None
            if required
            else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        )
        kw: dict[str, Any] = {"help": f.metadata.get("help"), "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        args = typing.get_args(kind)
        if kind is bool or set(args) == {bool, type(None)}:  # bool | None: None means auto
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        if typing.get_origin(kind) is list:
            kw.update(nargs="+", type=args[0])
        else:
            kw["type"] = next((a for a in args if a is not type(None)), kind)
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
            if default is not None and default is not False:
                kw["help"] = f"{kw['help']} (default: {default})"
        parser.add_argument(flag, **kw)
    return parser


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> TrainConfig:
    """warren's flags, and after them any `TrainingArguments` flag in the Trainer's own spelling
    (`--deepspeed ds.json --report_to wandb ...`), which go to `training_args`."""
    parser = build_parser(prog) if prog else build_parser()
    args, rest = parser.parse_known_args(argv)
    config = TrainConfig(**vars(args))
    config.training_args = trainer_flags(rest, parser)
    return config


def trainer_flags(argv: Sequence[str], ours: argparse.ArgumentParser) -> dict[str, Any]:
    """The TrainingArguments settings that `argv` gives, and only those (a flag not given keeps
    warren's value); an unknown flag is an error naming it."""
    if not argv:
        return {}
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments, add_help=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    given, unknown = parser.parse_known_args(list(argv))
    if unknown:
        ours.error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(given)


__all__ = [
    "CHECKPOINTS",
    "LORA_TARGETS",
    "PROJECTOR_FILE",
    "STAGES",
    "TrainConfig",
    "build_parser",
    "parse_args",
]
