"""concept_balance: MetaCLIP's concept balancing, exactly and reproducibly for a seed.

A row's text (its caption, or its turns when it has none; `concept_text`) is matched against a
vocabulary's entries (`concepts`: a file, one entry per line) as whole lower-cased words
(`concept_words`: an entry "hot dog" matches the words "hot dog", never "hotdogs"). Over the whole
input each entry counts the rows that match it; a row is kept with probability
min(1, t / count of its rarest matched entry) (`concept_cap` = t), so no entry keeps many more than
t rows while rows of rare entries are all kept. A row that matches no entry is rejected (MetaCLIP
drops them) unless `keep_unmatched`. The draw is a seeded uniform key of the row's id
(`stages.select.uniform_key` with a seed of the rule's own, `sub_seed(seed, "concepts")`), so it
is independent of the keys `balance` draws with the same seed after it.

Two passes, neither holding the dataset: a counting pass (rows per vocabulary entry, one small
table per block, reading only the text columns) and a map pass that marks the rows.

This was rule 1 of `balance` (balance version 2); the same seed keeps the same rows. Rejected rows:

- `concept_balance: concept over cap (rarest entry 'dog': 1,234 rows, cap 100, kept with p 0.081)`;
- `concept_balance: no concept matched`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np
import pyarrow as pa

from warren.stages.base import GlobalContext, GlobalStage, param, reject, stable_hash
from warren.stages.group_select import project
from warren.stages.schema import IMAGE_MARKER
from warren.stages.select import uniform_key
from warren.stages.shards import Location

RULE = "concept_balance"

_WORDS = re.compile(r"\w+")


def concept_words(text: str) -> list[str]:
    """The words a text is matched on: runs of letters and digits, lower-cased."""
    return _WORDS.findall(text.casefold())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Concept entries, each normalised to its words joined by single spaces."""

    entries: tuple[str, ...]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entries)}

    @functools.cached_property
    def longest(self) -> int:
        return max((e.count(" ") + 1 for e in self.entries), default=0)

    def matches(self, text: str) -> set[int]:
        """Indices of the entries that occur in `text` as whole words."""
        words = concept_words(text)
        index, found = self.index, set()
        for i in range(len(words)):
            for n in range(1, min(self.longest, len(words) - i) + 1):
                j = index.get(" ".join(words[i : i + n]))
                if j is not None:
                    found.add(j)
        return found


