"""The stage contract of the embedding, dedup, selection and balancing stages: the columns each
requires and adds (checked against what it writes), its threshold metadata, the provenance of a
removed duplicate as columns, and the ranks window stages write. Expected values are worked out by
hand or by sorting in plain Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray
from declared_columns import assert_adds_what_it_declares

import warren.stages.ranks as ranks_mod
from warren.pipelines.mixture import build_stages
from warren.stages.balance import Balance
from warren.stages.base import GlobalContext, Threshold
from warren.stages.clip_score import ClipScore
from warren.stages.cluster import Cluster
from warren.stages.concept_balance import ConceptBalance
from warren.stages.embed import Embed
from warren.stages.exact_dedup import ExactDedup
from warren.stages.image_based import ImageBased
from warren.stages.mixture_spec import parse_spec
from warren.stages.phash_dedup import PhashDedup, PhashDedupParams, dedup_hashed
from warren.stages.require import Require
from warren.stages.schema import embedding_type, rows_to_table
from warren.stages.select import RankWindow, Sample
from warren.stages.semdedup import SemDedup, SemDedupParams, dedup_cluster_table
from warren.stages.short_answer import ShortAnswer
from warren.stages.source_filter import SourceFilter


def _emb(rows: list[list[float] | None], dim: int = 2) -> pa.Array:
    flat = [v for r in rows for v in (r if r is not None else [0.0] * dim)]
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.array(flat, np.float16), pa.float16()),
        dim,
        mask=pa.array([r is None for r in rows]),
    )


def _run(stage, table: pa.Table, blocks: int = 3) -> pa.Table:
    size = max(1, -(-table.num_rows // blocks))
    parts = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    ctx = GlobalContext(num_rows=table.num_rows, num_shards=len(parts), num_cpus=2)
    out = stage.run_rows(ray.data.from_arrow(parts), ctx).take_all()
    return pa.Table.from_pylist(out).sort_by("id") if out else table.slice(0, 0)


def _column(out: pa.Table, name: str) -> dict:
    """{id: value of `name`} of an output table."""
    return dict(zip(out["id"].to_pylist(), out[name].to_pylist(), strict=True))


def _run_arrow(stage, table: pa.Table, blocks: int = 3) -> pa.Table:
    """As `_run`, keeping the Arrow types of the output blocks (for the schema checks)."""
    size = max(1, -(-table.num_rows // blocks))
    parts = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    ctx = GlobalContext(num_rows=table.num_rows, num_shards=len(parts), num_cpus=2)
    refs = stage.run_rows(ray.data.from_arrow(parts), ctx).to_arrow_refs()
    return pa.concat_tables(ray.get(refs), promote_options="default").sort_by("id")


# ---- required columns -------------------------------------------------------------------------


def test_required_columns_follow_the_parameters():
    assert Cluster(column="text_emb").required_columns() == ("text_emb",)
    assert ClipScore().required_columns() == ("image_emb", "text_emb")
    assert RankWindow(column="ppl").required_columns() == ("ppl",)
    assert Sample().required_columns() == ()
    assert SemDedup().required_columns() == ("image_emb", "cluster_id", "cos_to_centroid")
    assert ImageBased().required_columns() == ()  # no reference: off, reads nothing
    assert ImageBased(reference="ref.parquet").required_columns() == ("image_emb",)
    assert Require(column="near_reference").required_columns() == ("near_reference",)
    filters = {"coco": "width >= 64 AND n_images = 1", "*": "caption IS NOT NULL"}
    assert SourceFilter(filters=filters).required_columns() == ("width",)
    assert Balance(cap=5).required_columns() == ()
    assert Balance(cap=5, source_column="dataset").required_columns() == ("dataset",)
    assert Embed().required_columns() == ()
    assert Embed(text_column="original_caption").required_columns() == ("original_caption",)
    assert Embed(texts=False, text_column="original_caption").required_columns() == ()


def test_added_columns_follow_the_parameters():
    assert set(Embed(texts=False).added_columns()) == {"image_emb", "emb_model"}
    assert set(ClipScore().added_columns()) == {"clip_score"}
    assert ClipScore(lo=0.4, hi=0.6).added_columns() == {
        "clip_score": pa.float32(),
        "clip_score_rank": pa.int64(),
    }
    assert RankWindow(column="cos_to_centroid").added_columns() == {
        "cos_to_centroid_rank": pa.int64()
    }
    assert set(SemDedup(rule="components").added_columns()) == {
        "component_size",
        "duplicate_of",
        "similarity",
    }
    assert set(ExactDedup(key="pixels+caption").added_columns()) == {
        "pixel_hash",
        "caption_hash",
        "duplicate_of",
        "similarity",
    }


# ---- thresholds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (ClipScore(), []),
        (ClipScore(threshold=0.28), [Threshold("threshold", "min", "clip_score", 0.28)]),
        (
            ClipScore(lo=0.0, hi=0.3),
            [
                Threshold("lo", "rank_lo", "clip_score", 0.0, True),
                Threshold("hi", "rank_hi", "clip_score", 0.3, True),
            ],
        ),
        (
            ClipScore(threshold=0.2, lo=0.4, hi=0.6),
            [
                Threshold("threshold", "min", "clip_score", 0.2),
                Threshold("lo", "rank_lo", "clip_score", 0.4),
                Threshold("hi", "rank_hi", "clip_score", 0.6),
            ],
        ),
        (
            RankWindow(column="cos_to_centroid", lo=0.15, hi=0.35, descending=False),
            [
                Threshold("lo", "rank_lo", "cos_to_centroid", 0.15, False),
                Threshold("hi", "rank_hi", "cos_to_centroid", 0.35, False),
            ],
        ),
        (RankWindow(lo=0.0, hi=1.0), []),
        (SemDedup(eps=0.25), [Threshold("eps", "max", "max_cos_earlier", 0.75)]),
        (SemDedup(rule="components", threshold=0.9), []),
        (PhashDedup(max_distance=6), [Threshold("max_distance", "max", "phash_distance", 6.0)]),
        (ExactDedup(), []),
        (Cluster(), []),
        (Balance(cap=5, total=10), []),
        (Sample(n=5), []),
    ],
)
def test_thresholds_are_the_parameters_that_draw_lines(stage, expected):
    assert stage.thresholds() == expected
    assert stage.describe()["thresholds"] == [t.__dict__ for t in expected]


# ---- provenance of removed duplicates -----------------------------------------------------------

# One cluster, visited farthest from the centroid first (ascending cos_to_centroid): a, b, c, d.
# b is a copy of a (cosine 1); d is 0.8 from c and 0 from a and b; c is 0.6 from a and b.
CLUSTER_ROWS = {
    "a": ([1.0, 0.0], 0.1),
    "b": ([1.0, 0.0], 0.2),
    "c": ([0.6, 0.8], 0.3),
    "d": ([0.0, 1.0], 0.4),
    "e": (None, 0.5),  # no embedding: rejected for that, no provenance
}


def _cluster_table() -> pa.Table:
    ids = list(CLUSTER_ROWS)
    return pa.table(
        {
            "id": ids,
            "image_emb": _emb([CLUSTER_ROWS[i][0] for i in ids]),
            "cluster_id": pa.array([0] * len(ids), pa.int64()),
            "cos_to_centroid": pa.array([CLUSTER_ROWS[i][1] for i in ids], pa.float32()),
        }
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # eps 0.25: removed above cosine 0.75 to an earlier item: b (1.0 to a), d (0.8 to c)
        (SemDedupParams(eps=0.25), {"b": ("a", 1.0), "d": ("c", 0.8)}),
        # components above 0.7: {a, b} and {c, d}; keep "far" keeps the smaller cos_to_centroid
        (
            SemDedupParams(rule="components", threshold=0.7, keep="far"),
            {"b": ("a", 1.0), "d": ("c", 0.8)},
        ),
        # eps 0.07: only the exact copy goes
        (SemDedupParams(eps=0.07), {"b": ("a", 1.0)}),
    ],
)
def test_semdedup_writes_the_kept_row_and_the_cosine(params, expected):
    table = _cluster_table()
    out = dedup_cluster_table(table, params)
    assert_adds_what_it_declares(SemDedup(params), table.schema, out.schema)
    got = dict(zip(out["id"].to_pylist(), out["duplicate_of"].to_pylist(), strict=True))
    sim = dict(zip(out["id"].to_pylist(), out["similarity"].to_pylist(), strict=True))
    reasons = dict(zip(out["id"].to_pylist(), out["_reject"].to_pylist(), strict=True))
    assert {i: k for i, k in got.items() if k is not None} == {
        i: k for i, (k, _) in expected.items()
    }
    for i, (_, cosine) in expected.items():
        assert sim[i] == pytest.approx(cosine, abs=2e-3)  # float16 storage
        assert reasons[i].startswith(f"semdedup: duplicate (of {got[i]}, cos {cosine:.3f}")
    assert all(sim[i] is None for i in CLUSTER_ROWS if i not in expected)
    assert reasons["e"] == "semdedup: missing embedding"


def test_exact_dedup_names_the_kept_copy_with_similarity_one(ray_session):
    same, other = b"\x89PNG same bytes", b"\x89PNG other bytes"
    rows = [
        {"id": "r2", "images": [{"bytes": same, "path": None}], "caption": "x"},
        {"id": "r1", "images": [{"bytes": same, "path": None}], "caption": "y"},
        {"id": "r4", "images": [{"bytes": other, "path": None}], "caption": "z"},
        {"id": "r3", "images": [{"bytes": same, "path": None}], "caption": "w"},
    ]
    table = rows_to_table(rows)
    stage = ExactDedup()
    out = _run_arrow(stage, table, blocks=2)
    assert_adds_what_it_declares(stage, table.schema, out.schema)
    assert out["id"].to_pylist() == ["r1", "r2", "r3", "r4"]
    assert out["duplicate_of"].to_pylist() == [None, "r1", "r1", None]
    assert out["similarity"].to_pylist() == [None, 1.0, 1.0, None]
    assert out["_reject"].to_pylist() == [
        None,
        "exact_dedup: duplicate (of r1)",
        "exact_dedup: duplicate (of r1)",
        None,
    ]


def test_phash_dedup_names_the_kept_row_and_one_minus_the_bits_apart():
    # hashes planted directly: b is 3 bits from a, c far from both; keep="first" keeps a
    far = int(np.array(0xF0F0F0F0F0F0F0F0, np.uint64).view(np.int64))
    block = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "phash": pa.array([0, 0b111, far, None], pa.int64()),
            "_phash_pixels": pa.array([100, 400, 100, 0], pa.int64()),
        }
    )
    out = dedup_hashed(block, PhashDedupParams(keep="first"))
    before = pa.schema([f for f in block.schema if f.name != "phash"])
    assert_adds_what_it_declares(PhashDedup(), before, out.schema)
    assert out["duplicate_of"].to_pylist() == [None, "a", None, None]
    assert out["similarity"].to_pylist() == [None, 1 - 3 / 64, None, None]
    assert out["_reject"].to_pylist()[1] == "phash_dedup: near duplicate (of a, distance 3)"
    # keep="largest": b has the most pixels, so a goes in its favour
    largest = dedup_hashed(block, PhashDedupParams(keep="largest"))
    assert largest["duplicate_of"].to_pylist() == ["b", None, None, None]


# ---- ranks of window stages ---------------------------------------------------------------------

SCORES = {"a": 0.5, "b": 0.9, "c": 0.5, "d": None, "e": 0.1, "f": 0.7}


def _score_table() -> pa.Table:
    return pa.table(
        {"id": list(SCORES), "clip_score": pa.array(list(SCORES.values()), pa.float32())}
    )


def test_rank_window_writes_each_rows_rank_worked_by_hand(ray_session):
    table = _score_table()
    stage = RankWindow(lo=0.25, hi=0.75)
    out = _run_arrow(stage, table)
    assert_adds_what_it_declares(stage, table.schema, out.schema)
    # highest first, ties by id: b 0.9, f 0.7, a 0.5, c 0.5, e 0.1; d has no score
    ranks = dict(zip(out["id"].to_pylist(), out["clip_score_rank"].to_pylist(), strict=True))
    assert ranks == {"b": 0, "f": 1, "a": 2, "c": 3, "e": 4, "d": None}
    # window [round(0.25 * 5), round(0.75 * 5)) = ranks 1, 2, 3
    kept = {i for i, r in _column(out, "_reject").items() if r is None}
    assert kept == {"f", "a", "c"}
    ascending = _run(RankWindow(lo=0.25, hi=0.75, descending=False), table)
    got = _column(ascending, "clip_score_rank")
    assert got == {"e": 0, "a": 1, "c": 2, "f": 3, "b": 4, "d": None}


def test_ranks_over_many_ranges_equal_a_plain_sort(ray_session, monkeypatch):
    monkeypatch.setattr(ranks_mod, "ROWS_PER_RANGE", 40)  # about 13 ranges of keys
    rng = np.random.default_rng(3)
    n = 503
    ids = [f"id-{i:04d}" for i in rng.permutation(n)]
    # coarse scores so that many rows tie across range boundaries; some rows have none
    scores = [None if i % 41 == 0 else float(rng.integers(0, 20) / 20) for i in range(n)]
    table = pa.table({"id": ids, "cos_to_centroid": pa.array(scores, pa.float32())})
    out = _run(RankWindow(column="cos_to_centroid", lo=0.1, hi=0.9, descending=False), table, 7)
    ranked = sorted((s, i) for i, s in zip(ids, scores, strict=True) if s is not None)
    expected = {i: r for r, (_, i) in enumerate(ranked)}
    got = dict(zip(out["id"].to_pylist(), out["cos_to_centroid_rank"].to_pylist(), strict=True))
    assert {i: r for i, r in got.items() if r is not None} == expected
    assert {i for i, r in got.items() if r is None} == {
        i for i, s in zip(ids, scores, strict=True) if s is None
    }


def test_clip_score_window_ranks_every_scored_row(ray_session):
    rng = np.random.default_rng(0)
    n = 40
    image = rng.normal(size=(n, 4))
    text = image + rng.normal(scale=1.0, size=(n, 4))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    table = pa.table(
        {
            "id": [f"r{i:02d}" for i in range(n)],
            "image_emb": _emb([list(v) for v in image], 4),
            "text_emb": _emb([list(v) if i != 7 else None for i, v in enumerate(text)], 4),
        }
    )
    assert table.schema.field("image_emb").type == embedding_type(4)
    stage = ClipScore(lo=0.0, hi=0.3)
    out = _run_arrow(stage, table)
    assert_adds_what_it_declares(stage, table.schema, out.schema)
    scored = [(s, i) for i, s in _column(out, "clip_score").items() if s is not None]
    expected = {i: r for r, (_, i) in enumerate(sorted(scored, key=lambda t: (-t[0], t[1])))}
    got = dict(zip(out["id"].to_pylist(), out["clip_score_rank"].to_pylist(), strict=True))
    assert {i: r for i, r in got.items() if r is not None} == expected
    assert got["r07"] is None  # no text embedding: no score, no rank
    kept = {i for i, r in _column(out, "_reject").items() if r is None}
    assert kept == {i for i, r in expected.items() if r < round(0.3 * len(expected))}


# ---- the other stages write what they declare ---------------------------------------------------


def test_cluster_and_sample_write_what_they_declare(ray_session):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = pa.table({"id": [f"r{i:02d}" for i in range(60)], "image_emb": _emb(list(x), 4)})
    for stage in (Cluster(n_clusters=3), Sample(n=10)):
        out = _run_arrow(stage, table)
        assert_adds_what_it_declares(stage, table.schema, out.schema)


def test_batch_stages_write_what_they_declare():
    table = rows_to_table(
        [
            {
                "id": "q",
                "source": "vqa",
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "Red"},
                ],
            }
        ]
    )
    table = table.append_column("flag", pa.array([True]))
    for stage in (
        ShortAnswer(),
        SourceFilter(filters={"*": "n_turns >= 2"}),
        Require(column="flag", reason="no flag"),
    ):
        assert_adds_what_it_declares(stage, table.schema, stage.process(table).schema)


def test_balancing_stages_add_no_columns(ray_session, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\n")
    table = rows_to_table(
        [{"id": f"r{i}", "source": "ab"[i % 2], "caption": "a cat"} for i in range(20)]
    )
    for stage in (Balance(cap=3), ConceptBalance(concepts=str(vocab), concept_cap=5)):
        out = _run_arrow(stage, table)
        assert_adds_what_it_declares(stage, table.schema, out.schema)
        assert stage.added_columns() == {}


def test_image_based_writes_what_it_declares(ray_session, tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = pa.table({"id": [f"r{i:02d}" for i in range(80)], "image_emb": _emb(list(x), 4)})
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"id": ["x"], "image_emb": _emb([list(x[0])], 4)}), ref)
    stage = ImageBased(reference=str(ref), n_clusters=2)
    out = _run_arrow(stage, table)
    assert_adds_what_it_declares(stage, table.schema, out.schema)


# ---- mixtures: concepts get their own stage -----------------------------------------------------


def test_a_mixture_with_concepts_runs_concept_balance_before_balance():
    spec = parse_spec(
        "seed: 4\nsources: {a: a.json}\n"
        "balance: {concepts: v.txt, concept_cap: 9, total: 100, seed: 7}\n",
        "/specs/m.yaml",
    )
    stages = [s for s in build_stages(spec) if s.name in ("concept_balance", "balance")]
    assert [s.name for s in stages] == ["concept_balance", "balance"]
    assert (stages[0].params.concepts, stages[0].params.concept_cap) == ("v.txt", 9)
    assert stages[0].params.seed == stages[1].params.seed == 7
    assert stages[1].params.total == 100
    only = parse_spec(
        "sources: {a: a.json}\nbalance: {concepts: v.txt, concept_cap: 9}\n", "/specs/m.yaml"
    )
    assert [s.name for s in build_stages(only)] == ["concept_balance", "export_check"]
