"""ngram_resample: Llama 3's caption n-gram resampling, exactly and reproducibly for a seed.

The Llama 3 paper (section 7.1.1, "Resampling") samples image-text pairs down where their
captions say only what many other captions say, in the spirit of MetaCLIP:

- a vocabulary of n-grams (`ngrams`: a file, one entry per line, e.g. from high-quality text) is
  matched in each row's caption as whole lower-cased words (concept_balance's matching: the entry
  "hot dog" matches the words "hot dog", never "hotdogs"); without a file the vocabulary is the
  pool's own: every run of 1 to `ngram_max` words of its captions that occurs in at least two rows
  (a word seen once, often a number or a file name, says nothing about frequency);
- over the whole input each entry counts the rows whose caption holds it (its frequency f);
- a row holding an entry with f < T (`ngram_threshold`) is always kept;
- otherwise each of its entries is drawn independently with probability sqrt(T / f), and the row
  is kept when any is drawn: it is kept with p = 1 - prod(1 - sqrt(T / f_i));
- a row whose caption holds no entry is rejected (nothing of it is drawn), unless
  `keep_unmatched`.

Each row's keep probability is kept on the row as `ngram_keep_p`. Without a vocabulary file the
pool's distinct n-grams are counted on the driver: its memory grows with their number (the words
of a web pool fit; for `ngram_max` 2 or more on a large pool, give a vocabulary). The draws are seeded uniform
keys (`stages.select.uniform_key`) of the row's id and the entry, with a seed of the rule's own
(`sub_seed(seed, "ngrams")`): the same input and seed keep the same rows, in any run.

What is concept_balance's, reused: the vocabulary file and its parsing, the word matching, the
counting pass (rows per entry, reading only the text columns), the text a row is matched in.
What differs: MetaCLIP keeps a row with min(1, t / f) of its rarest entry, in one draw; Llama 3
draws every entry, at sqrt(T / f), keeps the row when any is drawn, and keeps it outright when one
entry is below T. Rejected rows:

- `ngram_resample: frequent n-grams only (rarest 'dog': 1,234 rows, T 100, kept with p 0.41)`;
- `ngram_resample: no vocabulary n-gram`.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pyarrow as pa

from warren.stages.base import GlobalContext, GlobalStage, param, put_column, reject
from warren.stages.concept_balance import (
    Vocabulary,
    check_text_choice,
    concept_words,
    entry_counts,
    load_vocabulary,
    row_texts,
    sub_seed,
    vocabulary_hash,
)
from warren.stages.group_select import project
from warren.stages.select import uniform_key


@dataclasses.dataclass(frozen=True)
class NgramRule:
    """The rule, ready to apply to a batch: the vocabulary, each entry's row count over the
    input, T and the seed."""

    vocab: Vocabulary
    counts: tuple[int, ...]
    threshold: int
    seed: int
    text: str
    keep_unmatched: bool
    name: str = "ngram_resample"

    def keep_p(self, found: set[int]) -> float:
        """The probability a row holding the entries `found` is kept."""
        counts = [self.counts[j] for j in found]
        if any(f < self.threshold for f in counts):
            return 1.0
        return 1.0 - math.prod(1.0 - math.sqrt(self.threshold / f) for f in counts)

    def decide(self, batch: pa.Table) -> tuple[list[str | None], list[float | None]]:
        """Per row: None (kept) or why it is rejected, and its keep probability (None for a row
        that holds no entry)."""
        ids = batch.column("id").to_pylist()
        found = [self.vocab.matches(t) for t in row_texts(batch, self.text)]
        keep_p = [self.keep_p(js) if js else None for js in found]
        # one draw per (row, entry) of the rows a rare entry does not keep outright: the key of
        # the id and the entry
        pairs = [
            (i, j)
            for i, js in enumerate(found)
            if keep_p[i] is not None and keep_p[i] < 1.0
            for j in sorted(js)
        ]
        keys = uniform_key(
            [f"{ids[i]}\x1f{self.vocab.entries[j]}" for i, j in pairs],
            sub_seed(self.seed, "ngrams"),
        )
        drawn = [False] * len(ids)
        for (i, j), key in zip(pairs, keys.tolist(), strict=True):
            if key < math.sqrt(self.threshold / self.counts[j]):
                drawn[i] = True
        reasons: list[str | None] = []
        probs: list[float | None] = []
        for i, js in enumerate(found):
            if not js:
                probs.append(None)
                reasons.append(
                    None if self.keep_unmatched else f"{self.name}: no vocabulary n-gram"
                )
                continue
            p = keep_p[i]
            probs.append(p)
            if p >= 1.0 or drawn[i]:
                reasons.append(None)
                continue
            rarest = min(js, key=lambda j: (self.counts[j], j))
            reasons.append(
                f"{self.name}: frequent n-grams only (rarest {self.vocab.entries[rarest]!r}: "
                f"{self.counts[rarest]:,} rows, T {self.threshold:,}, kept with p {p:.3g})"
            )
        return reasons, probs


def pool_count_pass(batch: pa.Table, ngram_max: int, which: str) -> pa.Table:
    """Rows per n-gram (1 to `ngram_max` words) in one block's texts."""
    counter: collections.Counter[str] = collections.Counter()
    for text in row_texts(batch, which):
        words = concept_words(text)
        counter.update(
            {
                " ".join(words[i : i + n])
                for n in range(1, ngram_max + 1)
                for i in range(len(words) - n + 1)
            }
        )
    return pa.table(
        {
            "ngram": pa.array(list(counter), pa.string()),
            "n": pa.array(list(counter.values()), pa.int64()),
        }
    )