def parse_vocabulary(text: str) -> Vocabulary:
    """One entry per line; blank lines and lines starting with `#` are skipped; an entry that
    repeats (after normalising) counts once."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = " ".join(concept_words(line))
        if entry:
            seen.setdefault(entry, None)
    return Vocabulary(tuple(seen))


def load_vocabulary(uri: str, rule: str = RULE, what: str = "concept vocabulary") -> Vocabulary:
    """The vocabulary file at `uri`; a ValueError, named for `rule`, when it cannot be read or
    has no entries."""
    try:
        data = Location.of(uri).read_bytes()
    except OSError as exc:
        raise ValueError(f"{rule}: cannot read the {what} {uri} ({exc})") from exc
    vocab = parse_vocabulary(data.decode("utf-8", "replace"))
    if not vocab.entries:
        raise ValueError(f"{rule}: the {what} {uri} has no entries")
    return vocab


def row_texts(batch: pa.Table, which: str) -> list[str]:
    """The text each row's concepts are matched in: its caption (`caption`), its turns without
    image markers (`conversations`), or the caption when it has one and else the turns (`auto`)."""
    n = batch.num_rows
    names = batch.column_names
    captions = batch.column("caption").to_pylist() if "caption" in names else [None] * n
    turns = batch.column("conversations").to_pylist() if "conversations" in names else [None] * n
    out = []
    for caption, conv in zip(captions, turns, strict=True):
        if which != "conversations" and caption:
            out.append(caption)
            continue
        if which == "caption" or not conv:
            out.append(caption or "")
            continue
        out.append("\n".join((t.get("value") or "").replace(IMAGE_MARKER, " ") for t in conv))
    return out


def concept_count_pass(batch: pa.Table, vocab: Vocabulary, which: str) -> pa.Table:
    counts = np.zeros(len(vocab.entries), np.int64)
    for text in row_texts(batch, which):
        for j in vocab.matches(text):
            counts[j] += 1
    present = np.flatnonzero(counts)
    return pa.table(
        {"entry": pa.array(present, pa.int64()), "n": pa.array(counts[present], pa.int64())}
    )


def check_text_choice(stage: str, field: str, value: str) -> None:
    """A ValueError unless `value` names a text `row_texts` knows."""
    if value not in ("auto", "caption", "conversations"):
        raise ValueError(f"{stage}: {field} must be auto, caption or conversations, got {value!r}")


def entry_counts(ds, vocab: Vocabulary, which: str) -> tuple[int, ...]:
    """Rows of the Dataset `ds` that match each vocabulary entry: one pass over its text columns."""
    counts = np.zeros(len(vocab.entries), np.int64)
    texts = project(ds, ["caption", "conversations"])
    for b in texts.map_batches(
        concept_count_pass, fn_args=(vocab, which), batch_format="pyarrow"
    ).iter_batches(batch_size=None, batch_format="pyarrow"):
        np.add.at(counts, b.column("entry").to_numpy(), b.column("n").to_numpy())
    return tuple(int(c) for c in counts)


def vocabulary_hash(params_hash: str, key: str, uri: str) -> str:
    """A stage's cache key with its vocabulary file's content in it: the vocabulary is data the
    decision depends on, so a changed file must invalidate the cache."""
    try:
        digest = hashlib.sha256(Location.of(uri).read_bytes()).hexdigest()
    except OSError:
        digest = "unreadable"
    return stable_hash({"params": params_hash, key: digest})


def sub_seed(seed: int, rule: str) -> int:
    """A seed of its own for one rule, so its draws are independent of the other rules' keys."""
    digest = hashlib.blake2b(f"{seed}:{rule}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclasses.dataclass(frozen=True)
class ConceptRule:
    """Rule 1, ready to apply to a batch: the vocabulary, each entry's row count over the input
    and the cap."""

    vocab: Vocabulary
    counts: tuple[int, ...]
    cap: int
    seed: int
    text: str
    keep_unmatched: bool
    name: str = "concept_balance"

    def reasons(self, batch: pa.Table) -> list[str | None]:
        """Per row: None (kept) or why it is rejected."""
        keys = uniform_key(batch.column("id").to_pylist(), sub_seed(self.seed, "concepts"))
        out: list[str | None] = []
        for text, key in zip(row_texts(batch, self.text), keys.tolist(), strict=True):
            found = self.vocab.matches(text)
            if not found:
                out.append(None if self.keep_unmatched else f"{self.name}: no concept matched")
                continue
            # rarest entry; among equally rare ones the first in the vocabulary names the reason
            rarest = min(found, key=lambda j: (self.counts[j], j))
            p = min(1.0, self.cap / self.counts[rarest])
            if key < p:
                out.append(None)
            else:
                out.append(
                    f"{self.name}: concept over cap (rarest entry {self.vocab.entries[rarest]!r}: "
                    f"{self.counts[rarest]:,} rows, cap {self.cap:,}, kept with p {p:.3g})"
                )
        return out


# ---- the stage -------------------------------------------------------------------------------


def mark_concepts(batch: pa.Table, rule: ConceptRule) -> pa.Table:
    """Reject the rows the concept rule does not keep (every output carries `_reject`)."""
    reasons = rule.reasons(batch)
    return reject(batch, np.array([r is not None for r in reasons], bool), reasons)


@dataclasses.dataclass(frozen=True)
class ConceptBalanceParams:
    concepts: str = param("", "MetaCLIP concept balancing: vocabulary file, one entry per line")
    concept_cap: int = param(0, "rows per concept entry (MetaCLIP's t)")
    concept_text: str = param(
        "auto", "text matched against the concepts: caption, conversations, or auto"
    )
    keep_unmatched: bool = param(False, "keep rows that match no concept (MetaCLIP drops them)")
    seed: int = param(0, "seed of the uniform keys that choose which rows are kept")


class ConceptBalance(GlobalStage):
    """MetaCLIP's concept balancing: each vocabulary entry keeps about `concept_cap` rows."""

    name = "concept_balance"
    version = "1"
    Params = ConceptBalanceParams

    def decision_columns(self) -> tuple[str, ...]:
        return ("caption", "conversations")

    def check_params(self) -> None:
        p = self.params
        name = self.name
        if not p.concepts:
            raise ValueError(f"{name}: concepts must name a vocabulary file")
        if p.concept_cap < 1:
            raise ValueError(f"{name}: concepts need concept_cap >= 1 (MetaCLIP's t)")
        check_text_choice(name, "concept_text", p.concept_text)
        if not -(2**63) <= p.seed < 2**63:
            raise ValueError(f"{name}: seed must fit in 64 bits, got {p.seed}")

    @property
    def params_hash(self) -> str:
        return vocabulary_hash(super().params_hash, "concepts", self.params.concepts)

    def concept_rule(self, ds) -> ConceptRule:
        """The rule with each entry's row count over `ds` (one counting pass)."""
        p = self.params
        vocab = load_vocabulary(p.concepts)
        return ConceptRule(
            vocab,
            entry_counts(ds, vocab, p.concept_text),
            p.concept_cap,
            p.seed,
            p.concept_text,
            p.keep_unmatched,
            self.name,
        )

    def run(self, ds, ctx: GlobalContext):
        rule = self.concept_rule(ds)
        return ds.map_batches(mark_concepts, fn_args=(rule,), batch_format="pyarrow")


__all__ = [
    "ConceptBalance",
    "ConceptBalanceParams",
    "ConceptRule",
    "Vocabulary",
    "check_text_choice",
    "concept_words",
    "entry_counts",
    "load_vocabulary",
    "parse_vocabulary",
    "row_texts",
    "sub_seed",
    "vocabulary_hash",
]
