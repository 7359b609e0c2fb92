"""The generation stages run as ONE Ray actor on half a CPU (their budget, rate limits and
max_concurrency are counted per actor, so for the whole stage only with one), whatever batch
size a subclass declares; the transformers backend is a GPU actor pool instead."""

from __future__ import annotations

import pytest

from warren.stages.capfusion import CapFusion
from warren.stages.generate import AllavaGenerate, LlavaGenerate
from warren.stages.recaption import Recaption


@pytest.mark.parametrize(
    "cls, batch_size",
    [(LlavaGenerate, 64), (AllavaGenerate, 16), (Recaption, 32), (CapFusion, 32)],
)
def test_generation_stages_run_as_one_actor(cls, batch_size):
    endpoint = {"backend": "endpoint"} if cls in (Recaption, CapFusion) else {}
    stage = cls(**endpoint)
    assert stage.concurrency == (1, 1)
    assert stage.num_cpus == 0.5 and stage.num_gpus == 0.0
    assert stage.batch_size == batch_size


@pytest.mark.parametrize("cls", [Recaption, CapFusion])
def test_transformers_backend_is_a_gpu_pool(cls):
    stage = cls(backend="transformers")
    assert stage.concurrency is None
    assert (stage.num_cpus, stage.num_gpus) == (1.0, 1.0)
