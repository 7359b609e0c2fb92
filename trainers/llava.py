"""llava: train a LLaVA model on warren shards, in LLaVA-1.5's two stages.

```
python -m warren.trainers.llava --stage align --data OUT/08-sample \\
    --vision openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 --output runs/align
python -m warren.trainers.llava --stage instruct --data OUT/instruct --from-checkpoint runs/align \\
    --output runs/instruct [--lora]
```

- `align`: the vision tower and the LM are frozen; the projector alone learns, on caption rows
  (template `plain`, lr 1e-3). The output folder holds a Hugging Face checkpoint
  (`LlavaForConditionalGeneration` and its processor) and the projector alone as
  `mm_projector.safetensors` (keys as in the model, `model.multi_modal_projector.*`), which
  `--projector` loads into a model assembled from `--vision` and `--llm`.
- `instruct`: projector and LM learn on conversation rows (template `vicuna_v1`), only the answers
  in the loss; the vision tower learns too with `--unfreeze-vision`. Full fine-tuning (lr 2e-5),
  or LoRA on the LM's linear layers (`--lora`, lr 2e-4; QLoRA with `--qlora`, on CUDA only), with
  the projector trained in full, at `--projector-lr` (2e-5, LLaVA-1.5's) in its own parameter
  group. LoRA is merged into the weights on save by default, so the output loads like any
  checkpoint; with `--no-lora-merge` the output holds the adapter (projector included), whose
  `adapter_config.json` points at the base checkpoint (`--from-checkpoint`, or `OUTPUT/base`,
  saved before training when the model was assembled from parts), and
  `LlavaForConditionalGeneration.from_pretrained(OUTPUT)` loads base and adapter (peft installed).

A model comes from `--from-checkpoint` (any Hugging Face LLaVA checkpoint) or is assembled from
`--vision` and `--llm` (hub ids or local directories; see trainers.model). torch is seeded with
`--seed` before the model is built, so the projector's initial weights are a function of the seed.

Training runs on transformers' `Trainer` (trainers.hf_trainer says why not TRL's SFTTrainer, and
what warren adds): cosine decay after `--warmup-ratio` of linear warmup, gradient clipping,
gradient accumulation with the loss averaged over all answer tokens of the accumulated batches
and all ranks, bf16 autocast on a GPU that has it (frozen weights stored in bf16, trained ones in
fp32), fp32 on the CPU. Every `TrainingArguments` flag passes through as itself, in the Trainer's
spelling, after warren's flags: `--deepspeed ds.json`, `--report_to wandb`,
`--lr_scheduler_type linear`, `--optim adamw_8bit`, `--logging_steps`, `--save_steps`, ... (they
win over warren's equivalents; `--output_dir`, `--max_steps` and `--ignore_data_skip` are
warren's own). It logs steps, loss, learning rate, samples/s and tokens/s every `--log-every`
steps (also to `OUTPUT/metrics.jsonl`); skipped rows go to `OUTPUT/data_problems.jsonl`; the run
ends with a JSON summary (steps, samples, tokens, losses, the data counts of trainers.data),
printed and saved as `OUTPUT/train_summary.json`.

Micro-batches run back to back across epochs, `--grad-accum` to an optimizer step (the last step
of the run may be short); `--epochs` plans ceil(micro-batches / grad-accum) steps.

`--save-every N` writes a resumable checkpoint every N optimizer steps,
`OUTPUT/checkpoints/checkpoint-N/` (the Trainer's: optimizer, scheduler, RNG and its state; the
trained tensors as `trainable.safetensors` when they are part of the model, the adapter for LoRA;
and where each data worker is in the epoch); `--resume` continues from the newest, reading on
from where each data worker stopped (it reads the rows again without decoding their images; an
image whose header opens but whose pixels do not decode, in the part skipped, is then not
counted again).

`train(config)` is the same thing from Python (`TrainConfig.training_args` holds Trainer
settings). `--workers N` runs the same loop on N Ray Train workers (`--use-gpu`, the default when
the cluster has GPUs: one GPU each; DDP, or FSDP with `--fsdp`); see trainers.ray_train and
docs/trainers.md. Each rank reads its own share of the row groups, and all ranks run as many
micro-batches as the rank with the fewest rows (`unused_samples` in the summary counts what the
others had batched beyond it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from warren.trainers.config import (
    CHECKPOINTS,
    FSDP_NEEDS_GPUS,
    PROJECTOR_FILE,
    STAGES,
    TrainConfig,
    build_parser,
    parse_args,
)
from warren.trainers.data import (
    DataStats,
    LlavaStream,
    StreamingLoader,
    StreamOptions,
    check_skipped_share,
    plan_units,
    rank_rows,
)
from warren.trainers.hf_trainer import (
    RUN_STATE,
    LlavaTrainer,
    StepStream,
    WarrenLog,
    link_model_files,
    newest_checkpoint,
    read_data_state,
)
from warren.trainers.model import LlavaParts, build_llava, load_llava
from warren.trainers.ranks import Ranks
from warren.trainers.templates import ConversationEncoder, serving_chat_template

log = logging.getLogger("warren.trainers.llava")
__all__ = ["PROJECTOR_FILE", "TrainConfig", "build_parser", "main", "resolve", "train"]

PROJECTOR = "multi_modal_projector"
PROJECTOR_PREFIX = f"model.{PROJECTOR}."
# Settings a resumed run may change: how it runs, logs and saves. All others decide what is
# trained on what, and must be those of the run it continues.
RESUME_MAY_CHANGE = {
    *("output", "resume", "log_every", "save_every", "keep_checkpoints", "lora_merge"),
    *("device", "workers", "use_gpu", "cpus_per_worker", "max_bad_share", "training_args"),
    "gradient_checkpointing",
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `python -m warren.trainers.llava` with `argv`; print and return the summary."""
    config = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = train(config)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


