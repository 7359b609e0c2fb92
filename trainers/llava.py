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

The loop is one plain PyTorch loop (AdamW, warmup then cosine decay, gradient clipping, gradient
accumulation with the loss averaged over all answer tokens of the accumulated batches), on CUDA
with bf16 autocast when there is a GPU (frozen weights stored in bf16, trained ones in fp32), else
on the CPU in fp32. It logs steps, loss, learning rate, samples/s and tokens/s every `--log-every`
steps (also to `OUTPUT/metrics.jsonl`); skipped rows go to `OUTPUT/data_problems.jsonl`; the run
ends with a JSON summary (steps, samples, tokens, losses, the data counts of trainers.data), printed
and saved as `OUTPUT/train_summary.json`.

`--save-every N` writes a resumable checkpoint every N optimizer steps under
`OUTPUT/checkpoints/step-NNNNNNNN/` (the trained tensors, optimizer, scheduler, RNG, and where each
data worker is in the epoch); `--resume` continues from the newest, reading on from where each
data worker stopped (it reads the rows again without decoding their images; an image whose header
opens but whose pixels do not decode, in the part skipped, is then not counted again).

`train(config)` is the same thing from Python. `--workers N` runs the same loop on N Ray Train
workers (`--use-gpu`, the default when the cluster has GPUs: one GPU each; DDP, or FSDP with
`--fsdp`); see trainers.ray_train and docs/trainers.md. Each rank reads its own share of the row
groups, and all ranks run the step count of the rank with the fewest rows (`unused_samples` in
the summary counts what the others had batched beyond it).
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
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from warren.trainers.config import (
    CHECKPOINTS,
    PROJECTOR_FILE,
    STAGES,
    TrainConfig,
    build_parser,
)
from warren.trainers.data import (
    Batch,
    DataStats,
    LlavaStream,
    StreamingLoader,
    StreamOptions,
    check_skipped_share,
    plan_units,
    rank_rows,
)
from warren.trainers.model import LlavaParts, _num_image_tokens, build_llava, load_llava
from warren.trainers.ranks import Ranks
from warren.trainers.templates import ConversationEncoder, serving_chat_template

log = logging.getLogger("warren.trainers.llava")

PROJECTOR = "multi_modal_projector"
PROJECTOR_PREFIX = f"model.{PROJECTOR}."
# Settings a resumed run must share with the run it continues (the rest, e.g. logging, may change).
RESUME_MUST_MATCH = (
    "stage",
    "data",
    "vision",
    "llm",
    "from_checkpoint",
    "projector",
    "template",
    "system_prompt",
    "max_length",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "lr",
    "projector_lr",
    "weight_decay",
    "warmup_ratio",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "qlora",
    "unfreeze_vision",
    "seed",
    "num_workers",
    "shuffle_buffer",
    "length_group_batches",
)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `python -m warren.trainers.llava` with `argv`; print and return the summary."""
    config = TrainConfig(**vars(build_parser().parse_args(argv)))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = train(config)
    print(json.dumps(summary, indent=2, sort_keys=True))
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
    if c.save_every < 0 or c.num_workers < 0 or c.workers < 0:
        raise ValueError("--save-every, --num-workers and --workers must not be negative")
    if c.cpus_per_worker < 0:
        raise ValueError("--cpus-per-worker must not be negative")
    if c.workers == 0 and (c.fsdp or c.use_gpu is not None):
        raise ValueError(
            "--fsdp and --use-gpu/--no-use-gpu are for Ray Train runs: add --workers N"
        )
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
    except ImportError as exc:
        raise ValueError("--qlora needs bitsandbytes: pip install bitsandbytes") from exc
    from transformers import AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # The tower, the projector and the output layer stay in full precision, as in QLoRA.
        llm_int8_skip_modules=["vision_tower", PROJECTOR, "lm_head"],
    )
    model = LlavaForConditionalGeneration.from_pretrained(
        path,
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": device.index or 0},
    )
    processor = AutoProcessor.from_pretrained(path)
    strategy = model.config.vision_feature_select_strategy
    return LlavaParts(model, processor, _num_image_tokens(model.config.vision_config, strategy))


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
    inner = model.model
    if c.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5 names it so
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
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
    elif not c.lora_merge and not c.from_checkpoint:
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


def _param_groups(model: torch.nn.Module, c: TrainConfig) -> list[dict[str, Any]]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    projector = [p for n, p in trainable if f".{PROJECTOR}." in f".{n}"]
    rest = [p for n, p in trainable if f".{PROJECTOR}." not in f".{n}"]
    groups = [
        {"name": "model", "params": rest, "lr": c.lr},
        {
            "name": "projector",
            "params": projector,
            "lr": c.lr if c.projector_lr is None else c.projector_lr,
        },
    ]
    return [g for g in groups if g["params"]]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors under the model's names (`model.multi_modal_projector.*`); for
    a peft model, those of its trained copy."""
    module = _unwrap(model).model.multi_modal_projector
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


