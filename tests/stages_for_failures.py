"""Stages that fail or lose their lock, for the runner's failure tests (importable by Ray
workers through PYTHONPATH)."""

from __future__ import annotations

import dataclasses
import json
import socket

import pyarrow as pa

from warren.stages.base import BatchStage, GlobalContext, GlobalStage, Resources, param


@dataclasses.dataclass(frozen=True)
class StealLockParams:
    lock_path: str = param("", "the OUTPUT/.lock to overwrite with another run's token")
    steal: bool = param(True, "overwrite the lock (False: pass rows through untouched)")


class StealLock(BatchStage):
    """Plays a second run that took the output lock while this stage was working."""

    name = "steal_lock"
    version = "1"
    Params = StealLockParams
    resources = Resources(batch_size=1000)

    def process(self, batch: pa.Table) -> pa.Table:
        if self.params.steal:
            thief = {"host": socket.gethostname(), "pid": 1, "token": "thief", "started": "now"}
            with open(self.params.lock_path, "w") as f:
                json.dump(thief, f)
        return batch


@dataclasses.dataclass(frozen=True)
class FailsInRayParams:
    message: str = param("bad input: give --fails_in_ray.message", "the error's text")


def _fail(batch: pa.Table, message: str) -> pa.Table:
    raise ValueError(message)


class FailsInRay(GlobalStage):
    """A global stage whose Ray Data work raises (not one of the runner's own worker tasks)."""

    name = "fails_in_ray"
    version = "1"
    Params = FailsInRayParams

    def run(self, ds, ctx: GlobalContext):
        return ds.map_batches(_fail, fn_args=(self.params.message,), batch_format="pyarrow")
