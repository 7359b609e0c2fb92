"""What a map stage asks Ray for, from its instance's resources (`--<stage>.num_cpus` and the
rest); Ray's view of the cluster is stubbed, so no Ray starts."""

from __future__ import annotations

import pytest
import ray

from warren.pipelines.ray_session import map_resources
from warren.stages.embed import Embed


@pytest.fixture
def cluster(monkeypatch):
    def set_(**resources):
        monkeypatch.setattr(ray, "cluster_resources", lambda: resources)

    return set_


def test_a_model_stage_asking_for_no_cpu_gets_a_pool_not_a_zero_division(cluster):
    # `--embed.num_cpus 0` is accepted by the flag (>= 0); the pool is then sized per CPU
    cluster(CPU=8.0)
    args = map_resources(Embed(resources={"num_cpus": 0, "num_gpus": 0}))
    assert args["num_cpus"] == 0
    assert (args["compute"].min_size, args["compute"].max_size) == (1, 8)


def test_a_gpu_actor_asking_for_no_cpu_is_bounded_by_the_gpus(cluster):
    cluster(CPU=8.0, GPU=2.0)
    args = map_resources(Embed(resources={"num_cpus": 0, "num_gpus": 1}))
    assert args["num_gpus"] == 1
    assert (args["compute"].min_size, args["compute"].max_size) == (1, 2)


def test_the_given_concurrency_and_resources_reach_ray(cluster):
    cluster(CPU=8.0, GPU=1.0)
    args = map_resources(Embed(resources={"num_cpus": 2, "num_gpus": 0.5, "concurrency": (2, 3)}))
    assert (args["num_cpus"], args["num_gpus"]) == (2, 0.5)
    assert (args["compute"].min_size, args["compute"].max_size) == (2, 3)