# --------------------------------------------------------------------------------------------
# Configuration checks and stage defaults
# --------------------------------------------------------------------------------------------


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy of `config` with the stage's defaults filled in; a ValueError names the flag for
    any combination that cannot run."""
    c = dataclasses.replace(config)
    c.data = [
        os.fspath(d) for d in ([c.data] if isinstance(c.data, (str, os.PathLike)) else c.data)
    ]
    if c.stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {c.stage!r}")
    if c.from_checkpoint and (c.vision or c.llm):
        raise ValueError("give --from-checkpoint, or --vision and --llm, not both")
    if not c.from_checkpoint and not (c.vision and c.llm):
        raise ValueError("give --vision and --llm (ids or local directories), or --from-checkpoint")
    if c.projector and c.from_checkpoint:
        raise ValueError(
            "--projector is for a model built from --vision/--llm; a checkpoint has one"
        )
    if c.qlora:
        c.lora = True
    if c.stage == "align":
        bad = [
            f
            for f in ("lora", "unfreeze_vision", "projector_lr")
            if getattr(c, f) not in (None, False)
        ]
        if bad:
            flags = ", ".join("--" + b.replace("_", "-") for b in bad)
            raise ValueError(f"{flags}: instruct only; align trains the projector alone, at --lr")
        c.template = c.template or "plain"
        c.lr = 1e-3 if c.lr is None else c.lr
    else:
        c.template = c.template or "vicuna_v1"
        c.lr = (2e-4 if c.lora else 2e-5) if c.lr is None else c.lr
        c.projector_lr = 2e-5 if c.projector_lr is None else c.projector_lr
    for name in (
        "batch_size",
        "grad_accum",
        "epochs",
        "log_every",
        "max_length",
        "keep_checkpoints",
    ):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if c.max_steps is not None and c.max_steps < 0:
        raise ValueError("--max-steps must not be negative")
    if c.max_tokens is not None and c.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if c.save_every < 0 or c.num_workers < 0 or c.workers < 0:
        raise ValueError("--save-every, --num-workers and --workers must not be negative")
    if c.cpus_per_worker < 0:
        raise ValueError("--cpus-per-worker must not be negative")
    if c.workers == 0 and (c.fsdp or c.use_gpu is not None):
        raise ValueError(
            "--fsdp and --use-gpu/--no-use-gpu are for Ray Train runs: add --workers N"
        )
    if c.fsdp and c.use_gpu is False:
        raise ValueError(FSDP_NEEDS_GPUS)
    if c.fsdp and c.lora:
        raise ValueError(
            "--fsdp shards full-weight training; LoRA trains few weights and runs with DDP: drop "
            "--fsdp (or use --qlora to fit a large base)"
        )
    if c.qlora:
        # With --workers the GPUs are the Ray workers', not necessarily this machine's.
        if c.workers == 0 and not torch.cuda.is_available():
            raise ValueError(
                "--qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has none. "
                "Drop --qlora to train LoRA on a full-precision LM"
            )
        if not c.from_checkpoint:
            raise ValueError("--qlora loads a quantized model from --from-checkpoint; give one")
    return c


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: torch sees no CUDA device")
    return device


def _precision(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return torch.bfloat16 if spec == "bf16" else torch.float32


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _build(c: TrainConfig, dtype: torch.dtype, device: torch.device) -> LlavaParts:
    if c.qlora:
        return _load_4bit(c.from_checkpoint, dtype, device)
    if c.from_checkpoint:
        return load_llava(c.from_checkpoint, dtype=dtype)
    parts = build_llava(c.vision, c.llm, dtype=dtype)
    if c.projector:
        load_projector(parts.model, c.projector)
    elif c.stage == "instruct":
        log.warning(
            "instruct starts from a new, untrained projector: give --projector (an align run's "
            "%s) or --from-checkpoint to start from an aligned one",
            PROJECTOR_FILE,
        )
    return parts


def _carry_template(parts: LlavaParts, c: TrainConfig) -> None:
    """Give the processor (and its tokenizer, which saves the same file) the chat template of
    the training format, so every checkpoint and the final model serve the prompts they learned."""
    template = serving_chat_template(
        c.template, parts.tokenizer, image_token=parts.image_token, system_prompt=c.system_prompt
    )
    parts.processor.chat_template = template
    parts.tokenizer.chat_template = template


def _load_4bit(path: str, dtype: torch.dtype, device: torch.device) -> LlavaParts:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ValueError("--qlora needs bitsandbytes: pip install bitsandbytes") from exc
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # The tower, the projector and the output layer stay in full precision, as in QLoRA.
        llm_int8_skip_modules=["vision_tower", PROJECTOR, "lm_head"],
    )
    return load_llava(
        path, dtype=dtype, quantization_config=quantization, device_map={"": device.index or 0}
    )


def load_projector(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy projector weights from a safetensors file into a LlavaForConditionalGeneration.

    Keys are ours (`model.multi_modal_projector.linear_1.weight`, ...) or original LLaVA's
    (`model.mm_projector.0.weight`, `.2.` for the second layer)."""
    tensors = {_projector_key(k): v for k, v in load_file(os.fspath(path)).items()}
    params = {n: p for n, p in model.named_parameters() if n.startswith(PROJECTOR_PREFIX)}
    if set(tensors) != set(params):
        raise ValueError(
            f"{path}: projector weights {sorted(tensors)} do not match the model's projector "
            f"{sorted(params)}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model's "
                    f"{tuple(param.shape)} (a projector for another vision tower or LM?)"
                )
            param.copy_(tensors[name])


