"""ray_train: run trainers.llava's training on N processes through Ray Train.

`python -m warren.trainers.llava ... --workers N` (or `train(TrainConfig(..., workers=N))`) hands the run
to a `ray.train.torch.TorchTrainer` with N workers. Each worker is one process with one device
(a GPU with `--use-gpu`, which is the default when the Ray cluster has GPUs; else the CPU, over
gloo), which runs the loop it is given (`trainers.llava.run_loop`, passed in by `trainers.llava.train`:
this module never imports trainers.llava) as rank `ray.train.get_context().get_world_rank()`.
The loop's `transformers.Trainer` goes through Ray Train's transformers integration
(`ray.train.huggingface.transformers.prepare_trainer`, and `report_callback`, a
`RayTrainReportCallback` that reports each checkpoint where the Trainer wrote it):

- the Trainer wraps the model in DDP (a replica per rank), or with `--fsdp` in FSDP (weights,
  gradients and optimizer state sharded over the ranks), or runs DeepSpeed (`--deepspeed`);
- each rank reads its own share of the row groups (trainers.data's plan for `rank` of
  `world_size`), and all ranks run the same number of optimizer steps: each step takes as many
  micro-batches as the rank with the fewest, and an epoch ends when one rank runs out (the
  summary's `unused_samples` counts what the others had batched beyond that);
- rank 0 logs, writes `metrics.jsonl`, the checkpoints under `OUTPUT/checkpoints/` and the final
  model; each rank writes the rows it skipped to `OUTPUT/data_problems.rankK.jsonl`;
- every checkpoint goes to `ray.train.report`, as a `ray.train.Checkpoint` of its folder. Ray
  Train's run folder is `OUTPUT/checkpoints`, the Trainer's output folder, so Ray tracks the
  checkpoints where they are written (RayTrainReportCallback itself would copy each one). The
  run ends on a checkpoint of the last step, which also holds the final model's files (hard
  links to OUTPUT's), so `Result.checkpoint` loads with
  `LlavaForConditionalGeneration.from_pretrained` and resumes.

OUTPUT must be a folder every worker can write and the driver can read (a shared file system on a
multi-node cluster). Ray is the cluster a job runs on (`ray job submit`, RAY_ADDRESS), the one
this process already joined, or else a new one in this process, sized to the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from warren.trainers.config import CHECKPOINTS, FSDP_NEEDS_GPUS, TrainConfig
from warren.trainers.ranks import Ranks

#: `trainers.llava.run_loop`: (config, resume_from, ranks, *, device, report) -> summary.
Loop = Callable[..., dict[str, Any]]

log = logging.getLogger("warren.trainers.ray_train")


def train_on_ray(c: TrainConfig, resume_from: Path | None, loop: Loop) -> dict[str, Any]:
    """Run `loop` with `c` (resolved, OUTPUT prepared) on `c.workers` Ray Train workers; return
    rank 0's summary. A worker's ValueError (bad data, settings) is raised here as itself."""
    import ray
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    _ensure_ray()
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    use_gpu = gpus >= 1 if c.use_gpu is None else c.use_gpu
    if use_gpu and gpus < 1:
        raise ValueError("--use-gpu: the Ray cluster has no GPUs; drop it to train on CPUs")
    if c.fsdp and not use_gpu:
        raise ValueError(FSDP_NEEDS_GPUS)
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    out = Path(c.output).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": c,
            "resume_from": resume_from and str(resume_from),
            "loop": loop,  # pickled by reference: workers import it from its module
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # Ray's run folder is our checkpoints folder: reported checkpoints are tracked in place.
        run_config=RunConfig(name=CHECKPOINTS, storage_path=str(out)),
    )
    log.info(
        "Ray Train: %d workers on %s, %s CPUs each", c.workers, "GPUs" if use_gpu else "CPUs",
        c.cpus_per_worker,
    )  # fmt: skip
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        cause = _user_error(exc)
        if cause is not None:
            raise cause from exc
        raise
    import json

    return json.loads(result.metrics["summary"])


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    c: TrainConfig = loop_config["config"]
    resume_from = loop_config["resume_from"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray gives a worker its CPU share; torch would otherwise start a thread per core.
    torch.set_num_threads(max(1, int(c.cpus_per_worker)))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING,
            format=f"%(asctime)s rank {rank} %(name)s: %(message)s",
        )
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ranks = Ranks(rank, world_size, device if device.type == "cuda" else torch.device("cpu"))

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        from ray.train import Checkpoint, CheckpointUploadMode

        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(checkpoint))
            if checkpoint is not None and rank == 0
            else None,
            checkpoint_dir_name=checkpoint.name if checkpoint is not None else None,
            # The checkpoint is already in Ray's run folder (OUTPUT/checkpoints).
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    loop_config["loop"](
        c,
        Path(resume_from) if resume_from else None,
        ranks,
        device=device if c.device == "auto" else torch.device(c.device),
        report=report,
    )


def report_callback(report: Callable[[dict[str, Any], Path | None], None], logger: Any) -> Any:
    """Ray Train's `RayTrainReportCallback`, reporting the checkpoint the Trainer just saved in
    place (through `report`) instead of a copy of it."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class ReportInPlace(RayTrainReportCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            metrics: dict[str, Any] = {}
            for entry in state.log_history:
                metrics.update(entry)
            metrics["step"] = state.global_step
            report(metrics, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return ReportInPlace()


def _ensure_ray() -> None:
    """Join the cluster a job runs on (RAY_ADDRESS) or that this process joined; else start Ray
    in-process, with this repository importable by its workers."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # "local": a fresh Ray, never one that `ray start` left on this machine. Workers import
    # warren as installed; a PYTHONPATH the driver was given reaches them too.
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env})


def _user_error(exc: BaseException) -> BaseException | None:
    """The ValueError (bad data or settings) behind a failed Ray Train run, if that is what
    failed: the command line then prints it as it does for a one-process run."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        seen: set[int] = set()
        error: BaseException | None = failures[rank]
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            if isinstance(error, ValueError):
                return error
            error = getattr(error, "cause", None) or error.__cause__
    return None
