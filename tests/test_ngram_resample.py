"""ngram_resample (Llama 3's caption n-gram resampling) against a brute-force count and draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray

from warren.stages.base import GlobalContext
from warren.stages.concept_balance import sub_seed
from warren.stages.ngram_resample import NgramResample
from warren.stages.schema import rows_to_table
from warren.stages.select import uniform_key

VOCAB = ["cat", "dog", "bird", "red car", "on the beach"]
# caption -> rows: "cat" in 400 + 30 rows, "dog" in 60 + 30, "bird" in 12, "red car" in 30.
SPEC = {
    "a cat": 400,
    "a dog": 60,
    "a cat and a dog, a red car": 30,
    "a bird": 12,
    "nothing to see": 15,
    "CAT on  the   Beach": 8,
    "redcar hotdogs": 5,
}


def pool() -> list[dict]:
    rows = [
        {"id": f"{k}-{i:03d}", "caption": caption, "source": "web"}
        for k, (caption, n) in enumerate(SPEC.items())
        for i in range(n)
    ]
    return [rows[i] for i in np.random.default_rng(7).permutation(len(rows))]


def brute(rows, threshold, seed, keep_unmatched=False, vocab=VOCAB):
    """Plain word lists, every entry counted by a scan of every caption, every draw by hand."""
    words = {
        r["id"]: "".join(c if c.isalnum() else " " for c in r["caption"].lower()).split()
        for r in rows
    }

    def holds(w, entry):
        e = entry.split()
        return any(w[i : i + len(e)] == e for i in range(len(w)))

    count = {e: sum(holds(w, e) for w in words.values()) for e in vocab}
    out = {}
    for r in rows:
        found = [e for e in vocab if holds(words[r["id"]], e)]
        if not found:
            out[r["id"]] = (
                None if keep_unmatched else "ngram_resample: no vocabulary n-gram",
                None,
            )
            continue
        if any(count[e] < threshold for e in found):
            out[r["id"]] = (None, 1.0)
            continue
        p = 1 - math.prod(1 - math.sqrt(threshold / count[e]) for e in found)
        keys = uniform_key([f"{r['id']}\x1f{e}" for e in found], sub_seed(seed, "ngrams"))
        drawn = any(k < math.sqrt(threshold / count[e]) for k, e in zip(keys, found, strict=True))
        rarest = min(found, key=lambda e: (count[e], vocab.index(e)))
        why = (
            f"ngram_resample: frequent n-grams only (rarest {rarest!r}: {count[rarest]:,} rows, "
            f"T {threshold:,}, kept with p {p:.3g})"
        )
        out[r["id"]] = (None if drawn else why, p)
    return out


def run(rows, tmp_path, **params):
    vocab = tmp_path / "ngrams.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    params = {"ngrams": str(vocab), **params}
    tbl = rows_to_table(rows)
    ds = ray.data.from_arrow([tbl.slice(i, 100) for i in range(0, tbl.num_rows, 100)])
    out = NgramResample(**params).run(ds, GlobalContext(len(rows), 5, 2))
    return {r["id"]: (r["_reject"], r["ngram_keep_p"]) for r in out.take_all()}


def test_rows_are_kept_as_llama_3_resamples_checked_against_a_brute_force_count(
    ray_session, tmp_path
):
    rows = pool()
    got = run(rows, tmp_path, ngram_threshold=40, seed=3)
    want = brute(rows, 40, 3)
    assert got.keys() == want.keys()
    for rid, (why, p) in want.items():
        assert got[rid][0] == why, rid
        assert got[rid][1] == (None if p is None else pytest.approx(p, rel=1e-6)), rid
    # "a bird" (12 rows < T) and the rows with "red car" (30 < T) are all kept; "a cat" (438 rows)
    # keeps about sqrt(40 / 438) of them; "nothing to see" and "redcar hotdogs" hold no entry.
    assert all(
        got[r["id"]][0] is None for r in rows if "bird" in r["caption"] or "red car" in r["caption"]
    )
    cats = [got[r["id"]][0] is None for r in rows if r["caption"] == "a cat"]
    assert 0.15 < sum(cats) / len(cats) < 0.45
    assert all(
        got[r["id"]][0] == "ngram_resample: no vocabulary n-gram"
        for r in rows
        if "see" in r["caption"] or "hotdogs" in r["caption"]
    )
    kept = run(rows, tmp_path, ngram_threshold=40, seed=3, keep_unmatched=True)
    assert {k: v[0] for k, v in kept.items()} == {
        k: v[0] for k, v in brute(rows, 40, 3, True).items()
    }
    # Another seed draws other rows, as many in expectation.
    other = run(rows, tmp_path, ngram_threshold=40, seed=4)
    assert {k for k, v in other.items() if v[0] is None} != {
        k for k, v in got.items() if v[0] is None
    }


def test_a_rows_keep_rate_over_seeds_is_one_minus_the_product_of_its_misses():
    from warren.stages.concept_balance import parse_vocabulary
    from warren.stages.ngram_resample import NgramRule

    vocab = parse_vocabulary("cat\ndog")
    # cat in 400 rows, dog in 100; T = 25: p = 1 - (1 - 1/4)(1 - 1/2) = 0.625 for "cat dog".
    table = rows_to_table([{"id": f"r{i}", "caption": "cat dog"} for i in range(400)])
    rates = []
    for seed in range(20):
        rule = NgramRule(vocab, (400, 100), 25, seed, "caption", False)
        reasons, probs = rule.decide(table)
        assert probs == [pytest.approx(0.625)] * 400
        rates.append(sum(r is None for r in reasons) / 400)
    assert np.mean(rates) == pytest.approx(0.625, abs=0.02)


def test_params_that_cannot_work_are_refused_and_the_vocabulary_is_in_the_cache_key(tmp_path):
    with pytest.raises(ValueError, match="ngram_max must be at least 1"):
        NgramResample(ngram_threshold=5, ngram_max=0)
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\n")
    with pytest.raises(ValueError, match="ngram_threshold"):
        NgramResample(ngrams=str(vocab), ngram_threshold=0)
    before = NgramResample(ngrams=str(vocab), ngram_threshold=5).params_hash
    vocab.write_text("cat\ndog\n")
    assert NgramResample(ngrams=str(vocab), ngram_threshold=5).params_hash != before


def test_without_a_vocabulary_the_pools_own_ngrams_in_two_rows_or_more_are_counted(
    ray_session, tmp_path
):
    rows = pool()
    got = run(rows, tmp_path, ngrams="", ngram_max=2, ngram_threshold=40, seed=5)
    # The vocabulary by hand: every run of one or two words, in how many captions it occurs.
    per_row = []
    for r in rows:
        w = "".join(c if c.isalnum() else " " for c in r["caption"].lower()).split()
        per_row.append({" ".join(w[i : i + n]) for n in (1, 2) for i in range(len(w) - n + 1)})
    rows_with = {g: sum(g in grams for grams in per_row) for g in set().union(*per_row)}
    vocab = sorted(g for g, n in rows_with.items() if n >= 2)
    # "hotdogs" and "redcar" occur in 5 rows: in the vocabulary, so those rows are kept (5 < T).
    assert "redcar hotdogs" in vocab and "see" in vocab
    assert {k: v[0] for k, v in got.items()} == {
        k: v[0] for k, v in brute(rows, 40, 5, vocab=vocab).items()
    }