@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # {worker: batches consumed}
    stats_before_epoch: DataStats = field(default_factory=DataStats)
    samples: int = 0  # trained on, all ranks
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    unused_samples: int = 0  # this rank's samples batched but not trained on (see _steps)


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
    resume_from = _prepare_output(Path(c.output), c)
    if c.workers > 0:
        from warren.trainers.ray_train import train_on_ray

        return train_on_ray(c, resume_from, run_loop)
    return run_loop(c, resume_from, Ranks())


def run_loop(
    c: TrainConfig,
    resume_from: Path | None,
    ranks: Ranks,
    *,
    device: torch.device | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """The training loop of one process: rank `ranks.rank` of `ranks.world_size`, with
    torch.distributed already set up when there are more. `c` is resolved and OUTPUT prepared
    (as train() does); `report` is called on every rank at each log line and checkpoint. Rank 0
    writes the logs, checkpoints and the final model; every rank returns the summary."""
    out = Path(c.output)
    units = plan_units(c.data)
    device = device or _device(c.device)
    dtype = _precision(c.precision, device)
    lead = ranks.rank == 0

    torch.manual_seed(c.seed)
    parts = _build(c, dtype, device)
    _carry_template(parts, c)
    model = _prepare(parts, c, out, ranks)
    if not c.qlora:
        model.to(device)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            # Trained weights stay in fp32 (bf16 autocast computes in bf16 where it pays).
            p.data = p.data.float()
    saved = _read_checkpoint(resume_from, c, ranks) if resume_from is not None else None
    if saved is not None:
        _load_trainable(model, saved.tensors, resume_from)
    pixel_dtype = next(_unwrap(model).model.vision_tower.parameters()).dtype
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    # Replicas must start equal (DDP broadcasts rank 0's weights; FSDP shards them), then each
    # rank draws its own dropout.
    engine = _distribute(model, c, device, ranks)
    if ranks.distributed:
        torch.manual_seed(c.seed + ranks.rank)
    trainable = [p for p in engine.parameters() if p.requires_grad]
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
    total_steps = c.max_steps if c.max_steps is not None else _planned_steps(stream, c)
    optimizer = torch.optim.AdamW(_param_groups(engine, c), weight_decay=c.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(c.warmup_ratio * total_steps), max(total_steps, 1)
    )
    progress = _Progress()
    if saved is not None:
        _load_optimizer(saved, engine, optimizer, scheduler)
        progress = saved.progress
        loader.stats = progress.stats_before_epoch.copy()
        _rewind_logs(out, progress, ranks)
        if lead:
            log.info(
                "resuming from %s (step %d, epoch %d)", resume_from, progress.step, progress.epoch
            )
    if lead:
        log.info(
            "stage %s on %s x%d (%s%s): %s of %s parameters trained; %d rows in %d row groups; "
            "%d steps",
            c.stage,
            device.type,
            ranks.world_size,
            str(dtype).removeprefix("torch."),
            ", FSDP" if _uses_fsdp(c, ranks) else (", DDP" if ranks.distributed else ""),
            f"{n_trainable:,}",
            f"{n_total:,}",
            stream.total_rows,
            len(stream.units),
            total_steps,
        )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else nullcontext()
    )
    engine.train()
    window = _Window()
    last_loss: float | None = None
    saved_at: Path | None = None
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if lead else None
    try:
        # Throughput is wall time from step to step, waiting for data included.
        tick = time.perf_counter()
        for micro in _steps(loader, progress, c, ranks):
            # Every answer token of the step weighs the same, on whichever rank it is: each
            # micro-batch's loss is summed over its answer tokens and divided by those of the
            # whole step, all ranks together; DDP/FSDP average gradients over ranks, so the loss
            # is scaled back up by the world size.
            n_loss, samples, tokens = ranks.sum(
                [
                    sum(b.num_loss_tokens for b in micro),
                    sum(len(b.ids) for b in micro),
                    sum(b.num_tokens for b in micro),
                ]
            )
            loss_sum = 0.0
            for i, b in enumerate(micro):
                inputs = {k: v.to(device, non_blocking=True) for k, v in b.inputs.items()}
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
                # Gradients are exchanged once per step, on its last micro-batch.
                sync = i == len(micro) - 1 or not ranks.distributed
                with nullcontext() if sync else engine.no_sync():
                    with autocast:
                        outputs = engine(**inputs, num_items_in_batch=int(n_loss), use_cache=False)
                    (outputs.loss * ranks.world_size).backward()
                loss_sum += float(outputs.loss.detach())
            grad_norm = _clip(engine, trainable, c, ranks)
            lr = scheduler.get_last_lr()[0]  # the rate this step used (the first group's)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            (loss_sum,) = ranks.sum([loss_sum])  # the step's loss over all ranks' answer tokens
            progress.step += 1
            progress.samples += int(samples)
            progress.tokens += int(tokens)
            now = time.perf_counter()
            elapsed, tick = now - tick, now
            progress.seconds += elapsed
            if progress.first_loss is None:
                progress.first_loss = loss_sum
            last_loss = loss_sum
            window.add(loss_sum, int(samples), int(tokens), elapsed, grad_norm)
            record = None
            if progress.step % c.log_every == 0 or progress.step == total_steps:
                record = window.flush(progress, lr, total_steps, lead)
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
            saved_at = None
            if c.save_every and progress.step % c.save_every == 0:
                saved_at = _save_checkpoint(out, progress, engine, optimizer, scheduler, c, ranks)
            if report is not None and (record is not None or saved_at is not None):
                report(record or {"step": progress.step, "epoch": progress.epoch}, saved_at)
    finally:
        if metrics is not None:
            metrics.close()
    check_skipped_share(loader.stats, c.max_bad_share, f"training data{_where(ranks)}: ")
    if report is not None and saved_at is None:
        # A Ray Train run ends on a checkpoint, which Result.checkpoint points at.
        saved_at = _save_checkpoint(out, progress, engine, optimizer, scheduler, c, ranks)
    # DDP keeps the replicas equal by construction; the digests show it (FSDP holds shards).
    replicas = (
        ranks.gather(_sha256(_trainable_state(_unwrap_ddp(engine))))
        if ranks.distributed and not _uses_fsdp(c, ranks)
        else None
    )
    files = _save_final(parts, model, engine, c, out, dtype, ranks)
    data = DataStats()
    for stats in ranks.gather(loader.stats):
        data.add(stats)
    (unused,) = ranks.sum([progress.unused_samples])
    summary = {
        "stage": c.stage,
        "output": str(out),
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "samples": progress.samples,
        "unused_samples": int(unused),
        "tokens": progress.tokens,
        "first_loss": progress.first_loss,
        "last_loss": last_loss,
        "train_seconds": round(progress.seconds, 3),
        "samples_per_s": round(progress.samples / progress.seconds, 3)
        if progress.seconds
        else None,
        "tokens_per_s": round(progress.tokens / progress.seconds, 3) if progress.seconds else None,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "device": str(device),
        "world_size": ranks.world_size,
        "parallelism": "fsdp" if _uses_fsdp(c, ranks) else ("ddp" if ranks.distributed else None),
        "dtype": str(dtype).removeprefix("torch."),
        "lora": c.lora,
        "lora_merged": c.lora and c.lora_merge,
        "files": files,
        "data": data.to_dict(),
        "config": dataclasses.asdict(c),
    }
    if replicas is not None:
        summary["replica_sha256"] = replicas
    if saved_at is not None:
        summary["checkpoint"] = str(saved_at)
    if lead:
        if saved_at is not None and report is not None:
            _link_model_files(out, saved_at)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        log.info(
            "done: %d steps, %d samples (%d batched but unused to keep ranks in step), "
            "loss %s -> %s; data: %s",
            progress.step,
            progress.samples,
            int(unused),
            _fmt(progress.first_loss),
            _fmt(last_loss),
            data.summary(),
        )
    ranks.barrier()  # the checkpoint is whole before any rank reports it
    if report is not None:
        report({"summary": json.dumps(summary, sort_keys=True)}, saved_at)
    return summary