def mark_ngrams(batch: pa.Table, rule: NgramRule) -> pa.Table:
    """Every row of `batch` with `ngram_keep_p`, the rows the rule does not keep rejected."""
    reasons, probs = rule.decide(batch)
    marked = put_column(batch, "ngram_keep_p", pa.array(probs, pa.float32()))
    return reject(marked, np.array([r is not None for r in reasons], bool), reasons)


@dataclasses.dataclass(frozen=True)
class NgramResampleParams:
    ngrams: str = param(
        "", "vocabulary of n-grams: a file, one entry per line; empty: the pool's own n-grams"
    )
    ngram_max: int = param(1, "without a vocabulary file: the longest n-gram counted, in words")
    ngram_threshold: int = param(
        20_000,
        "T: a row with an n-gram in fewer than T rows is kept; the rest with sqrt(T / f) draws "
        "(MetaCLIP's t for 400M pairs; Llama 3 gives none)",
    )
    ngram_text: str = param(
        "caption", "text matched against the vocabulary: caption, conversations, or auto"
    )
    keep_unmatched: bool = param(False, "keep rows whose caption holds no vocabulary n-gram")
    seed: int = param(0, "seed of the draws")


class NgramResample(GlobalStage):
    """Llama 3's resampling: rows whose caption n-grams are all frequent are sampled down."""

    name = "ngram_resample"
    version = "1"
    Params = NgramResampleParams
    adds = ("ngram_keep_p",)

    def decision_columns(self) -> tuple[str, ...]:
        return ("caption", "conversations")

    def check_params(self) -> None:
        p = self.params
        if p.ngram_max < 1:
            raise ValueError(f"{self.name}: ngram_max must be at least 1")
        if p.ngram_threshold < 1:
            raise ValueError(f"{self.name}: ngram_threshold (Llama 3's T) must be at least 1")
        check_text_choice(self.name, "ngram_text", p.ngram_text)
        if not -(2**63) <= p.seed < 2**63:
            raise ValueError(f"{self.name}: seed must fit in 64 bits, got {p.seed}")

    @property
    def params_hash(self) -> str:
        if not self.params.ngrams:
            return super().params_hash
        return vocabulary_hash(super().params_hash, "ngrams", self.params.ngrams)

    def rule(self, ds) -> NgramRule:
        """The rule with each entry's row count over `ds` (one counting pass)."""
        p = self.params
        texts = project(ds, ["caption", "conversations"])
        if not p.ngrams:
            return self._pool_rule(texts)
        vocab = load_vocabulary(p.ngrams, self.name, "n-gram vocabulary")
        return NgramRule(
            vocab,
            entry_counts(ds, vocab, p.ngram_text),
            p.ngram_threshold,
            p.seed,
            p.ngram_text,
            p.keep_unmatched,
            self.name,
        )

    def _pool_rule(self, texts) -> NgramRule:
        """The rule over the pool's own n-grams: every run of up to `ngram_max` words counted
        (in how many rows it occurs), those in two rows or more the vocabulary."""
        p = self.params
        counter: collections.Counter[str] = collections.Counter()
        for b in texts.map_batches(
            pool_count_pass, fn_args=(p.ngram_max, p.ngram_text), batch_format="pyarrow"
        ).iter_batches(batch_size=None, batch_format="pyarrow"):
            counter.update(
                dict(zip(b.column("ngram").to_pylist(), b.column("n").to_pylist(), strict=True))
            )
        entries = sorted(k for k, n in counter.items() if n >= 2)
        counts = tuple(counter[e] for e in entries)
        return NgramRule(
            Vocabulary(tuple(entries)), counts, p.ngram_threshold, p.seed, p.ngram_text,
            p.keep_unmatched, self.name,
        )  # fmt: skip

    def run(self, ds, ctx: GlobalContext):
        rule = self.rule(ds)
        return ds.map_batches(mark_ngrams, fn_args=(rule,), batch_format="pyarrow")


__all__ = ["NgramResample", "NgramResampleParams", "NgramRule", "mark_ngrams"]
