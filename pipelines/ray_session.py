"""The Ray side of a run: joining or starting Ray, what a map stage asks it for, and keeping Ray
Data's console quiet (the runner prints its own progress and reports each failure once)."""

from __future__ import annotations

import logging
import os
from typing import Any

from warren.stages.base import BatchStage

# Read tasks ask for a quarter CPU: an actor pool sized to the machine then never leaves them
# without a slot (on one CPU, a whole-CPU read would wait forever behind a half-CPU actor).
READ_CPUS = 0.25


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a job runs on (RAY_ADDRESS), or start Ray in-process sized to the machine."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "configure_logging": True,
        "logging_level": "WARNING",
        "log_to_driver": True,
    }
    if not os.environ.get("RAY_ADDRESS"):
        # "local" always starts a fresh in-process Ray; a bare ray.init() would join whatever
        # cluster `ray start` left on this machine, with resources we did not ask for.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        kwargs["include_dashboard"] = False
        # Workers import warren as installed; a PYTHONPATH the driver was given (a user's own
        # stages) reaches them too.
        if os.environ.get("PYTHONPATH"):
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(**kwargs)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def node_cpus() -> float:
    """CPUs of the biggest live node (an actor cannot span nodes)."""
    import ray

    per_node = [
        float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive", True)
    ]
    return max(per_node, default=0.0) or cluster_cpus()


# A model actor on CPUs runs its intra-op threads (torch, onnxruntime: OMP_NUM_THREADS, which Ray
# sets to the actor's CPUs) on at most this many CPUs; a bigger node gets several such actors,
# since one process's intra-op threads scale poorly past a handful of cores.
CPU_THREADS_PER_ACTOR = 8


def map_resources(stage: BatchStage) -> dict[str, Any]:
    """Resources for map_batches, from the stage instance's own `resources`.

    A model stage on GPUs gets one actor per `num_gpus` share. A model stage without a GPU whose
    CPUs and pool size the user left alone gets actors that together hold every CPU: each holds
    up to CPU_THREADS_PER_ACTOR CPUs of a node and runs that many intra-op threads (on 2 cores,
    one actor of 2 threads: it loads one model, and uses both cores whatever the number of
    pieces). A map stage reads its own pieces inside its tasks and actors, so nothing else waits
    for a CPU while its pool runs. With `--<stage>.num_cpus` given, the pool is bounded so a CPU
    stays free, as before."""
    import ray

    cpus = cluster_cpus()
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    num_gpus = stage.num_gpus if gpus >= stage.num_gpus else 0.0
    if stage.uses_model and not num_gpus and _cpu_layout_is_ours(stage):
        per_actor = max(1.0, min(float(CPU_THREADS_PER_ACTOR), node_cpus()))
        per_actor = min(per_actor, cpus)
        size = max(1, int(cpus // per_actor))
        return {
            "num_cpus": per_actor,
            "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size),
        }
    num_cpus = min(stage.num_cpus, max(cpus / 2, 0.25))
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    if stage.uses_model:
        if stage.concurrency is not None:
            lo, hi = stage.concurrency
        else:
            if num_cpus > 0:
                by_cpu = int((cpus - 1) // num_cpus) if cpus > 1 else 1
            else:  # `--<stage>.num_cpus 0`: actors that hold no CPU, one per CPU at most
                by_cpu = max(1, int(cpus))
            by_gpu = int(gpus // num_gpus) if num_gpus else by_cpu
            hi = max(1, min(by_cpu, by_gpu))
            lo = 1
        args["compute"] = ray.data.ActorPoolStrategy(min_size=lo, max_size=max(lo, hi))
    return args


def layout_of(stage: BatchStage) -> dict[str, Any]:
    """What a map stage's workers get from Ray in this run (`map_resources`), as the manifest
    records it: CPUs and GPUs per worker, and a model stage's actor pool bounds. The stage's
    declared `resources` may differ: without a GPU the runner sizes model actors to the CPUs."""
    args = map_resources(stage)
    out: dict[str, Any] = {
        "num_cpus": float(args["num_cpus"]),
        "num_gpus": float(args.get("num_gpus", 0.0)),
    }
    compute = args.get("compute")
    if compute is not None:
        out["actors"] = [int(compute.min_size), int(compute.max_size)]
    return out


def _cpu_layout_is_ours(stage: BatchStage) -> bool:
    """Neither `--<stage>.num_cpus` nor `--<stage>.concurrency` was given (the stage's defaults
    stand), so the runner lays its actors over the CPUs."""
    default = stage.default_resources()
    return stage.concurrency is None and stage.num_cpus == default.num_cpus


def quiet_ray_data(quiet: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our own progress lines are shorter than Ray's bars and survive `ray job logs`.
    ctx.enable_progress_bars = False
    # Ray 2.60's datasource v2 Parquet read ignores num_cpus for its list/read tasks, and an actor
    # pool on a small machine then starves them forever; the v1 read honours READ_CPUS.
    ctx.use_datasource_v2 = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray warns that its bars are off; that is our choice, not the user's problem.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # A worker's error reaches the driver as itself (StageFailed: one line and the traceback for
    # OUTPUT/logs/), not wrapped in UserCodeException, and Ray Data's own announcements of it are
    # not printed: the runner reports every failed stage once.
    ctx.raise_original_map_exception = True
    for name in _RAY_FAILURE_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _ReportedByRunner) for f in log.filters):
            log.addFilter(_ReportedByRunner())


_RAY_FAILURE_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data.exceptions",
)


class _ReportedByRunner(logging.Filter):
    """Drops Ray Data's console report of a failed task (its notice and the stack, which Ray
    Data prints in full for any error that is not its own UserCodeException wrapper): the runner
    prints the cause once and writes the whole stack to OUTPUT/logs/<stage>.log."""

    PREFIXES = (
        "An exception was raised from a task of operator",
        "Exception occurred in user code",
        "Exception occurred in Ray Data or Ray Core internal code",
        "Full stack trace:",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)
