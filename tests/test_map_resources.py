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


@pytest.fixture
def nodes(monkeypatch):
    """A cluster of nodes with these CPU counts (and GPUs on none unless given)."""

    def set_(*cpus: float, gpus: float = 0.0):
        listed = [{"Alive": True, "Resources": {"CPU": c}} for c in cpus]
        monkeypatch.setattr(ray, "nodes", lambda: listed)
        total = {"CPU": float(sum(cpus))}
        if gpus:
            total["GPU"] = gpus
        monkeypatch.setattr(ray, "cluster_resources", lambda: total)

    return set_


def test_a_model_stage_on_two_cpus_gets_one_actor_holding_both(nodes):
    # 2 cores and no GPU: one actor of 2 CPUs (so 2 intra-op threads), not 1 actor on 1 core
    nodes(2.0)
    args = map_resources(Embed())
    assert args["num_cpus"] == 2
    assert "num_gpus" not in args
    assert (args["compute"].min_size, args["compute"].max_size) == (1, 1)


def test_a_big_cpu_node_gets_actors_of_eight_threads_and_nodes_are_not_merged(nodes):
    nodes(16.0)
    args = map_resources(Embed())
    assert args["num_cpus"] == 8 and args["compute"].max_size == 2
    # two nodes of 4: an actor cannot span them, so 4 CPUs each, one per node
    nodes(4.0, 4.0)
    args = map_resources(Embed())
    assert args["num_cpus"] == 4 and args["compute"].max_size == 2


def test_with_a_gpu_the_pool_is_one_actor_per_gpu_as_before(nodes):
    nodes(8.0, gpus=2.0)
    args = map_resources(Embed())
    assert (args["num_cpus"], args["num_gpus"]) == (1, 1)
    assert args["compute"].max_size == 2


def test_cpus_the_user_gave_keep_one_cpu_free_as_before(nodes):
    # --embed.num_cpus 0.5 on 4 CPUs: actors of half a CPU in the 3 CPUs left free, 6 of them
    nodes(4.0)
    args = map_resources(Embed(resources={"num_cpus": 0.5, "num_gpus": 0}))
    assert args["num_cpus"] == 0.5 and args["compute"].max_size == 6
