"""SemDedup against brute force written here: full n x n similarities, explicit loops, a plain
union-find. Clusters are random unit vectors with planted near-duplicate groups whose noise puts
some pairs just above and some just below the thresholds, exact copies, and tied cos_to_centroid."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest

import warren.stages.cluster_dedup as cluster_dedup_module
from warren.stages.base import GlobalContext
from warren.stages.schema import REJECT_COLUMN
from warren.stages.semdedup import (
    SemDedup,
    SemDedupParams,
    components_cluster,
    dedup_cluster_table,
    processing_order,
    semdedup_cluster,
    union_pairs,
)

DIM = 24
EPS = 0.07
THRESHOLD = 0.86
# No pair of distinct items may lie this close to a threshold: float32 blockwise and float64
# brute force then agree on every decision.
MARGIN = 2e-4


@dataclasses.dataclass
class Cluster:
    emb: np.ndarray  # (n, DIM) float16, as stored in `image_emb`
    cos: np.ndarray  # (n,) float32 cos_to_centroid
    ids: list[str]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_cluster(
    seed: int, n_background: int = 30, n_groups: int = 6, copies: int = 4, round_cos: int = 0
) -> Cluster:
    """Background items around a centroid, plus groups of noisy copies (noise levels spanning both
    thresholds) and one exact copy per group. `round_cos` rounds cos_to_centroid to that many
    decimals, which ties many items."""
    rng = np.random.default_rng(seed)
    centroid = unit(rng.normal(size=DIM))

    def around(base: np.ndarray, spread: float | np.ndarray, k: int) -> np.ndarray:
        noise = rng.normal(size=(k, DIM)) / math.sqrt(DIM)
        return unit(base + np.reshape(spread, (-1, 1)) * noise)

    items = [around(centroid, 1.2, n_background)]
    for _ in range(n_groups):
        base = around(centroid, 1.2, 1)[0]
        items.append(base[None, :])
        items.append(around(base, rng.uniform(0.2, 1.0, size=copies), copies))
        items.append(base[None, :])  # an exact copy
    emb = np.concatenate(items).astype(np.float16)
    cos = (unit(emb.astype(np.float64)) @ centroid).astype(np.float32)
    if round_cos:
        cos = np.round(cos, round_cos).astype(np.float32)
    n = len(emb)
    shuffle = rng.permutation(n)
    ids = [f"s{k:03d}" for k in rng.permutation(n)]
    return Cluster(emb[shuffle], cos[shuffle], [ids[i] for i in shuffle])


def brute_sims(emb: np.ndarray) -> np.ndarray:
    x = unit(emb.astype(np.float64))
    return x @ x.T


def assert_clear_of(cluster: Cluster, *thresholds: float) -> None:
    sims = brute_sims(cluster.emb)
    off = sims[~np.eye(len(sims), dtype=bool)]
    for t in thresholds:
        assert np.abs(off - t).min() > MARGIN, f"test data has a pair within {MARGIN} of {t}"
    assert (off > THRESHOLD).any() and (off < 1 - EPS).any()


CLUSTER = make_cluster(seed=1)
TIED = make_cluster(seed=2, n_background=12, n_groups=4, round_cos=1)
CLUSTERS = {"planted": CLUSTER, "tied_cos": TIED}


@pytest.fixture(scope="module", autouse=True)
def data_is_clear_of_thresholds():
    for cluster in CLUSTERS.values():
        assert_clear_of(cluster, 1 - EPS, THRESHOLD)
    # some duplicates are just above and some just below each threshold
    off = brute_sims(CLUSTER.emb)[~np.eye(len(CLUSTER.ids), dtype=bool)]
    for t in (1 - EPS, THRESHOLD):
        assert ((off > t) & (off < t + 0.03)).any() and ((off < t) & (off > t - 0.03)).any()
    assert len(set(TIED.cos.tolist())) < len(TIED.ids) // 2  # many exact cos ties


# ---------------------------------------------------------------------------------------------
# brute force


def brute_semdedup(cluster: Cluster, order: list[int], eps: float = EPS):
    """{id: reason} for removed items and max cos to earlier items (NaN for the first)."""
    sims = brute_sims(cluster.emb)
    ids = cluster.ids
    reasons, max_cos = {}, np.full(len(ids), np.nan)
    for k, i in enumerate(order):
        earlier = order[:k]
        if not earlier:
            continue
        best = max(sims[i, j] for j in earlier)
        named = next(j for j in earlier if sims[i, j] >= best - 1e-5)
        max_cos[i] = best
        if best > 1 - eps:
            reasons[ids[i]] = f"semdedup: duplicate (of {ids[named]}, cos {best:.3f})"
    return reasons, max_cos


def centroid_order(cluster: Cluster, keep: str) -> list[int]:
    sign = 1 if keep == "hard" else -1
    return sorted(range(len(cluster.ids)), key=lambda i: (sign * cluster.cos[i], cluster.ids[i]))


def brute_components(cluster: Cluster, threshold: float = THRESHOLD) -> list[list[int]]:
    sims = brute_sims(cluster.emb)
    n = len(cluster.ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i):
            if sims[i, j] > threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def brute_keep(cluster: Cluster, members: list[int], keep: str) -> int:
    cos, ids = cluster.cos, cluster.ids
    if keep == "far":
        return min(members, key=lambda i: (cos[i], ids[i]))
    if keep == "near":
        return min(members, key=lambda i: (-cos[i], ids[i]))
    ordered = sorted(members, key=lambda i: (cos[i], ids[i]))
    return ordered[(len(ordered) - 1) // 2]


def component_reasons(cluster: Cluster, kept_of: dict[int, int], components) -> dict[str, str]:
    reasons = {}
    for members in components:
        kept = kept_of[id(members)]
        for i in members:
            if i != kept:
                reasons[cluster.ids[i]] = (
                    f"semdedup: duplicate (of {cluster.ids[kept]}, "
                    f"cos {pair_cos(cluster, i, kept):.3f}, component of {len(members)})"
                )
    return reasons


def pair_cos(cluster: Cluster, i: int, j: int) -> float:
    a, b = (np.asarray(cluster.emb[k], dtype=np.float64) for k in (i, j))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------
# the stage's per-cluster function on Arrow tables


def to_table(cluster: Cluster, cluster_id: int = 0, missing: tuple[int, ...] = ()) -> pa.Table:
    n = len(cluster.ids)
    mask = np.zeros(n, dtype=bool)
    mask[list(missing)] = True
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(cluster.emb.reshape(-1), type=pa.float16()), DIM, mask=pa.array(mask)
    )
    return pa.table(
        {
            "id": pa.array(cluster.ids, pa.string()),
            "image_emb": emb,
            "cluster_id": pa.array(np.full(n, cluster_id), pa.int64()),
            "cos_to_centroid": pa.array(cluster.cos, pa.float32()),
        }
    )


def decide(table: pa.Table, **params) -> tuple[dict[str, str], dict[str, object]]:
    """({id: reason} of rejected rows, {id: statistic}) from the per-cluster Arrow function."""
    p = SemDedupParams(**params)
    SemDedup(p)  # validates
    out = dedup_cluster_table(table, p)
    assert out.num_rows == table.num_rows
    stat = "max_cos_earlier" if p.rule == "semdedup" else "component_size"
    ids = out.column("id").to_pylist()
    reasons = dict(zip(ids, out.column(REJECT_COLUMN).to_pylist(), strict=True))
    stats = dict(zip(ids, out.column(stat).to_pylist(), strict=True))
    return {k: v for k, v in reasons.items() if v is not None}, stats


def shuffled(table: pa.Table, seed: int = 9) -> pa.Table:
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


@pytest.mark.parametrize("block_size", [7, 4096])
@pytest.mark.parametrize("keep", ["hard", "easy"])
@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_semdedup_removes_what_brute_force_removes_in_centroid_order(name, keep, block_size):
    cluster = CLUSTERS[name]
    want, want_max = brute_semdedup(cluster, centroid_order(cluster, keep))
    assert 0 < len(want) < len(cluster.ids)
    for table in (to_table(cluster), shuffled(to_table(cluster))):
        got, stats = decide(table, rule="semdedup", keep=keep, block_size=block_size)
        assert got == want
        got_max = np.array([stats[i] if stats[i] is not None else np.nan for i in cluster.ids])
        np.testing.assert_allclose(got_max, want_max, atol=1e-5)
        assert sum(v is None for v in stats.values()) == 1  # the first item has no earlier one


def test_semdedup_is_the_default_rule_and_keeps_hard_items():
    got, _ = decide(to_table(CLUSTER), block_size=7)
    want, _ = brute_semdedup(CLUSTER, centroid_order(CLUSTER, "hard"))
    assert got == want


@pytest.mark.parametrize("block_size", [7, 4096])
def test_semdedup_random_order_is_seeded_and_matches_brute_force_in_that_order(block_size):
    cluster = CLUSTER
    n = len(cluster.ids)
    order = processing_order(cluster.cos, cluster.ids, "random", seed=3, cluster_id=5).tolist()
    assert sorted(order) == list(range(n))
    # the order depends on ids and seed, not on the order rows arrive in
    perm = np.random.default_rng(0).permutation(n)
    again = processing_order(cluster.cos[perm], [cluster.ids[i] for i in perm], "random", 3, 5)
    assert [cluster.ids[perm[i]] for i in again] == [cluster.ids[i] for i in order]
    other = processing_order(cluster.cos, cluster.ids, "random", seed=4, cluster_id=5).tolist()
    assert other != order
    other_cluster = processing_order(cluster.cos, cluster.ids, "random", seed=3, cluster_id=6)
    assert other_cluster.tolist() != order

    want, _ = brute_semdedup(cluster, order)
    table = to_table(cluster, cluster_id=5)
    for t in (table, shuffled(table)):
        got, _ = decide(t, rule="semdedup", keep="random", seed=3, block_size=block_size)
        assert got == want


def test_semdedup_eps_moves_the_cut():
    for eps in (0.03, 0.15):
        assert_clear_of(CLUSTER, 1 - eps)
        want, _ = brute_semdedup(CLUSTER, centroid_order(CLUSTER, "hard"), eps=eps)
        got, _ = decide(to_table(CLUSTER), eps=eps, block_size=7)
        assert got == want
    loose, _ = decide(to_table(CLUSTER), eps=0.15)
    tight, _ = decide(to_table(CLUSTER), eps=0.03)
    assert set(tight) < set(loose)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("block_size", [7, 4096])
@pytest.mark.parametrize("keep", ["middle", "far", "near"])
@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_components_keep_the_brute_force_choice_of_each_component(
    name, keep, block_size, bf16, monkeypatch
):
    monkeypatch.setattr(cluster_dedup_module, "bf16_is_faster", lambda: bf16)
    cluster = CLUSTERS[name]
    components = brute_components(cluster)
    sizes = {len(m) for m in components}
    assert any(k > 1 and k % 2 == 0 for k in sizes) and any(k > 1 and k % 2 for k in sizes)
    kept_of = {id(m): brute_keep(cluster, m, keep) for m in components}
    want = component_reasons(cluster, kept_of, components)
    size = {cluster.ids[i]: len(m) for m in components for i in m}
    for table in (to_table(cluster), shuffled(to_table(cluster))):
        got, stats = decide(table, rule="components", keep=keep, block_size=block_size)
        assert got == want
        assert stats == size


def test_components_keep_middle_is_the_default():
    got, _ = decide(to_table(TIED), rule="components", block_size=7)
    want, _ = decide(to_table(TIED), rule="components", keep="middle")
    assert got == want


@pytest.mark.parametrize("block_size", [7, 4096])
def test_components_random_keeps_one_seeded_member_of_each_component(block_size):
    cluster = CLUSTER
    components = brute_components(cluster)
    table = to_table(cluster, cluster_id=2)

    def kept_sets(seed: int, t: pa.Table) -> dict[frozenset, str]:
        got, _ = decide(t, rule="components", keep="random", seed=seed, block_size=block_size)
        out = {}
        for members in components:
            names = {cluster.ids[i] for i in members}
            survivors = names - set(got)
            assert len(survivors) == 1
            (kept,) = survivors
            k = cluster.ids.index(kept)
            for i in members:
                if cluster.ids[i] != kept:
                    assert got[cluster.ids[i]] == (
                        f"semdedup: duplicate (of {kept}, cos {pair_cos(cluster, i, k):.3f}, "
                        f"component of {len(members)})"
                    )
            out[frozenset(names)] = kept
        assert set(got) == {cluster.ids[i] for m in components for i in m} - set(out.values())
        return out

    first = kept_sets(0, table)
    assert kept_sets(0, shuffled(table)) == first
    assert any(kept_sets(seed, table) != first for seed in (1, 2))


def exact_ties() -> Cluster:
    """Four identical vectors with identical cos_to_centroid, ids out of order, and a stranger."""
    rng = np.random.default_rng(7)
    v = unit(rng.normal(size=DIM))
    stranger = unit(rng.normal(size=DIM))
    emb = np.stack([v, v, v, v, stranger]).astype(np.float16)
    cos = np.array([0.5, 0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    return Cluster(emb, cos, ["d", "b", "a", "c", "e"])


@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
def test_exact_copies_with_tied_cos_keep_the_first_by_id(keep):
    cluster = exact_ties()
    order = processing_order(cluster.cos, cluster.ids, keep, seed=0, cluster_id=0)
    if keep != "random":
        assert [cluster.ids[i] for i in order] == ["a", "b", "c", "d", "e"]
    first = next(cluster.ids[i] for i in order if cluster.ids[i] != "e")
    got, _ = decide(to_table(cluster), keep=keep, block_size=2)
    assert got == {k: f"semdedup: duplicate (of {first}, cos 1.000)" for k in "abcd" if k != first}


@pytest.mark.parametrize(("keep", "kept"), [("middle", "b"), ("far", "a"), ("near", "a")])
def test_exact_copies_with_tied_cos_keep_by_id_in_components(keep, kept):
    got, stats = decide(to_table(exact_ties()), rule="components", keep=keep, block_size=3)
    assert got == {
        k: f"semdedup: duplicate (of {kept}, cos 1.000, component of 4)"
        for k in "abcd"
        if k != kept
    }
    assert stats == {"a": 4, "b": 4, "c": 4, "d": 4, "e": 1}


def test_middle_of_an_odd_component_is_its_median_cos_and_near_far_its_ends():
    rng = np.random.default_rng(11)
    v = unit(rng.normal(size=DIM))
    emb = np.stack([v] * 5).astype(np.float16)
    cos = np.array([0.3, 0.1, 0.5, 0.2, 0.4], dtype=np.float32)
    cluster = Cluster(emb, cos, ["p", "q", "r", "s", "t"])
    for keep, kept in (("middle", "p"), ("far", "q"), ("near", "r")):
        got, _ = decide(to_table(cluster), rule="components", keep=keep)
        assert set("pqrst") - set(got) == {kept}


@pytest.mark.parametrize("rule", ["semdedup", "components"])
def test_a_cluster_of_one_keeps_its_item(rule):
    cluster = Cluster(CLUSTER.emb[:1], CLUSTER.cos[:1], CLUSTER.ids[:1])
    got, stats = decide(to_table(cluster), rule=rule, block_size=7)
    assert got == {}
    assert stats == {CLUSTER.ids[0]: None if rule == "semdedup" else 1}


@pytest.mark.parametrize("rule", ["semdedup", "components"])
def test_a_cluster_with_no_rows_gives_no_rows(rule):
    empty = to_table(CLUSTER).slice(0, 0)
    out = dedup_cluster_table(empty, SemDedupParams(rule=rule))
    assert out.num_rows == 0
    assert REJECT_COLUMN in out.column_names
    assert ("max_cos_earlier" if rule == "semdedup" else "component_size") in out.column_names
    x = np.zeros((0, DIM), np.float16)
    assert semdedup_cluster(x, np.zeros(0), []).removed.shape == (0,)
    assert components_cluster(x, np.zeros(0), []).removed.shape == (0,)


@pytest.mark.parametrize("rule", ["semdedup", "components"])
def test_rows_without_embedding_are_rejected_and_ignored_by_the_rest(rule):
    table = to_table(TIED)
    missing = (0, 5, 9)
    with_missing = to_table(TIED, missing=missing)
    rest = [i for i in range(len(TIED.ids)) if i not in missing]
    got, stats = decide(with_missing, rule=rule, block_size=7)
    want, want_stats = decide(table.take(rest), rule=rule, block_size=7)
    for i in missing:
        assert got.pop(TIED.ids[i]) == "semdedup: missing embedding"
        assert stats.pop(TIED.ids[i]) is None
    assert got == want
    assert stats == want_stats


def test_rows_without_cos_to_centroid_are_rejected_as_missing_cluster():
    table = to_table(TIED)
    cos = np.array(table.column("cos_to_centroid").to_pylist(), dtype=object)
    cos[2] = None
    table = table.set_column(3, "cos_to_centroid", pa.array(cos.tolist(), pa.float32()))
    got, _ = decide(table, block_size=7)
    assert got[TIED.ids[2]] == "semdedup: missing cluster (no cluster_id or cos_to_centroid)"


def test_similarity_is_computed_in_tiles_of_at_most_block_size_over_the_lower_triangle(
    monkeypatch,
):
    shapes = []
    real = cluster_dedup_module.similarity_tile
    monkeypatch.setattr(cluster_dedup_module, "bf16_is_faster", lambda: False)  # float32 tiles

    def recording(a, b):
        shapes.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(cluster_dedup_module, "similarity_tile", recording)
    n = len(CLUSTER.ids)
    for rule in ("semdedup", "components"):
        shapes.clear()
        decide(to_table(CLUSTER), rule=rule, block_size=7)
        assert shapes and max(max(s) for s in shapes) <= 7
        assert sum(a * b for a, b in shapes) <= n * (n + 7) / 2


def _brute_labels(x: np.ndarray, threshold: float) -> list[int]:
    """Smallest member of each row's component, pairs linked on their float64 cosine."""
    x64 = x.astype(np.float64)
    n = len(x)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i):
            if float(x64[i] @ x64[j]) > threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(n)]