def _projector_key(key: str) -> str:
    m = re.fullmatch(r"(?:model\.)?mm_projector\.([02])\.(weight|bias)", key)
    if m:
        return f"{PROJECTOR_PREFIX}linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    return key


def _prepare(parts: LlavaParts, c: TrainConfig, out: Path, ranks: Ranks) -> torch.nn.Module:
    """Freeze what the stage keeps fixed; for LoRA, return the peft model that wraps
    `parts.model` (whose modules it changes in place)."""
    model = parts.model
    model.requires_grad_(False)
    inner = model.model  # gradient checkpointing: the Trainer turns it on (training_arguments)
    if c.stage == "align":
        inner.multi_modal_projector.requires_grad_(True)
        return model
    if not c.lora:
        inner.multi_modal_projector.requires_grad_(True)
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if c.unfreeze_vision:
            inner.vision_tower.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if c.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=c.gradient_checkpointing
        )
    elif (not c.lora_merge or _merges_from_disk(c)) and not c.from_checkpoint:
        # The adapter needs a base checkpoint to point at; this model exists only in memory.
        if ranks.rank == 0:
            log.info("saving the base model to %s for the adapter to point at", out / "base")
            parts.save_pretrained(out / "base")
        ranks.barrier()
    names = "|".join(re.escape(n) for n in c.lora_target_modules)
    lora = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        # The LM's layers only: the tower and projector have linear layers of the same names.
        target_modules=rf".*\.language_model\..*\.({names})",
        # Trained in full and saved with the adapter, as LLaVA saves its non-LoRA trainables.
        modules_to_save=[PROJECTOR] + (["vision_tower"] if c.unfreeze_vision else []),
    )
    return get_peft_model(model, lora)


def projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors under the model's names (`model.multi_modal_projector.*`); for
    a peft model, those of its trained copy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = base.model.multi_modal_projector
    trained = getattr(module, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    if trained is not None:
        module = trained[getattr(module, "active_adapter", None) or "default"]
        if isinstance(module, list):  # pragma: no cover - peft versions differ
            module = module[0]
    return {
        PROJECTOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


# Called on every rank at the same steps: (metrics, checkpoint folder or None).
Report = typing.Callable[[dict[str, Any], "Path | None"], None]


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as the command line does; return the summary (also saved as
    OUTPUT/train_summary.json): steps, samples, tokens (attended positions, image tokens
    included), first and last step loss, throughput, parameter counts, the files in OUTPUT,
    `data` (trainers.data's counts, over every pass and every rank) and the resolved config.
    With `workers` > 0 the run goes through Ray Train (trainers.ray_train). Raises
    DataProblemError when too many rows are skipped, ValueError for settings that cannot run."""
    c = resolve(config)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise ValueError(
                "train() starts its own training processes (--workers N, through Ray Train); "
                "call it from one process, or call run_loop() from each"
            )
    plan_units(c.data)  # footers only: bad data paths fail before a model loads
    training_arguments(c, max_steps=1)  # bad Trainer flags fail here too
    resume_from = _prepare_output(Path(c.output), c)
    if c.workers > 0:
        from warren.trainers.ray_train import train_on_ray

        return train_on_ray(c, resume_from, run_loop)
    return run_loop(c, resume_from, Ranks())


def training_arguments(c: TrainConfig, *, max_steps: int) -> Any:
    """The `TrainingArguments` of a run: warren's flags as their Trainer equivalents, then the
    user's own Trainer settings (`c.training_args`, `--deepspeed`, `--report_to`, ...) over
    them. Checkpoints go to OUTPUT/checkpoints/checkpoint-N."""
    from transformers import TrainingArguments

    device = _device(c.device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(
            f"--device {c.device}: the Trainer takes the first GPU it sees; choose it with "
            f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    ours: dict[str, Any] = {
        "output_dir": str(Path(c.output) / CHECKPOINTS),
        "per_device_train_batch_size": c.batch_size,
        "gradient_accumulation_steps": c.grad_accum,
        "max_steps": max_steps,
        "learning_rate": c.lr,
        "weight_decay": c.weight_decay,
        "warmup_steps": c.warmup_ratio,  # below 1: a share of the steps
        "lr_scheduler_type": "cosine",
        "max_grad_norm": c.max_grad_norm,
        "logging_steps": c.log_every,
        "logging_first_step": False,
        "save_strategy": "steps" if c.save_every else "no",
        "save_steps": c.save_every or 500,
        "save_total_limit": c.keep_checkpoints,
        "seed": c.seed,
        "bf16": _precision(c.precision, device) == torch.bfloat16,
        **_checkpointing(c.gradient_checkpointing),
        "use_cpu": device.type == "cpu",
        "report_to": "none",
        "remove_unused_columns": False,
        # warren's stream resumes where each data worker was, without decoding what it skips.
        "ignore_data_skip": True,
        "average_tokens_across_devices": True,
        "dataloader_pin_memory": False,  # trainers.data's loader pins, when it should
        "ddp_find_unused_parameters": c.unfreeze_vision,
        "disable_tqdm": True,
    }
    if c.fsdp:
        ours["fsdp"] = "full_shard auto_wrap"
        ours["fsdp_config"] = {"use_orig_params": True}
    given = dict(c.training_args or {})
    overridden = sorted(set(given) & {"output_dir", "max_steps", "ignore_data_skip"})
    if overridden:
        raise ValueError(
            f"{', '.join('--' + k for k in overridden)}: set by warren (OUTPUT/checkpoints, "
            "--max-steps or --epochs, and its own resume of the data); use warren's flags"
        )
    if given.get("deepspeed"):
        given["deepspeed"] = _deepspeed_config(given["deepspeed"])
    try:
        args = TrainingArguments(**{**ours, **given})
    except (TypeError, ValueError, ImportError) as exc:
        raise ValueError(f"Trainer settings: {exc}") from exc
    if args.n_gpu > 1 and args.local_rank == -1:
        # One process uses one GPU, as before the Trainer (whose default would be DataParallel
        # over all of them); several GPUs are Ray Train workers (--workers N), one each.
        args._n_gpu = 1
    return args


def _deepspeed_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """`--deepspeed`'s config, with ZeRO-3's weights gathered on save: the final model is a
    whole checkpoint, which a partitioned model gives only so (LLaVA's zero3.json sets it too)."""
    try:
        config = spec if isinstance(spec, dict) else json.loads(Path(spec).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--deepspeed {spec}: {exc}") from exc
    zero = config.get("zero_optimization") or {}
    gather = "stage3_gather_16bit_weights_on_model_save"
    if zero.get("stage") != 3 or zero.get(gather):
        return config
    if gather in zero:
        raise ValueError(
            f"--deepspeed {spec}: {gather} is false, and warren saves the final model whole, "
            "which ZeRO-3 gives only with it true"
        )
    log.info("--deepspeed: ZeRO-3 with %s on, to save the final model whole", gather)
    return {**config, "zero_optimization": {**zero, gather: True}}


def _checkpointing(on: bool) -> dict[str, Any]:
    """Gradient checkpointing in the spelling of the installed transformers (5.x renamed it)."""
    import dataclasses as dc

    from transformers import TrainingArguments

    names = {f.name for f in dc.fields(TrainingArguments)}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}}


def run_loop(
    c: TrainConfig,
    resume_from: Path | None,
    ranks: Ranks,
    *,
    device: torch.device | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """One training process: rank `ranks.rank` of `ranks.world_size`, with torch.distributed
    already set up when there are more. `c` is resolved and OUTPUT prepared (as train() does);
    `report` is called on every rank at each checkpoint and at the end. Rank 0 writes the logs,
    checkpoints and the final model; every rank returns the summary."""
    out = Path(c.output)
    units = plan_units(c.data)
    device = device or _device(c.device)
    dtype = _precision(c.precision, device)
    lead = ranks.rank == 0

    saved = _read_run_state(resume_from, c, ranks) if resume_from is not None else None
    torch.manual_seed(c.seed)
    parts = _build(c, dtype, device)
    _carry_template(parts, c)
    model = _prepare(parts, c, out, ranks)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            # Trained weights stay in fp32 (bf16 autocast computes in bf16 where it pays).
            p.data = p.data.float()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    encoder = ConversationEncoder(
        parts.tokenizer,
        c.template,
        num_image_tokens=parts.num_image_tokens,
        image_token=parts.image_token,
        max_length=c.max_length,
        system_prompt=c.system_prompt,
    )
    options = StreamOptions(
        batch_size=c.batch_size,
        seed=c.seed,
        shuffle_buffer=c.shuffle_buffer,
        length_group_batches=c.length_group_batches,
        max_bad_share=c.max_bad_share,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    stream = LlavaStream(
        units, encoder, parts.image_processor, parts.tokenizer.pad_token_id, options
    )
    loader = StreamingLoader(
        stream,
        num_workers=c.num_workers,
        pin_memory=device.type == "cuda",
        problems_path=out / _problems_file(ranks),
    )
    planned = planned_batches(units, c, ranks.world_size)
    if c.max_steps is not None:
        total_steps = c.max_steps
        length = max(c.max_steps * c.grad_accum, 1)
    else:
        total_steps = math.ceil(planned / c.grad_accum)
        length = max(planned, 1)
    resumed = read_data_state(resume_from, ranks.rank) if saved is not None else {}
    steps = StepStream(
        loader,
        ranks,
        epochs=None if c.max_steps is not None else c.epochs,
        length=length,
        start_epoch=resumed.get("start_epoch", 0),
        skip=resumed.get("skip"),
        stats_before_epoch=resumed.get("stats_before_epoch"),
    )
    steps.unused = resumed.get("unused", 0)
    # --max-steps 0 saves the assembled model untrained (the Trainer reads 0 as "use epochs").
    args = training_arguments(c, max_steps=max(total_steps, 1))
    progress = {"samples": 0, "tokens": 0, "seconds": 0.0, "first_loss": None, "last_loss": None}
    if saved is not None:
        progress.update({k: saved[k] for k in progress if k in saved})
        _rewind_logs(out, saved["step"], steps.epoch, ranks)
    logger = WarrenLog(steps, ranks, out, progress, dataclasses.asdict(c))
    callbacks: list[Any] = [logger]
    if report is not None:
        from warren.trainers.ray_train import report_callback

        callbacks.append(report_callback(report, logger))
    trainer = LlavaTrainer(
        model=model,
        args=args,
        processing_class=parts.processor,
        stream=steps,
        projector_lr=c.projector_lr,
        callbacks=callbacks,
    )
    logger.trainer = trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # warren logs each step itself (and prints only the summary on stdout).
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if report is not None:
        from ray.train.huggingface.transformers import prepare_trainer

        trainer = prepare_trainer(trainer)
    if lead:
        where = f", resuming from {resume_from}" if resume_from is not None else ""
        log.info(
            "stage %s on %s x%d: %s of %s parameters trained; %d rows; %d steps%s",
            c.stage, device.type, ranks.world_size, f"{n_trainable:,}", f"{n_total:,}",
            stream.total_rows, total_steps, where,
        )  # fmt: skip
    if total_steps > 0:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    engine = trainer.model_wrapped
    if c.max_steps is None:
        steps.finish()  # to the end of the last epoch: what other ranks hold there is unused
    else:
        # Batched but never stepped on (a short last group of a --max-steps run).
        steps.unused += sum(s for s, _ in steps.pending)
    check_skipped_share(loader.stats, c.max_bad_share, f"training data{_where(ranks)}: ")
    saved_at = newest_checkpoint(out)
    step_name = f"checkpoint-{trainer.state.global_step}"
    if report is not None and (saved_at is None or saved_at.name != step_name):
        # A Ray Train run ends on a checkpoint, which Result.checkpoint points at.
        # (Reported with the summary, below: Ray's Result holds the last report's checkpoint.)
        trainer._save_checkpoint(engine, trial=None)
        logger.on_save(args, trainer.state, trainer.control)
        saved_at = newest_checkpoint(out)
    # DDP keeps the replicas equal by construction; the digests show it (FSDP holds shards).
    replicas = (
        ranks.gather(_sha256(_trainable_state(trainer.accelerator.unwrap_model(engine))))
        if ranks.distributed and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
        else None
    )
    files = _save_final(parts, trainer, c, out, dtype, ranks)
    data = DataStats()
    for stats in ranks.gather(loader.stats):
        data.add(stats)
    (unused,) = ranks.sum([steps.unused])
    seconds = progress["seconds"]
    summary = {
        "stage": c.stage,
        "output": str(out),
        "steps": trainer.state.global_step,
        "epochs_completed": steps.epoch,
        "samples": progress["samples"],
        "unused_samples": int(unused),
        "tokens": progress["tokens"],
        "first_loss": progress["first_loss"],
        "last_loss": progress["last_loss"],
        "train_seconds": round(seconds, 3),
        "samples_per_s": round(progress["samples"] / seconds, 3) if seconds else None,
        "tokens_per_s": round(progress["tokens"] / seconds, 3) if seconds else None,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "device": str(args.device),
        "world_size": ranks.world_size,
        "parallelism": "deepspeed"
        if trainer.is_deepspeed_enabled
        else ("fsdp" if trainer.is_fsdp_enabled else ("ddp" if ranks.distributed else None)),
        "dtype": str(dtype).removeprefix("torch."),
        "lora": c.lora,
        "lora_merged": c.lora and c.lora_merge,
        "files": files,
        "data": data.to_dict(),
        "config": dataclasses.asdict(c),
    }
    if c.max_tokens is not None:
        summary["max_tokens_reached"] = progress["tokens"] >= c.max_tokens
    if replicas is not None:
        summary["replica_sha256"] = replicas
    if saved_at is not None:
        summary["checkpoint"] = str(saved_at)
    if lead:
        if saved_at is not None and report is not None:
            link_model_files(out, saved_at)
        (out / "train_summary.json").write_text(
            json.dumps(summary, indent=2, sort_keys=True, default=str)
        )
        log.info(
            "done: %d steps, %d samples (%d batched but unused to keep ranks in step), "
            "loss %s -> %s; data: %s",
            summary["steps"],
            summary["samples"],
            int(unused),
            _fmt(progress["first_loss"]),
            _fmt(progress["last_loss"]),
            data.summary(),
        )
    ranks.barrier()  # the checkpoint is whole before any rank reports it
    if report is not None:
        report({"summary": json.dumps(summary, sort_keys=True, default=str)}, saved_at)
    return summary


def _where(ranks: Ranks) -> str:
    return f" (rank {ranks.rank})" if ranks.distributed else ""


def _problems_file(ranks: Ranks) -> str:
    # One file per rank: ranks may run on different machines over a shared OUTPUT.
    return f"data_problems.rank{ranks.rank}.jsonl" if ranks.distributed else "data_problems.jsonl"


def planned_batches(units: Sequence[Any], c: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches every rank runs over `c.epochs` epochs, from the deterministic plan: each
    epoch, as many as the rank with the fewest rows has. The Trainer's schedule is
    ceil(this / grad_accum) steps; rows that are skipped make the real run a little shorter."""
    total = 0
    for epoch in range(c.epochs):
        fewest = min(
            rank_rows(units, seed=c.seed, epoch=epoch, rank=r, world_size=world_size)
            for r in range(world_size)
        )
        total += math.ceil(fewest / c.batch_size)
    return total


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------
# Output folder, checkpoints, final save
# --------------------------------------------------------------------------------------------


def _prepare_output(out: Path, c: TrainConfig) -> Path | None:
    """Create OUTPUT; the newest checkpoint when resuming. A folder with an earlier run's
    checkpoints or summary is only continued with --resume, never overwritten."""
    if c.resume:
        newest = newest_checkpoint(out)
        if newest is None:
            raise ValueError(f"--resume: no checkpoints in {out / CHECKPOINTS}")
        return newest
    earlier = [p for p in (out / CHECKPOINTS, out / "train_summary.json") if p.exists()]
    if earlier:
        raise ValueError(
            f"{out} holds an earlier run ({earlier[0].name}); pass --resume to continue it or "
            "give another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "data_problems.jsonl"):
        (out / name).unlink(missing_ok=True)
    return None


def _rewind_logs(out: Path, step: int, epoch: int, ranks: Ranks) -> None:
    """Drop what an interrupted run logged after the checkpoint it resumes from: metrics of later
    steps, and skipped rows of the epoch it is in (which is read again, and logs them again).
    Each rank rewinds its own problems file; rank 0 the metrics."""
    files: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
        (_problems_file(ranks), lambda r: r["epoch"] < epoch)
    ]
    if ranks.rank == 0:
        files.append(("metrics.jsonl", lambda r: r["step"] <= step))
    for name, keep in files:
        path = out / name
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and keep(json.loads(line))]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _read_run_state(path: Path, c: TrainConfig, ranks: Ranks) -> dict[str, Any]:
    """The run state `path` holds; a ValueError when it was written with settings this run
    cannot continue."""
    state_file = path / RUN_STATE
    if not state_file.exists():
        raise ValueError(f"{path}: not a checkpoint of warren train (no {RUN_STATE})")
    state = json.loads(state_file.read_text())
    saved = state["config"]
    now = dataclasses.asdict(c)
    defaults = dataclasses.asdict(TrainConfig(stage="align", data=[], output=""))
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k, defaults[k]) != now[k]]
    if changed:
        diffs = "; ".join(
            f"{k}: {saved.get(k, defaults[k])!r} then, {now.get(k)!r} now" for k in changed
        )
        raise ValueError(f"{path}: the run to resume had other settings ({diffs})")
    world = state.get("world_size", 1)
    if world != ranks.world_size:
        raise ValueError(
            f"{path}: written by {world} training process(es), resumed with {ranks.world_size}; "
            f"resume with --workers {world if world > 1 else 0} (each rank is partway through "
            "its own share of the epoch)"
        )
    return state


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_final(
    parts: LlavaParts,
    trainer: Any,
    c: TrainConfig,
    out: Path,
    dtype: torch.dtype,
    ranks: Ranks,
) -> list[str]:
    """Write the trained model to OUTPUT (rank 0; every rank calls it, for the gathers of a
    sharded model); return the names of what OUTPUT then holds."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    # A collective for a sharded model: every rank takes part, rank 0 gets the whole state.
    full = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if ranks.rank == 0:
        if _merges_from_disk(c):
            _save_adapter(parts, model, c, out, dtype, full)
        elif full is not None:
            parts.model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in full.items()})
            parts.processor.save_pretrained(out)
            projector = {k: v for k, v in full.items() if k.startswith(PROJECTOR_PREFIX)}
            save_file(projector, str(out / PROJECTOR_FILE))
        else:
            save_file(projector_state(model), str(out / PROJECTOR_FILE))
            if c.lora and c.lora_merge:
                parts.model = model.merge_and_unload()
            if c.lora and not c.lora_merge:
                model.peft_config["default"].base_model_name_or_path = _lora_base(c, out)
                model.save_pretrained(out)
                parts.processor.save_pretrained(out)
            else:
                parts.model.to(dtype)
                parts.save_pretrained(out)
    ranks.barrier()
    return sorted(os.listdir(out))


def _lora_base(c: TrainConfig, out: Path) -> str:
    """The base checkpoint an adapter points at: --from-checkpoint, or the assembled model that
    _prepare saved to OUTPUT/base."""
    return os.path.abspath(c.from_checkpoint or out / "base")


def _merges_from_disk(c: TrainConfig) -> bool:
    """LoRA whose adapter is merged onto the base read back from disk, not in memory: a 4-bit
    base (merging into it would round the update away) or DeepSpeed's (its weights are
    partitioned, or held by the engine)."""
    return c.lora and (c.qlora or bool((c.training_args or {}).get("deepspeed")))


def _save_adapter(
    parts: LlavaParts,
    model: torch.nn.Module,
    c: TrainConfig,
    out: Path,
    dtype: torch.dtype,
    state_dict: dict[str, torch.Tensor] | None,
) -> None:
    """Save the adapter (from `state_dict`, the gathered state of a sharded model, when given),
    load it onto the base in `dtype` on the CPU for the projector, and merge it there unless
    --no-lora-merge."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = _lora_base(c, out)
    adapter = out / ("adapter" if c.lora_merge else ".")
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(adapter, state_dict=state_dict)
    parts.processor.save_pretrained(out)
    # The projector as trained (fp32), not as the base's dtype would round it on reloading.
    marker = f".{PROJECTOR}.modules_to_save.default."
    projector = (
        {
            PROJECTOR_PREFIX + k.split(marker, 1)[1]: v.detach().cpu().contiguous()
            for k, v in state_dict.items()
            if marker in k
        }
        if state_dict is not None
        else projector_state(model)
    )
    loaded = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base, dtype=dtype), adapter
    )
    save_file(projector or projector_state(loaded), str(out / PROJECTOR_FILE))
    if c.lora_merge:
        loaded.merge_and_unload().save_pretrained(out)
        if not c.from_checkpoint:
            # Saved only for this merge: the output is whole, and an adapter pointing at a base
            # that is gone would only mislead.
            shutil.rmtree(out / "base")
            shutil.rmtree(adapter)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as exc:  # bad flags, data or models: a message, no traceback
        sys.exit(f"error: {exc}")
