"""balance: per-source caps and size-tempered sampling against brute force, the target arithmetic
by hand, keep frequencies over many seeds, and the runner's accounting."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from outputs import rejected_reasons, table

import stages.balance as balance_mod
from pipelines.runner import Pipeline, Runner
from stages.balance import Balance, balance_targets, tempered_targets
from stages.base import GlobalContext
from stages.schema import rows_to_table
from stages.select import uniform_key

SIZES = {"a": 5, "b": 40, "c": 200}


def _rows(sizes: dict, nulls: int = 0) -> list[tuple[str, str | None]]:
    rows = [(f"{g}-{i:04d}", g) for g, n in sizes.items() for i in range(n)]
    rows += [(f"null-{i:03d}", None) for i in range(nulls)]
    order = np.random.default_rng(0).permutation(len(rows))  # sources interleaved across blocks
    return [rows[i] for i in order]


def _dataset(rows, blocks: int = 4):
    tbl = pa.table(
        {
            "id": [r[0] for r in rows],
            "source": pa.array([r[1] for r in rows], pa.string()),
        }
    )
    size = -(-len(rows) // blocks)
    return ray.data.from_arrow([tbl.slice(i, size) for i in range(0, len(rows), size)])


def _run(stage, rows, blocks: int = 4) -> dict[str, str | None]:
    ctx = GlobalContext(num_rows=len(rows), num_shards=blocks, num_cpus=2)
    out = stage.run(_dataset(rows, blocks), ctx).take_all()
    assert len(out) == len(rows)
    return {r["id"]: r["_reject"] for r in out}


def _smallest(rows, source, k: int, seed: int) -> set[str]:
    """Brute force: the source's rows sorted by (uniform key, id), the first k."""
    ids = [rid for rid, g in rows if g == source]
    keys = uniform_key(ids, seed)
    ranked = sorted(zip(keys.tolist(), ids, strict=True))
    return {rid for _, rid in ranked[:k]}


def _brute_targets(sizes: dict, total: int, alpha: float) -> dict:
    """The rule written out again: find the scale at which the capped shares add up to the total
    (sources whose share reaches their size keep everything), then largest remainder."""
    budget = min(total, sum(sizes.values()))
    full: set = set()
    while True:
        rest = budget - sum(sizes[g] for g in full)
        weights = {g: n**alpha for g, n in sizes.items() if g not in full}
        share = {g: rest * w / sum(weights.values()) for g, w in weights.items()}
        newly = {g for g, s in share.items() if s >= sizes[g]}
        if not newly:
            break
        full |= newly
    out = {g: sizes[g] for g in full}
    out.update({g: int(s) for g, s in share.items()})
    missing = budget - sum(out.values())
    by_remainder = sorted(
        share, key=lambda g: (-(share[g] - int(share[g])), -sizes[g], g is None, g or "")
    )
    for g in by_remainder[:missing]:
        out[g] += 1
    return out


# ---- targets ---------------------------------------------------------------------------------


def test_tempered_targets_match_the_hand_computation_and_cap_small_sources():
    # sqrt sizes 2.236, 6.325, 14.142: a's share 9.85 is over its 5 rows, so it keeps 5 and the
    # other 95 go 29.36 / 65.64 to b and c; c has the larger remainder and takes the last row.
    assert tempered_targets(SIZES, 100, 0.5) == {"a": 5, "b": 29, "c": 66}
    assert tempered_targets(SIZES, 1000, 0.5) == SIZES  # more asked than there is: everything
    assert tempered_targets(SIZES, 0, 0.5) == {"a": 0, "b": 0, "c": 0}
    # equal remainders and sizes: the last row goes by name
    assert tempered_targets({"x": 3, "y": 3, "z": 3}, 7, 0.0) == {"x": 3, "y": 2, "z": 2}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_tempered_targets_add_up_exactly_and_equal_the_brute_force_rule(alpha):
    rng = np.random.default_rng(3)
    for trial in range(200):
        sizes = {f"s{i}": int(n) for i, n in enumerate(rng.integers(1, 5000, rng.integers(1, 9)))}
        if trial % 3 == 0:
            sizes[None] = int(rng.integers(1, 50))
        total = int(rng.integers(1, sum(sizes.values()) + 100))
        got = tempered_targets(sizes, total, alpha)
        assert sum(got.values()) == min(total, sum(sizes.values()))
        assert all(0 <= got[g] <= sizes[g] for g in sizes)
        assert got == _brute_targets(sizes, total, alpha)


