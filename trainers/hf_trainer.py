"""hf_trainer: warren's training run on transformers' `Trainer`.

Why `Trainer` and not TRL's `SFTTrainer`: SFTTrainer's additions are dataset preparation
(formatting, packing, completion-only masking, its VLM collator), which warren does itself, on
a streaming Parquet path no `datasets.Dataset` fits. What warren needs from a trainer is what
`Trainer` has: `TrainingArguments` (DeepSpeed, FSDP, `report_to`, schedulers, gradient
accumulation, bf16, gradient checkpointing, checkpoints and resume), callbacks and Ray Train's
integration. warren adds to it only what no library does:

- `StepStream`: trainers.data's batches (row-group sharding per rank and worker, length
  grouping, counted bad rows) as the iterable the Trainer pulls micro-batches from, epoch after
  epoch. Every rank ends an epoch at the same micro-batch (ranks read different numbers of rows,
  and each forward of DDP waits for all of them): the epoch ends when one rank has no batch
  left, and what the others had beyond it is counted as unused. Where each data worker is goes
  into every checkpoint, so a resumed run reads on from there without decoding what it skips
  (the Trainer's own skip would decode every image again).
- `LlavaTrainer`: a `Trainer` with the projector in its own parameter group (`--projector-lr`),
  pixels cast to the tower's dtype, and checkpoints that hold only the trained tensors when they
  are a part of the model (an align checkpoint of a 7B model is its projector, not 14 GB).
- `WarrenLog`: `metrics.jsonl` (step, data epoch, loss, lr, grad norm, samples/s, tokens/s over
  all ranks), the first and last step loss, and the data state saved with each checkpoint.

The loss is the Trainer's: each micro-batch's summed token loss divided by the answer tokens of
the whole optimizer step over all ranks (`num_items_in_batch`, `average_tokens_across_devices`),
so every answer token weighs the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from warren.trainers.config import CHECKPOINTS
from warren.trainers.data import DataStats, StreamingLoader
from warren.trainers.ranks import Ranks

log = logging.getLogger("warren.trainers.llava")

TRAINABLE_FILE = "trainable.safetensors"
DATA_STATE = "warren_data.rank{rank}.json"
RUN_STATE = "warren_state.json"


class StepStream:
    """The micro-batches (model inputs) the Trainer pulls, across data epochs (`epochs`, or
    without end when None: `--max-steps` stops the Trainer). Iterates once: a Trainer epoch
    after the data ran out finds nothing and ends the run. `len` is the planned micro-batch count
    (the Trainer's schedule); skipped rows can make the real count smaller."""

    def __init__(
        self,
        loader: StreamingLoader,
        ranks: Ranks,
        *,
        epochs: int | None,
        length: int,
        start_epoch: int = 0,
        skip: Mapping[int, int] | None = None,
        stats_before_epoch: DataStats | None = None,
    ):
        self.loader = loader
        self.ranks = ranks
        self.epochs = epochs
        self.length = length
        self.epoch = start_epoch
        self.skip = dict(skip or {})
        if stats_before_epoch is not None:
            loader.stats = stats_before_epoch.copy()
        self.stats_before_epoch = loader.stats.copy()
        self.positions: dict[int, int] = dict(self.skip)
        self.pending: list[tuple[int, int]] = []  # (samples, tokens) pulled since the last step
        self.unused = 0  # samples batched but never trained on
        self._started = False
        self._gen: Iterator[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """The Trainer's epochs are not the data's (they are counted here)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            return iter(())
        self._started = True
        self._gen = self._run()
        return self._gen

    def finish(self) -> None:
        """Read the epoch the Trainer stopped in to its end, on every rank (a collective), when
        the run was planned in epochs: the Trainer stops pulling at the planned count, one pull
        before the stream learns that a rank is out of rows, and what the other ranks hold
        beyond that is counted as unused. Whatever is pulled here was never trained on."""
        if self._gen is not None:
            for _ in self._gen:
                pass
        self.unused += sum(s for s, _ in self.pending)
        self.pending.clear()

    def _run(self) -> Iterator[dict[str, torch.Tensor]]:
        skip = self.skip
        while self.epochs is None or self.epoch < self.epochs:
            resumed = bool(skip)
            self.loader.set_epoch(self.epoch, skip)
            skip = {}
            self.stats_before_epoch = self.loader.stats.copy()
            batches = iter(self.loader)
            pulled = 0
            while True:
                batch = next(batches, None)
                if self.ranks.min(int(batch is not None)) == 0:
                    # One rank is out of batches: the epoch ends on every rank here; the rest
                    # is read to the end, so its rows are counted.
                    left = ([batch] if batch is not None else []) + list(batches)
                    self.unused += sum(len(b.ids) for b in left)
                    break
                pulled += 1
                self.positions = dict(self.loader.positions)
                self.pending.append((len(batch.ids), batch.num_tokens))
                yield batch.inputs
            if not pulled and not resumed:
                where = f" (rank {self.ranks.rank})" if self.ranks.distributed else ""
                raise ValueError(
                    f"epoch {self.epoch} gave no batches{where}: {self.loader.epoch_stats.summary()}"
                )
            self.epoch += 1
            self.positions = {}

    def step_done(self) -> tuple[int, int]:
        """What the optimizer step just taken trained on (this rank): (samples, tokens)."""
        samples = sum(s for s, _ in self.pending)
        tokens = sum(t for _, t in self.pending)
        self.pending.clear()
        return samples, tokens

    def state(self) -> dict[str, Any]:
        """Where this rank's data is, for a checkpoint taken after an optimizer step."""
        return {
            "epoch": self.epoch,
            "positions": {str(k): v for k, v in self.positions.items()},
            "stats_before_epoch": self.stats_before_epoch.to_dict(),
            "unused_samples": self.unused,
        }


class LlavaTrainer(Trainer):
    """`Trainer` with warren's data stream, parameter groups and trained-tensor checkpoints."""

    def __init__(self, *args: Any, stream: StepStream, projector_lr: float | None, **kw: Any):
        super().__init__(*args, **kw)
        self.stream = stream
        self.projector_lr = projector_lr
        self.step_loss = 0.0
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.pixel_dtype = next(base.model.vision_tower.parameters()).dtype

    def get_train_dataloader(self) -> Any:
        # Batches are made (and sharded per rank) by trainers.data; accelerate must neither
        # re-shard nor re-batch them.
        return self.stream

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (`--optim`, AdamW by default) over the Trainer's decay and
        no-decay groups, each split so the projector trains at its own rate (LLaVA's
        mm_projector_lr)."""
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = (name in decay, ".multi_modal_projector." in f".{name}")
                groups.setdefault(key, []).append(p)
        lr = self.args.learning_rate
        params = [
            {
                "params": ps,
                "weight_decay": self.args.weight_decay if wd else 0.0,
                "lr": self.projector_lr if projector and self.projector_lr is not None else lr,
            }
            for (wd, projector), ps in sorted(groups.items())
        ]
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(params, **kwargs)
        return self.optimizer

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        inputs["use_cache"] = False
        return inputs

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        # The Trainer's estimate walks every parameter at every micro-batch; warren reports
        # tokens/s instead.
        return 0

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Summed on the device: read once per optimizer step (WarrenLog), not per micro-batch.
        self.step_loss = self.step_loss + loss.detach()
        return loss

    # --- checkpoints of the trained tensors only -------------------------------------------

    def _saves_trainable_only(self) -> bool:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False  # their own sharded state; the Trainer's save gathers it
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            return False  # the Trainer saves the adapter (and the projector with it)
        trained = [p.requires_grad for p in model.parameters()]
        return not all(trained)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._saves_trainable_only():
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        tensors = {
            n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(tensors, str(out / TRAINABLE_FILE))
        torch.save(self.args, out / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not path.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable(model if model is not None else self.model, load_file(str(path)), path)


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trained:
        missing, extra = sorted(trained - set(tensors))[:3], sorted(set(tensors) - trained)[:3]
        raise ValueError(f"{path}: trained tensors differ (missing {missing}, unexpected {extra})")
    model.load_state_dict(tensors, strict=False)


class WarrenLog(TrainerCallback):
    """metrics.jsonl, the step losses and throughput, and the data state in every checkpoint.
    Every rank runs it (its sums are collectives); rank 0 writes."""

    def __init__(
        self,
        stream: StepStream,
        ranks: Ranks,
        out: Path,
        progress: dict[str, Any],
        config: dict[str, Any],
    ) -> None:
        self.stream = stream
        self.config = config  # saved with each checkpoint: a resume must match it
        self.ranks = ranks
        self.out = out
        # samples, tokens, seconds, first_loss, last_loss: carried over a resume
        self.progress = progress
        self.window = [0, 0, 0.0]  # samples, tokens, seconds since the last log line
        self.tick = time.perf_counter()
        self.trainer: LlavaTrainer | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # Throughput is wall time from step to step, waiting for data included, from here.
        self.tick = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        assert self.trainer is not None
        samples, tokens = self.stream.step_done()
        loss = float(self.trainer.step_loss)
        self.trainer.step_loss = 0.0
        # Each rank's micro-batch losses are its share of the step's mean loss times the
        # world size (the Trainer undoes DDP's averaging so): their sum over ranks / world.
        samples, tokens, loss = self.ranks.sum([samples, tokens, loss])
        loss /= self.ranks.world_size
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        p = self.progress
        p["samples"] += int(samples)
        p["tokens"] += int(tokens)
        p["seconds"] += elapsed
        if p["first_loss"] is None:
            p["first_loss"] = loss
        p["last_loss"] = loss
        self.window[0] += int(samples)
        self.window[1] += int(tokens)
        self.window[2] += elapsed
        budget = self.config.get("max_tokens")
        if budget and p["tokens"] >= budget:
            # The same on every rank: the token count is summed over all of them.
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not logs or "loss" not in logs:
            return  # the Trainer's end-of-run summary
        samples, tokens, seconds = self.window
        self.window = [0, 0, 0.0]
        seconds = max(seconds, 1e-9)
        record = {
            "step": state.global_step,
            "epoch": self.stream.epoch,
            "loss": logs["loss"],
            "samples": self.progress["samples"],  # so far, all ranks
            "tokens": self.progress["tokens"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
        }
        if self.ranks.rank == 0:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            log.info(
                "step %d/%d epoch %d loss %.4f lr %.2e samples/s %.1f tokens/s %.0f",
                state.global_step, state.max_steps, self.stream.epoch, record["loss"],
                record["lr"] or 0.0, record["samples_per_s"], record["tokens_per_s"],
            )  # fmt: skip

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        mine = self.stream.state()
        every = self.ranks.gather(mine)
        if self.ranks.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for rank, data in enumerate(every):
                (folder / DATA_STATE.format(rank=rank)).write_text(json.dumps(data))
            run = {**self.progress, "step": state.global_step, "world_size": self.ranks.world_size}
            (folder / RUN_STATE).write_text(
                json.dumps({**run, "config": self.config}, indent=2, default=str)
            )
        self.ranks.barrier()


def read_data_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    data = json.loads((checkpoint / DATA_STATE.format(rank=rank)).read_text())
    return {
        "start_epoch": data["epoch"],
        "skip": {int(k): v for k, v in data["positions"].items()},
        "stats_before_epoch": DataStats.from_dict(data["stats_before_epoch"]),
        "unused": data.get("unused_samples", 0),
    }


def newest_checkpoint(out: Path) -> Path | None:
    """The Trainer's newest `checkpoint-N` folder in OUTPUT/checkpoints, if any."""
    folder = out / CHECKPOINTS
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def link_model_files(out: Path, checkpoint: Path) -> None:
    """Make a checkpoint a loadable model too: hard links to OUTPUT's model files (a copy where
    the file system has no links), so it costs no second copy of the weights."""
    import shutil

    for f in out.iterdir():
        if (
            f.is_file()
            and f.name not in ("metrics.jsonl", "train_summary.json")
            and not (f.name.startswith("data_problems"))
        ):
            target = checkpoint / f.name
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
