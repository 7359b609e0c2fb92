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

import warren.stages.balance as balance_mod
import warren.stages.concept_balance as concept_mod
import warren.stages.group_select as group_select_mod
from warren.pipelines.runner import Pipeline, Runner
from warren.stages.balance import Balance, balance_targets, tempered_targets
from warren.stages.base import GlobalContext
from warren.stages.concept_balance import ConceptBalance
from warren.stages.schema import rows_to_table
from warren.stages.select import uniform_key

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
    monkeypatch.setattr(group_select_mod, "MARGIN", 1e-3)  # first brackets too narrow to hold a row
    margins = []
    bracket = group_select_mod._bracket

    def recording(rank, n, margin):
        margins.append(margin)
        return bracket(rank, n, margin)

    monkeypatch.setattr(group_select_mod, "_bracket", recording)
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


# ---- per-source caps and weights -------------------------------------------------------------


def _brute_weighted(sizes: dict, total: int, alpha: float, weights: dict) -> dict:
    """Weighted shares by bisection on the scale c (group g keeps min(size, c w s^alpha)), then
    largest remainder: an independent way to the same rule as water-filling."""
    live = {g: n for g, n in sizes.items() if n and weights.get(g, 1.0) > 0}
    budget = min(total, sum(live.values()))
    raw = {g: weights.get(g, 1.0) * n**alpha for g, n in live.items()}
    lo, hi = 0.0, 1.0
    while sum(min(n, hi * raw[g]) for g, n in live.items()) < budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(n, mid * raw[g]) for g, n in live.items()) < budget:
            lo = mid
        else:
            hi = mid
    share = {g: min(n, hi * raw[g]) for g, n in live.items()}
    out = {g: 0 for g in sizes}
    out.update({g: (n if share[g] >= n - 1e-9 else int(share[g])) for g, n in live.items()})
    missing = budget - sum(out.values())
    partial = [g for g in live if out[g] < live[g]]
    partial.sort(key=lambda g: (-(share[g] - int(share[g])), -live[g], g is None, g or ""))
    for g in partial[:missing]:
        out[g] += 1
    return out


def test_weighted_targets_equal_the_bisection_rule():
    rng = np.random.default_rng(8)
    for _ in range(200):
        sizes = {f"s{i}": int(n) for i, n in enumerate(rng.integers(1, 3000, rng.integers(1, 7)))}
        weights = {g: float(rng.choice([0.0, 0.5, 1.0, 2.0, 3.5])) for g in sizes}
        total = int(rng.integers(1, sum(sizes.values()) + 50))
        alpha = float(rng.choice([0.0, 0.5, 1.0]))
        got = tempered_targets(sizes, total, alpha, weights)
        assert got == _brute_weighted(sizes, total, alpha, weights), (sizes, weights, total)
        assert all(got[g] == 0 for g, w in weights.items() if w == 0)


def test_source_caps_override_the_cap_and_zero_lifts_it(ray_session):
    rows = _rows(SIZES)
    got = _run(Balance(cap=10, source_caps={"b": 25, "c": 0}, seed=6), rows)
    kept = {rid for rid, r in got.items() if r is None}
    expected = (
        _smallest(rows, "a", 5, 6) | _smallest(rows, "b", 25, 6) | _smallest(rows, "c", 200, 6)
    )
    assert kept == expected
    assert got[next(r for r, s in rows if s == "b" and r not in kept)] == (
        "balance: over source cap (source b: 25 of 40 kept, cap 25)"
    )


def test_source_weights_scale_the_sampling_shares(ray_session):
    sizes = {"a": 50, "b": 50, "c": 400}
    rows = _rows(sizes)
    weights = {"a": 3.0, "c": 0.5}
    got = _run(Balance(total=90, alpha=0.5, source_weights=weights, seed=1), rows)
    # hand: weights x sqrt(size) = 21.21, 7.07, 10.0; shares of 90: 49.87, 16.62, 23.51 (a under
    # its 50 rows); floors 49 + 16 + 23 = 88, the last 2 rows to the largest remainders, a and b.
    targets = {"a": 50, "b": 17, "c": 23}
    assert targets == _brute_weighted(sizes, 90, 0.5, weights)
    for source, n in targets.items():
        kept = {rid for rid, s in rows if s == source and got[rid] is None}
        assert kept == _smallest(rows, source, n, 1)