def test_cap_then_sampling_shares_the_capped_sizes():
    # capped sizes 5, 30, 30; sqrt shares of 40: 6.8 (over 5), then 35 split evenly: 17.5 each;
    # b and c tie on remainder and on capped size, so the last row goes to b by name.
    targets = balance_targets(SIZES, cap=30, total=40, alpha=0.5)
    assert targets == {"a": (5, 5), "b": (30, 18), "c": (30, 17)}


# ---- through Ray -----------------------------------------------------------------------------


def test_cap_keeps_exactly_the_smallest_keys_of_each_source(ray_session):
    rows = _rows(SIZES, nulls=45)
    got = _run(Balance(cap=30, seed=11), rows)
    kept = {rid for rid, r in got.items() if r is None}
    expected = set()
    for source, size in [*SIZES.items(), (None, 45)]:
        expected |= _smallest(rows, source, min(size, 30), seed=11)
    assert kept == expected
    counts = {g: sum(1 for rid, s in rows if s == g and rid in kept) for g in [*SIZES, None]}
    assert counts == {"a": 5, "b": 30, "c": 30, None: 30}
    assert got[next(r for r, s in rows if s == "c" and r not in kept)] == (
        "balance: over source cap (source c: 30 of 200 kept, cap 30)"
    )
    assert got[next(r for r, s in rows if s is None and r not in kept)] == (
        "balance: over source cap (source <null>: 30 of 45 kept, cap 30)"
    )


def test_tempered_sampling_keeps_each_sources_target_of_smallest_keys(ray_session):
    sizes = {"a": 5, "b": 40, "c": 200, "d": 1000}
    rows = _rows(sizes, nulls=12)
    full = {**sizes, None: 12}
    targets = _brute_targets(full, 150, 0.5)
    got = _run(Balance(total=150, seed=2), rows)
    kept = {rid for rid, r in got.items() if r is None}
    assert len(kept) == 150
    for source, n in targets.items():
        assert kept & {rid for rid, s in rows if s == source} == _smallest(rows, source, n, 2)
    assert got[next(r for r, s in rows if s == "d" and r not in kept)] == (
        f"balance: not sampled (source d: {targets['d']} of 1,000 kept, alpha 0.5)"
    )
    other = _run(Balance(total=150, seed=3), rows)
    kept3 = {rid for rid, r in other.items() if r is None}
    assert kept3 != kept
    for source, n in targets.items():
        assert sum(1 for rid, s in rows if s == source and rid in kept3) == n


def test_cap_and_sampling_name_the_rule_each_rejected_row_failed(ray_session):
    rows = _rows(SIZES)
    got = _run(Balance(cap=30, total=40, seed=5), rows)
    targets = balance_targets(SIZES, cap=30, total=40)
    for source, (cap_k, final_k) in targets.items():
        in_cap = _smallest(rows, source, cap_k, 5)
        sampled = _smallest(rows, source, final_k, 5)
        size = SIZES[source]
        for rid, s in rows:
            if s != source:
                continue
            if rid in sampled:
                assert got[rid] is None
            elif rid in in_cap:
                assert got[rid] == (
                    f"balance: not sampled (source {s}: {final_k} of {size} kept, alpha 0.5)"
                )
            else:
                assert got[rid] == (
                    f"balance: over source cap (source {s}: {final_k} of {size} kept, cap 30)"
                )


def test_brackets_that_miss_are_widened_until_exact(ray_session, monkeypatch):
    monkeypatch.setattr(balance_mod, "MARGIN", 1e-3)  # first brackets too narrow to hold a row
    margins = []
    bracket = balance_mod._bracket

    def recording(rank, n, margin):
        margins.append(margin)
        return bracket(rank, n, margin)

    monkeypatch.setattr(balance_mod, "_bracket", recording)
    rows = _rows({"b": 40, "c": 200})
    got = _run(Balance(cap=17, seed=4), rows, blocks=3)
    kept = {rid for rid, r in got.items() if r is None}
    assert kept == _smallest(rows, "b", 17, 4) | _smallest(rows, "c", 17, 4)
    assert margins[0] == 1e-3 and max(margins) > 1e-3  # it did miss, and widened