def _where(ranks: Ranks) -> str:
    return f" (rank {ranks.rank})" if ranks.distributed else ""


def _problems_file(ranks: Ranks) -> str:
    # One file per rank: ranks may run on different machines over a shared OUTPUT.
    return f"data_problems.rank{ranks.rank}.jsonl" if ranks.distributed else "data_problems.jsonl"


def _uses_fsdp(c: TrainConfig, ranks: Ranks) -> bool:
    return c.fsdp and ranks.distributed


def _distribute(
    model: torch.nn.Module, c: TrainConfig, device: torch.device, ranks: Ranks
) -> torch.nn.Module:
    """The module the loop calls: `model` itself on one process, else wrapped in DDP (a
    replica per rank) or, with --fsdp, FSDP (each rank holds a shard of every layer)."""
    if not ranks.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    if not c.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=ids,
            # Layers after the tower's feature layer get no gradient when the tower is trained.
            find_unused_parameters=c.unfreeze_vision,
        )
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # One FSDP unit per transformer layer (the classes transformers keeps whole on a device).
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy(layers) if layers else None,
        # Frozen and trained weights share units (the tower is frozen, the projector is not).
        use_orig_params=True,
        device_id=device,  # named even for the CPU, which FSDP otherwise refuses
    )


def _clip(
    engine: torch.nn.Module, trainable: list[torch.nn.Parameter], c: TrainConfig, ranks: Ranks
) -> float | None:
    if c.max_grad_norm <= 0:
        return None
    if _uses_fsdp(c, ranks):
        return float(engine.clip_grad_norm_(c.max_grad_norm))  # the norm over all shards
    return float(torch.nn.utils.clip_grad_norm_(trainable, c.max_grad_norm))