@pytest.mark.parametrize("screen", ["float32", "bf16", "device"])
def test_pairs_a_hair_from_the_threshold_link_as_their_float64_cosine_says(screen):
    """Pairs within 1e-7 to 1e-3 of the threshold (closer than a bf16 or float32 tile can tell),
    and a clump where every pair is a candidate: the links are float64's, whatever the screen and
    the tiling. "device" is the torch path a GPU takes (`linked_on_device`), run here on the CPU;
    its clump tile has more candidates than PAIRS_ONE_BY_ONE, so both ways of deciding run."""
    from warren.stages.cluster_dedup import linked_components, linked_on_device

    rng = np.random.default_rng(8)
    d = 64
    rows = []
    for _ in range(60):  # pairs at cos = THRESHOLD + delta
        a = unit(rng.normal(size=d))
        ortho = unit(rng.normal(size=d) - (rng.normal(size=d) @ a) * a)
        ortho = unit(ortho - (ortho @ a) * a)
        cos = THRESHOLD + rng.choice([-1, 1]) * 10 ** rng.uniform(-7, -3)
        rows += [a, cos * a + math.sqrt(1 - cos**2) * ortho]
    clump = unit(rng.normal(size=d))
    rows += list(unit(clump + 0.02 * rng.normal(size=(70, d))))
    rows += list(unit(rng.normal(size=(50, d))))
    x = np.asarray(rows, dtype=np.float32)[rng.permutation(len(rows))]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    want = _brute_labels(x, THRESHOLD)
    assert len(set(want)) < len(x) - 60, "the clump and some pairs must link"
    for block_size in (5, 64, 1000):
        if screen == "device":
            got = linked_on_device(x, THRESHOLD, block_size, "cpu")
        else:
            got = linked_components(x, THRESHOLD, block_size, screen=screen)
        assert got.tolist() == want, block_size


