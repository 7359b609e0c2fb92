"""embed in a Ray worker: torch's intra-op threads and the decode pool are the worker's CPUs."""

from __future__ import annotations

from warren.pipelines.recipe import DEMO_CLIP
from warren.stages.embed import Embed, _worker_cpus


def test_outside_a_ray_worker_torch_threads_are_left_alone():
    assert _worker_cpus() is None


def test_a_ray_worker_sets_torch_threads_and_its_decode_pool_to_its_cpus(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=2)
    def threads() -> tuple[int, int]:
        import torch

        torch.set_num_threads(7)  # whatever was there before
        stage = Embed(model=DEMO_CLIP, store="none")
        stage.setup()
        return torch.get_num_threads(), stage._pool._max_workers

    assert ray.get(threads.remote()) == (2, 2)