def test_a_source_sampled_to_zero_rows_loses_them_all(ray_session):
    rows = _rows({"big": 300, "tiny": 1})
    got = _run(Balance(total=10, alpha=1.0), rows)  # tiny's share 0.03 rounds down to 0
    assert got["tiny-0000"] == "balance: not sampled (source tiny: 0 of 1 kept, alpha 1)"
    assert sum(r is None for r in got.values()) == 10


# ---- keep frequencies ------------------------------------------------------------------------


def test_each_row_is_kept_about_as_often_as_its_sources_share_over_seeds():
    """Pure Python reference (the same keys and targets, no Ray): over 400 seeds a row of source
    d is kept in about n_d / size_d of them. Binomial spread: 5 standard deviations."""
    sizes = {"a": 5, "b": 40, "c": 200}
    rows = _rows(sizes)
    targets = tempered_targets(sizes, 60, 0.5)
    seeds = 400
    kept_times = dict.fromkeys((rid for rid, _ in rows), 0)
    for seed in range(seeds):
        for source, n in targets.items():
            for rid in _smallest(rows, source, n, seed):
                kept_times[rid] += 1
    for rid, source in rows:
        p = targets[source] / sizes[source]
        tolerance = 5 * math.sqrt(p * (1 - p) / seeds) + 1e-9
        assert abs(kept_times[rid] / seeds - p) <= tolerance, (rid, kept_times[rid], p)


# ---- parameters and the runner ---------------------------------------------------------------


def test_bad_parameters_fail_before_any_run():
    for bad in [
        {"cap": -1},
        {"total": -5},
        {"total": 10, "alpha": -0.5},
        {"total": 10, "alpha": float("nan")},
        {"cap": 0, "total": 0},
        {"cap": 3, "source_column": " "},
    ]:
        with pytest.raises(ValueError, match="balance"):
            Balance(**bad)


def test_runner_balances_and_accounts_for_every_row(ray_session, tmp_path):
    sizes = {"coco": 12, "vqav2": 90, "ocr": 3}
    rows = [{"id": rid, "caption": f"text {rid}", "source": g} for rid, g in _rows(sizes, nulls=4)]
    pool = tmp_path / "pool"
    pool.mkdir()
    for s in range(3):
        pq.write_table(rows_to_table(rows[s::3]), pool / f"shard-{s}.parquet")
    pipe = Pipeline("t", [Balance(cap=20), Balance(total=24, seed=1, stage_name="sample_mix")])
    out = tmp_path / "out"
    Runner(pipe, str(pool), str(out), input_format="parquet", progress=False).run()

    pairs = [(r["id"], r["source"]) for r in rows]
    capped = set(table(out / "01-balance").column("id").to_pylist())
    dropped = rejected_reasons(out / "01-balance")
    assert len(capped) + len(dropped) == len(rows)
    assert capped == set().union(
        *(_smallest(pairs, g, min(n, 20), 0) for g, n in [*sizes.items(), (None, 4)])
    )
    assert set(dropped.values()) == {
        "balance: over source cap (source vqav2: 20 of 90 kept, cap 20)"
    }

    after_cap = {"coco": 12, "vqav2": 20, "ocr": 3, None: 4}
    targets = _brute_targets(after_cap, 24, 0.5)
    final = table(out / "02-sample_mix")
    sampled = rejected_reasons(out / "02-sample_mix")
    assert final.num_rows == 24 and final.num_rows + len(sampled) == len(capped)
    remaining = [(rid, g) for rid, g in pairs if rid in capped]
    assert set(final.column("id").to_pylist()) == set().union(
        *(_smallest(remaining, g, n, 1) for g, n in targets.items())
    )
    # a renamed instance names itself in its reasons
    assert all(r.startswith("sample_mix: not sampled (source ") for r in sampled.values())