def test_union_pairs_agrees_with_a_simple_union_find():
    rng = np.random.default_rng(4)
    n = 200
    parent = np.arange(n)
    simple = list(range(n))

    def find(i: int) -> int:
        while simple[i] != i:
            i = simple[i]
        return i

    for _ in range(5):  # several batches, as tiles arrive
        a, b = rng.integers(0, n, size=(2, 60))
        union_pairs(parent, a, b)
        for i, j in zip(a, b, strict=True):
            simple[find(i)] = find(j)
    assert np.array_equal(parent[parent], parent)
    for i in range(n):
        for j in range(0, n, 17):
            assert (parent[i] == parent[j]) == (find(i) == find(j))
        assert parent[i] == min(k for k in range(n) if find(k) == find(i))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"eps": 0.0}, "eps must be in"),
        ({"eps": 1.0}, "eps must be in"),
        ({"threshold": 1.0}, "threshold must be in"),
        ({"threshold": -1.5}, "threshold must be in"),
        ({"rule": "minhash"}, "rule must be one of"),
        ({"keep": "middle"}, "keep must be"),
        ({"rule": "components", "keep": "hard"}, "keep must be"),
        ({"keep": "sideways"}, "keep must be"),
        ({"block_size": 0}, "block_size must be"),
        ({"column": ""}, "column must"),
    ],
)
def test_invalid_params_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        SemDedup(**params)