def test_caps_or_weights_naming_a_missing_source_fail_clearly(ray_session):
    with pytest.raises(ValueError, match=r"not in the input: \['vqa2'\]"):
        _run(Balance(source_caps={"vqa2": 5}), _rows(SIZES))
    with pytest.raises(ValueError, match="need a total"):
        Balance(source_weights={"a": 2.0})


# ---- text share ------------------------------------------------------------------------------


def _kind_rows(spec: dict) -> list[tuple[str, str, bool]]:
    """(id, source, text_only) rows from {(source, text_only): n}, interleaved."""
    rows = [
        (f"{s}-{'t' if text else 'm'}{i:04d}", s, text)
        for (s, text), n in spec.items()
        for i in range(n)
    ]
    order = np.random.default_rng(1).permutation(len(rows))
    return [rows[i] for i in order]


def _kind_run(stage, rows, blocks: int = 3) -> dict[str, str | None]:
    image = [{"bytes": b"x", "path": None}]
    tbl = pa.table(
        {
            "id": [r[0] for r in rows],
            "source": [r[1] for r in rows],
            "images": pa.array(
                [[] if r[2] else image for r in rows], rows_to_table([]).schema.field("images").type
            ),
        }
    )
    size = -(-len(rows) // blocks)
    ds = ray.data.from_arrow([tbl.slice(i, size) for i in range(0, len(rows), size)])
    out = stage.run(ds, GlobalContext(len(rows), blocks, 2)).take_all()
    assert len(out) == len(rows)
    return {r["id"]: r["_reject"] for r in out}


def _group_smallest(rows, source, text, k, seed, among=None) -> set[str]:
    ids = [
        rid for rid, s, t in rows if s == source and t == text and (among is None or rid in among)
    ]
    ranked = sorted(zip(uniform_key(ids, seed).tolist(), ids, strict=True))
    return {rid for _, rid in ranked[:k]}


def test_text_share_split_by_hand():
    assert balance_mod.text_share_split(500, 700, 0.3, 0) == (300, 700)  # 700 / 0.7 = 1000
    assert balance_mod.text_share_split(100, 700, 0.3, 0) == (100, 233)  # 100 / 0.3 = 333.3
    assert balance_mod.text_share_split(500, 700, 0.3, 801) == (240, 561)  # round(240.3)
    assert balance_mod.text_share_split(3, 70, 0.3, 0) == (3, 7)  # 3 / 0.3 = 10.000000000000002
    assert balance_mod.text_share_split(50, 70, 0.0, 0) == (0, 70)
    assert balance_mod.text_share_split(50, 70, 1.0, 20) == (20, 0)


def test_text_share_cuts_the_larger_pool_in_proportion_to_its_sources(ray_session):
    # text-only: sharegpt 300 + mix 100 = 400; multimodal: coco 500 + mix 200 = 700.
    spec = {("sharegpt", True): 300, ("mix", True): 100, ("coco", False): 500, ("mix", False): 200}
    rows = _kind_rows(spec)
    got = _kind_run(Balance(text_share=0.3, seed=4), rows)
    # N = 700 / 0.7 = 1000 -> 300 text-only rows, shared 3:1 -> sharegpt 225, mix 75
    kept = {rid for rid, r in got.items() if r is None}
    assert len(kept) == 1000
    expected = (
        _group_smallest(rows, "sharegpt", True, 225, 4)
        | _group_smallest(rows, "mix", True, 75, 4)
        | {rid for rid, _, text in rows if not text}
    )
    assert kept == expected
    assert got[next(r for r, s, t in rows if s == "sharegpt" and r not in kept)] == (
        "balance: over text share (source sharegpt, text-only: 225 of 300 kept, text share 0.3)"
    )


def test_text_share_with_total_and_caps_samples_each_pool(ray_session):
    spec = {("sharegpt", True): 300, ("mix", True): 100, ("coco", False): 500, ("mix", False): 200}
    rows = _kind_rows(spec)
    got = _kind_run(Balance(cap=250, total=400, alpha=0.5, text_share=0.25, seed=9), rows)
    # caps (per source, both kinds): sharegpt 300 -> 250, coco 500 -> 250, mix 300 -> 250
    pairs = [(rid, s) for rid, s, _ in rows]
    capped = set().union(*(_smallest(pairs, s, 250, 9) for s in ("sharegpt", "coco", "mix")))
    survivors = {}
    for rid, s, t in rows:
        if rid in capped:
            survivors[(s, t)] = survivors.get((s, t), 0) + 1
    # 400 rows with a quarter text-only: 100 text-only, 300 multimodal, sqrt-shared in each pool
    text = _brute_targets({s: n for (s, t), n in survivors.items() if t}, 100, 0.5)
    multi = _brute_targets({s: n for (s, t), n in survivors.items() if not t}, 300, 0.5)
    kept = {rid for rid, r in got.items() if r is None}
    assert len(kept) == 400
    expected = set()
    for s, n in text.items():
        expected |= _group_smallest(rows, s, True, n, 9)
    for s, n in multi.items():
        expected |= _group_smallest(rows, s, False, n, 9)
    assert kept == expected
    assert expected <= capped  # the k smallest of a pool are within its source's cap
    reasons = {r.split(" (")[0] for r in got.values() if r}
    assert reasons == {"balance: over source cap", "balance: not sampled"}


def test_text_share_on_a_pool_without_text_rows_is_an_error(ray_session):
    rows = _kind_rows({("coco", False): 20})
    with pytest.raises(ValueError, match="needs text-only rows"):
        _kind_run(Balance(text_share=0.3), rows)


# ---- concepts --------------------------------------------------------------------------------


def test_vocabulary_matches_whole_words_case_blind():
    vocab = concept_mod.parse_vocabulary("# a comment\nHot Dog\ncat\n\ncat\nnew  york city\n")
    assert vocab.entries == ("hot dog", "cat", "new york city")
    assert vocab.matches("A HOT dog, and a cat!") == {0, 1}
    assert vocab.matches("hotdogs and cats") == set()
    assert vocab.matches("New York City at night") == {2}
    assert vocab.matches("") == set()


CONCEPT_SPEC = {"cat": 400, "dog": 60, "bird": 20, "cat bird": 10, "nothing here": 15}


def _concept_rows() -> list[dict]:
    rows = []
    for words, n in CONCEPT_SPEC.items():
        for i in range(n):
            rows.append(
                {"id": f"{words.replace(' ', '_')}-{i:03d}", "caption": f"a photo: {words}"}
            )
    order = np.random.default_rng(5).permutation(len(rows))
    return [rows[i] for i in order]


def _brute_concepts(rows, cap, seed, keep_unmatched=False) -> dict[str, str | None]:
    """Counts per entry by plain word sets, p from the rarest entry, the seeded concept key."""
    entries = ["cat", "dog", "bird"]
    words = {r["id"]: set(r["caption"].replace(":", " ").split()) for r in rows}
    count = {e: sum(e in w for w in words.values()) for e in entries}
    keys = uniform_key([r["id"] for r in rows], concept_mod.sub_seed(seed, "concepts"))
    out = {}
    for r, key in zip(rows, keys.tolist(), strict=True):
        found = [e for e in entries if e in words[r["id"]]]
        if not found:
            out[r["id"]] = None if keep_unmatched else "concept_balance: no concept matched"
            continue
        rarest = min(found, key=lambda e: (count[e], entries.index(e)))
        p = min(1.0, cap / count[rarest])
        out[r["id"]] = (
            None
            if key < p
            else f"concept_balance: concept over cap (rarest entry {rarest!r}: {count[rarest]:,} rows, "
            f"cap {cap:,}, kept with p {p:.3g})"
        )
    return out


def test_concept_balancing_keeps_rows_by_their_rarest_entry(ray_session, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbird\n")
    rows = _concept_rows()
    tbl = rows_to_table([{**r, "source": "web"} for r in rows])
    ds = ray.data.from_arrow([tbl.slice(i, 200) for i in range(0, tbl.num_rows, 200)])
    out = ConceptBalance(concepts=str(vocab), concept_cap=50, seed=3).run(
        ds, GlobalContext(505, 3, 2)
    )
    got = {r["id"]: r["_reject"] for r in out.take_all()}
    assert got == _brute_concepts(rows, 50, 3)
    # bird (30 rows, under the cap) keeps every row, the 10 cat-bird rows with it; cat (410) and
    # dog (60) keep a share
    assert all(got[r["id"]] is None for r in rows if "bird" in r["caption"])
    assert 0 < sum(got[r["id"]] is None for r in rows if r["id"].startswith("cat-")) < 100
    kept = ConceptBalance(concepts=str(vocab), concept_cap=50, keep_unmatched=True, seed=3).run(
        ds, GlobalContext(505, 3, 2)
    )
    assert {r["id"]: r["_reject"] for r in kept.take_all()} == _brute_concepts(rows, 50, 3, True)


def _kept_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pa.compute.is_null(batch.column("_reject"))).drop_columns(["_reject"])


def test_concept_balancing_then_cap_ranks_only_the_rows_concepts_kept(ray_session, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbird\n")
    rows = _concept_rows()
    tbl = rows_to_table([{**r, "source": r["id"].split("-")[0]} for r in rows])
    ds = ray.data.from_arrow([tbl.slice(i, 128) for i in range(0, tbl.num_rows, 128)])
    # concept balancing, then the cap over the rows it kept (what the runner hands balance)
    marked = ConceptBalance(concepts=str(vocab), concept_cap=50, seed=3).run(
        ds, GlobalContext(505, 4, 2)
    )
    survivors = marked.map_batches(_kept_rows, batch_format="pyarrow")
    n_alive = survivors.count()
    got = {
        r["id"]: r["_reject"]
        for r in Balance(cap=20, seed=3).run(survivors, GlobalContext(n_alive, 4, 2)).take_all()
    }
    concept = _brute_concepts(rows, 50, 3)
    assert set(got) == {rid for rid, why in concept.items() if why is None}
    for source in ("cat", "dog", "bird", "cat_bird"):
        alive = [
            (r["id"], source)
            for r in rows
            if r["id"].startswith(source + "-") and concept[r["id"]] is None
        ]
        kept = {rid for rid, _ in alive if got[rid] is None}
        assert kept == _smallest(alive, source, min(20, len(alive)), 3), source


def test_concept_keep_rate_over_seeds_is_cap_over_count():
    """Pure Python, no Ray: over 300 seeds each entry keeps about sum of min(1, t / count of the
    row's rarest entry) rows; 5 standard deviations of the mean."""
    rows = _concept_rows()
    rule_counts = (410, 60, 30)  # cat, dog, bird over the rows (cat-bird rows count for both)
    vocab = concept_mod.parse_vocabulary("cat\ndog\nbird")
    tbl = pa.table({"id": [r["id"] for r in rows], "caption": [r["caption"] for r in rows]})
    seeds = 300
    kept_cat_only = []
    for seed in range(seeds):
        rule = concept_mod.ConceptRule(vocab, rule_counts, 50, seed, "auto", False)
        reasons = rule.reasons(tbl)
        kept_cat_only.append(
            sum(
                1
                for r, why in zip(rows, reasons, strict=True)
                if why is None and r["id"].startswith("cat-")
            )
        )
    p = 50 / 410
    mean = sum(kept_cat_only) / seeds
    sd = math.sqrt(400 * p * (1 - p) / seeds)
    assert abs(mean - 400 * p) <= 5 * sd, (mean, 400 * p)


def test_a_changed_vocabulary_file_changes_the_stage_fingerprint(tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\n")
    before = ConceptBalance(concepts=str(vocab), concept_cap=5).params_hash
    vocab.write_text("cat\ndog\n")
    assert ConceptBalance(concepts=str(vocab), concept_cap=5).params_hash != before