def _steps(
    loader: StreamingLoader, progress: _Progress, c: TrainConfig, ranks: Ranks
) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step, epoch after epoch, until `epochs` epochs or
    `max_steps` steps; `progress.epoch` counts finished epochs.

    Ranks run the same number of micro-batches in every step, the fewest any rank has, and the
    epoch ends when one rank has none left: ranks read different numbers of rows (row groups
    differ in size, rows are skipped), and each forward and backward of DDP or FSDP waits for
    every rank. What the other ranks batched beyond that is read to the end (so its rows are
    counted) and added to `progress.unused_samples`."""
    skip = progress.positions
    while _more_epochs(progress, c):
        loader.set_epoch(progress.epoch, skip)
        resumed = bool(skip)
        skip = {}
        progress.stats_before_epoch = loader.stats.copy()
        batches = iter(loader)
        carried: list[Batch] = []
        steps = 0
        while c.max_steps is None or progress.step < c.max_steps:
            micro = carried + list(islice(batches, c.grad_accum - len(carried)))
            n = ranks.min(len(micro))
            micro, carried = micro[:n], micro[n:]
            if not micro:
                break
            steps += 1
            progress.positions = dict(loader.positions)
            for b in carried:  # batched, not yet trained on: a resumed run reads them again
                progress.positions[b.worker] = min(progress.positions[b.worker], b.index)
            yield micro
        else:
            return  # max_steps reached inside the epoch
        progress.unused_samples += sum(len(b.ids) for b in carried)
        progress.unused_samples += sum(len(b.ids) for b in batches)
        if not steps and not resumed:
            raise ValueError(
                f"epoch {progress.epoch} gave no optimizer steps{_where(ranks)}: "
                f"{loader.epoch_stats.summary()}"
            )
        progress.epoch += 1
        progress.positions = {}


def _more_epochs(progress: _Progress, c: TrainConfig) -> bool:
    if c.max_steps is not None:
        return progress.step < c.max_steps
    return progress.epoch < c.epochs


def planned_steps(
    units: Sequence[Any], c: TrainConfig, world_size: int = 1, epochs: int | None = None
) -> int:
    """Optimizer steps for `epochs` (default: `c.epochs`) epochs over `world_size` ranks, from
    the deterministic plan: every rank runs as many as the rank with the fewest rows. The
    cosine schedule's length; rows that are skipped make the real run a little shorter."""
    steps = 0
    for epoch in range(c.epochs if epochs is None else epochs):
        fewest = min(
            rank_rows(units, seed=c.seed, epoch=epoch, rank=r, world_size=world_size)
            for r in range(world_size)
        )
        steps += math.ceil(math.ceil(fewest / c.batch_size) / c.grad_accum)
    return steps