def test_a_table_without_cluster_columns_names_the_missing_column():
    table = to_table(CLUSTER).drop_columns(["cos_to_centroid"])
    with pytest.raises(ValueError, match="cos_to_centroid.*clustering stage"):
        dedup_cluster_table(table, SemDedupParams())


# ---------------------------------------------------------------------------------------------
# through Ray


def test_stage_through_ray_returns_every_row_and_rejects_the_brute_force_duplicates(ray_session):
    import ray

    single = Cluster(TIED.emb[:1], TIED.cos[:1], ["solo"])
    tables = [to_table(CLUSTER, 0, missing=(3,)), to_table(single, 1), to_table(TIED, 3)]
    table = pa.concat_tables(tables)
    table = table.take(np.random.default_rng(1).permutation(table.num_rows))
    n = table.num_rows
    ctx = GlobalContext(num_rows=n, num_shards=2, num_cpus=2)
    ds = ray.data.from_arrow([table.slice(0, n // 3), table.slice(n // 3)])

    planted = Cluster(
        np.delete(CLUSTER.emb, 3, axis=0),
        np.delete(CLUSTER.cos, 3),
        CLUSTER.ids[:3] + CLUSTER.ids[4:],
    )
    want = {CLUSTER.ids[3]: "semdedup: missing embedding"}
    for cluster in (planted, TIED):
        want.update(brute_semdedup(cluster, centroid_order(cluster, "hard"))[0])

    out = SemDedup(block_size=7).run(ds, ctx).materialize()
    schema = out.schema().base_schema
    assert schema.field("image_emb").type == pa.list_(pa.float16(), DIM)
    assert schema.field("max_cos_earlier").type == pa.float32()
    rows = out.select_columns(["id", "max_cos_earlier", REJECT_COLUMN]).take_all()
    assert len(rows) == n
    assert sorted(r["id"] for r in rows) == sorted(table.column("id").to_pylist())
    assert {r["id"]: r[REJECT_COLUMN] for r in rows if r[REJECT_COLUMN]} == want
    first = [r["id"] for r in rows if r["max_cos_earlier"] is None]
    assert "solo" in first and len(first) == 4  # one per cluster, plus the missing embedding

    want = {CLUSTER.ids[3]: "semdedup: missing embedding"}
    for cluster in (planted, TIED):
        components = brute_components(cluster)
        kept_of = {id(m): brute_keep(cluster, m, "middle") for m in components}
        want.update(component_reasons(cluster, kept_of, components))
    out = SemDedup(rule="components").run(ds, ctx).materialize()
    assert out.schema().base_schema.field("component_size").type == pa.int64()
    rows = out.select_columns(["id", "component_size", REJECT_COLUMN]).take_all()
    assert len(rows) == n
    assert {r["id"]: r["component_size"] for r in rows}["solo"] == 1
    assert {r["id"]: r[REJECT_COLUMN] for r in rows if r[REJECT_COLUMN]} == want


def test_a_gpu_is_shared_evenly_among_a_task_per_cpu_and_semdedup_asks_for_its_share(monkeypatch):
    def ctx(cpus: float, gpus: float) -> GlobalContext:
        return GlobalContext(num_rows=10, num_shards=1, num_cpus=cpus, num_gpus=gpus)

    assert ctx(2, 0).gpu_share() == 0.0
    assert ctx(16, 2).gpu_share() == 0.125
    assert ctx(4, 8).gpu_share() == 1.0  # a task never holds more than one GPU
    seen = {}

    def fake_map_groups(ds, key, fn, fn_args, **kw):
        seen[fn_args[0].rule] = kw["num_gpus"]

    monkeypatch.setattr("warren.stages.semdedup.map_groups", fake_map_groups)
    SemDedup(rule="components").run(None, ctx(16, 2))
    SemDedup(rule="semdedup").run(None, ctx(16, 2))
    # Only the components rule has a GPU path (its pair screen); the eps rule runs on CPUs.
    assert seen == {"components": 0.125, "semdedup": 0.0}
