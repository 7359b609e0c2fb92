"""stages.shuffle.map_groups: every group of equal keys reaches the function whole, exactly once."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from warren.stages.shuffle import group_bounds, map_groups


def _describe_group(group: pa.Table, tag: str) -> pa.Table:
    """Each row learns its group's size and how many distinct keys the call saw."""
    keys = group.column("k").to_pylist()
    n = group.num_rows
    return (
        group.append_column("size", pa.array([n] * n, pa.int64()))
        .append_column("distinct", pa.array([len(set(keys))] * n, pa.int64()))
        .append_column("tag", pa.array([tag] * n, pa.string()))
    )


@pytest.mark.parametrize(("blocks", "parts"), [(1, 1), (5, 3), (7, 16), (3, 1)])
def test_groups_arrive_whole_with_nulls_as_one_group(ray_session, blocks, parts):
    rng = np.random.default_rng(blocks * 10 + parts)
    n = 400
    keys = [None if rng.random() < 0.05 else int(rng.integers(-3, 25)) for _ in range(n)]
    table = pa.table({"id": [f"r{i:04d}" for i in range(n)], "k": pa.array(keys, pa.int64())})
    size = -(-n // blocks)
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, n, size)])
    out = map_groups(
        ds, "k", _describe_group, ("x",), num_partitions=parts, num_rows=n, num_cpus=2
    ).take_all()
    assert sorted(r["id"] for r in out) == sorted(table.column("id").to_pylist())
    count = collections.Counter(keys)  # brute force: None counts as one group
    for r in out:
        assert r["size"] == count[r["k"]]
        assert r["distinct"] == 1 and r["tag"] == "x"


def test_an_empty_dataset_stays_empty(ray_session):
    ds = ray.data.from_arrow(
        pa.table({"id": pa.array([], pa.string()), "k": pa.array([], pa.int64())})
    )
    out = map_groups(ds, "k", _describe_group, ("x",), num_partitions=4, num_rows=0, num_cpus=2)
    assert out.count() == 0


def test_group_bounds_splits_runs_and_keeps_nulls_apart():
    keys = pa.array([1, 1, 2, 0, None, None])
    assert group_bounds(keys) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert group_bounds(pa.array([], pa.int64())) == []
    # a 0 before the nulls is not merged with them although nulls are filled with 0
    assert group_bounds(pc.cast(pa.array([0, None]), pa.int64())) == [(0, 1), (1, 2)]


def test_string_keys_group_like_integers(ray_session):
    keys = [None, "b", "a", "b", "", None, "c", "a", "a"]
    table = pa.table({"id": [f"r{i}" for i in range(len(keys))], "k": pa.array(keys, pa.string())})
    ds = ray.data.from_arrow([table.slice(0, 4), table.slice(4)])
    out = map_groups(ds, "k", _describe_group, ("s",), num_partitions=3, num_rows=9, num_cpus=2)
    count = collections.Counter(keys)
    rows = out.take_all()
    assert sorted(r["id"] for r in rows) == sorted(table.column("id").to_pylist())
    # "" and null are different groups
    assert all(r["size"] == count[r["k"]] and r["distinct"] == 1 for r in rows)


def _arrival(group: pa.Table) -> pa.Table:
    return group.append_column("seen", pa.array(range(group.num_rows), pa.int64()))


def test_rows_of_a_group_come_in_the_same_order_whatever_the_order_of_the_blocks(ray_session):
    n = 300
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "id": [f"r{i:04d}" for i in rng.permutation(n)],
            "k": pa.array(rng.integers(0, 4, n), pa.int64()),
        }
    )

    def seen(blocks: list[pa.Table]) -> dict[str, int]:
        out = map_groups(
            ray.data.from_arrow(blocks), "k", _arrival, num_partitions=2, num_rows=n, num_cpus=2
        ).take_all()
        return {r["id"]: r["seen"] for r in out}

    forward = seen([table.slice(i, 60) for i in range(0, n, 60)])
    backward = seen([table.slice(i, 45) for i in range(0, n, 45)][::-1])
    assert forward == backward
    # by id within a group (the table has no input-position column)
    for k in range(4):
        ids = sorted(
            i
            for i, kk in zip(table["id"].to_pylist(), table["k"].to_pylist(), strict=True)
            if kk == k
        )
        assert [forward[i] for i in ids] == list(range(len(ids)))