def _planned_steps(stream: LlavaStream, c: TrainConfig) -> int:
    return planned_steps(stream.units, c, stream.options.world_size)


class _Window:
    """Sums since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.samples, self.tokens, self.seconds = 0, 0.0, 0, 0, 0.0
        self.grad_norm: float | None = None

    def add(self, loss: float, samples: int, tokens: int, seconds: float, norm: float | None):
        self.steps += 1
        self.loss += loss
        self.samples += samples
        self.tokens += tokens
        self.seconds += seconds
        self.grad_norm = norm

    def flush(
        self, progress: _Progress, lr: float, total_steps: int, lead: bool = True
    ) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "loss": self.loss / self.steps,
            "lr": lr,
            "grad_norm": self.grad_norm,
            "samples_per_s": self.samples / seconds,
            "tokens_per_s": self.tokens / seconds,
        }
        if lead:
            log.info(
                "step %d/%d epoch %d loss %.4f lr %.2e samples/s %.1f tokens/s %.0f",
                progress.step,
                total_steps,
                progress.epoch,
                record["loss"],
                lr,
                record["samples_per_s"],
                record["tokens_per_s"],
            )
        self.reset()
        return record


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------
# Output folder, checkpoints, final save
# --------------------------------------------------------------------------------------------


def _prepare_output(out: Path, c: TrainConfig) -> Path | None:
    """Create OUTPUT; the newest checkpoint when resuming. A folder with an earlier run's
    checkpoints or summary is only continued with --resume, never overwritten."""
    checkpoints = sorted((out / CHECKPOINTS).glob("step-*")) if out.exists() else []
    if c.resume:
        if not checkpoints:
            raise ValueError(f"--resume: no checkpoints in {out / CHECKPOINTS}")
        return checkpoints[-1]
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


def _rewind_logs(out: Path, progress: _Progress, ranks: Ranks) -> None:
    """Drop what an interrupted run logged after the checkpoint it resumes from: metrics of later
    steps, and skipped rows of the epoch it is in (which is read again, and logs them again).
    Each rank rewinds its own problems file; rank 0 the metrics."""
    files: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
        (_problems_file(ranks), lambda r: r["epoch"] < progress.epoch)
    ]
    if ranks.rank == 0:
        files.append(("metrics.jsonl", lambda r: r["step"] <= progress.step))
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


_FSDP_PREFIX = "_fsdp_wrapped_module."


def _full_state(engine: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole state dict, gathered on rank 0 (in CPU memory) under the names of
    the unwrapped model; empty on other ranks. Every rank must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(engine, StateDictType.FULL_STATE_DICT, config):
        return engine.state_dict()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _trained_names(engine: torch.nn.Module) -> list[str]:
    return [n.replace(_FSDP_PREFIX, "") for n, p in engine.named_parameters() if p.requires_grad]


def _save_checkpoint(
    out: Path,
    progress: _Progress,
    engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    c: TrainConfig,
    ranks: Ranks,
) -> Path:
    """Write OUTPUT/checkpoints/step-N (rank 0; every rank calls it, for the gathers) and
    return its path. Where each rank is in the epoch and its RNG are kept per rank."""
    final = out / CHECKPOINTS / f"step-{progress.step:08d}"
    fsdp = _uses_fsdp(c, ranks)
    if fsdp:
        from torch.distributed.fsdp import FullOptimStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        full = _full_state(engine)
        tensors = {n: full[n].contiguous() for n in _trained_names(engine) if n in full}
        with FSDP.state_dict_type(
            engine,
            StateDictType.FULL_STATE_DICT,
            # offload_to_cpu=True saved exp_avg in place of exp_avg_sq (torch 2.14, gloo):
            # gather on the device, then copy.
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            optim_state = _to_cpu(FSDP.optim_state_dict(engine, optimizer))
    else:
        tensors = _trainable_state(_unwrap_ddp(engine))
        optim_state = optimizer.state_dict()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    mine = {
        "positions": {str(k): v for k, v in progress.positions.items()},
        "stats_before_epoch": progress.stats_before_epoch.to_dict(),
        "unused_samples": progress.unused_samples,
    }
    per_rank = ranks.gather((mine, rng))
    if ranks.rank == 0:
        tmp = out / CHECKPOINTS / f".tmp-step-{progress.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({**rng, "ranks": [r for _, r in per_rank]}, tmp / "rng.pt")
        state = {
            "step": progress.step,
            "epoch": progress.epoch,
            # Rank 0's, at the top level as a one-process run writes them.
            **mine,
            "world_size": ranks.world_size,
            "fsdp": fsdp,
            "ranks": [m for m, _ in per_rank],
            "samples": progress.samples,
            "tokens": progress.tokens,
            "seconds": progress.seconds,
            "first_loss": progress.first_loss,
            "config": dataclasses.asdict(c),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint is there whole or not at all
        for old in sorted((out / CHECKPOINTS).glob("step-*"))[: -c.keep_checkpoints]:
            shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    ranks.barrier()
    return final


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def _unwrap_ddp(engine: torch.nn.Module) -> torch.nn.Module:
    if isinstance(engine, torch.nn.parallel.DistributedDataParallel):
        return engine.module
    return engine


@dataclass
class _Saved:
    path: Path
    progress: _Progress
    tensors: dict[str, torch.Tensor]
    rng: dict[str, Any]
    fsdp: bool


def _read_checkpoint(path: Path, c: TrainConfig, ranks: Ranks) -> _Saved:
    """What `path` holds for this rank; a ValueError when it was written with settings this run
    cannot continue."""
    state = json.loads((path / "state.json").read_text())
    saved = state["config"]
    now = dataclasses.asdict(c)
    defaults = dataclasses.asdict(TrainConfig(stage="align", data=[], output=""))
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k, defaults[k]) != now.get(k)]
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
    if state.get("fsdp", False) != _uses_fsdp(c, ranks):
        raise ValueError(f"{path}: --fsdp differs from the run that wrote it")
    mine = (state.get("ranks") or [state])[ranks.rank]
    rng = torch.load(path / "rng.pt", weights_only=False)
    progress = _Progress(
        step=state["step"],
        epoch=state["epoch"],
        positions={int(k): v for k, v in mine["positions"].items()},
        stats_before_epoch=DataStats.from_dict(mine["stats_before_epoch"]),
        samples=state["samples"],
        tokens=state["tokens"],
        seconds=state["seconds"],
        first_loss=state["first_loss"],
        unused_samples=mine.get("unused_samples", 0),
    )
    return _Saved(
        path,
        progress,
        load_file(str(path / "trainable.safetensors")),
        rng["ranks"][ranks.rank] if "ranks" in rng else rng,
        state.get("fsdp", False),
    )


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"{path}: trained tensors differ (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _load_optimizer(
    saved: _Saved,
    engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Optimizer, scheduler and RNG of this rank; after the model is wrapped (FSDP's optimizer
    state is keyed by parameter name and resharded here)."""
    optim_state = torch.load(saved.path / "optimizer.pt", weights_only=False)
    if saved.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optim_state = FSDP.optim_state_dict_to_load(engine, optimizer, optim_state)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(saved.path / "scheduler.pt", weights_only=False))
    torch.set_rng_state(saved.rng["cpu"])
    if "cuda" in saved.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved.rng["cuda"])


def _save_final(
    parts: LlavaParts,
    model: torch.nn.Module,
    engine: torch.nn.Module,
    c: TrainConfig,
    out: Path,
    dtype: torch.dtype,
    ranks: Ranks,
) -> list[str]:
    """Write the trained model to OUTPUT (rank 0; every rank calls it); return the names of
    what OUTPUT then holds."""
    if _uses_fsdp(c, ranks):
        full = _full_state(engine)  # a collective: before rank 0 goes its own way
        if ranks.rank == 0:
            parts.model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in full.items()})
            parts.processor.save_pretrained(out)
            projector = {k: v for k, v in full.items() if k.startswith(PROJECTOR_PREFIX)}
            save_file(projector, str(out / PROJECTOR_FILE))
    elif ranks.rank == 0:
        projector = projector_state(model)
        if not c.lora:
            parts.model.to(dtype)
            parts.save_pretrained(out)
        elif c.qlora:
            _save_qlora(parts, model, c, out, dtype)
        elif c.lora_merge:
            parts.model = model.merge_and_unload()
            parts.model.to(dtype)
            parts.save_pretrained(out)
        else:
            base = os.path.abspath(c.from_checkpoint or out / "base")
            model.peft_config["default"].base_model_name_or_path = base
            model.save_pretrained(out)
            parts.processor.save_pretrained(out)
        save_file(projector, str(out / PROJECTOR_FILE))
    ranks.barrier()
    return sorted(os.listdir(out))


def _link_model_files(out: Path, checkpoint: Path) -> None:
    """Make the final checkpoint a loadable model too: hard links to OUTPUT's model files (a
    copy where the file system has no links), so it costs no second copy of the weights."""
    for f in out.iterdir():
        if (
            f.is_file()
            and f.name not in ("metrics.jsonl", "train_summary.json")
            and (not f.name.startswith("data_problems"))
        ):
            target = checkpoint / f.name
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def _save_qlora(
    parts: LlavaParts, model: torch.nn.Module, c: TrainConfig, out: Path, dtype: torch.dtype
) -> None:
    """Merging into 4-bit weights would round the update away: the adapter is saved, then
    merged into the base loaded in `dtype` (on the CPU) unless --no-lora-merge."""
    adapter = out / ("adapter" if c.lora_merge else ".")
    model.peft_config["default"].base_model_name_or_path = os.path.abspath(c.from_checkpoint)
    model.save_pretrained(adapter)
    parts.processor.save_pretrained(out)
    if not c.lora_merge:
        return
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(c.from_checkpoint, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as exc:  # bad flags, data or models: a message, no traceback
        sys.exit(f"error: {exc}")
