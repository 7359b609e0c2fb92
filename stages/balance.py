"""balance: even out a mixture whose sources differ in size, exactly and reproducibly for a seed.

Instruction-tuning pools mix sources of very different sizes (the `source` column, or
`source_column`): a million VQA rows next to a few thousand OCR rows. Four published rules, each
optional, applied in this order (each one sees only the rows the rules before it kept):

1. **concepts** (MetaCLIP; `concepts` = a vocabulary file, `concept_cap` = t): a row's text (its
   caption, or its turns when it has none; `concept_text`) is matched against the vocabulary's
   entries as whole lower-cased words (`concept_words`: an entry "hot dog" matches the words
   "hot dog", never "hotdogs"). Over the whole input each entry counts the rows that match it;
   a row is kept with probability min(1, t / count of its rarest matched entry), so no entry
   keeps many more than t rows while rows of rare entries are all kept. A row that matches no
   entry is rejected (MetaCLIP drops them) unless `keep_unmatched`. The draw is a seeded uniform
   key of the row's id, independent of the keys of the rules below.
2. **cap** (Cambrian-7M: cap each source at t rows; `source_caps` sets a cap per source, and
   0 there lifts the cap for that source): a source with more rows than its cap keeps exactly
   that many; a smaller source keeps every row. A cap per source at the size of a published
   subset reproduces it, e.g. LLaVA-1.5's 83k VQAv2 rows.
3. **total** with `alpha` (InstructBLIP: sample source d with probability proportional to
   size_d^alpha, alpha = 0.5): keep `total` rows in all, source d getting
   n_d = total * w_d s_d^alpha / sum_e w_e s_e^alpha rows, where s_d is its size after the rules
   above and w_d its weight (`source_weights`, default 1; weight 0 takes no rows). n_d is made a
   whole number and capped at s_d this way:
   - water-filling: a source whose share reaches its size keeps all s_d rows, is set aside, and
     the rows it could not take are shared among the others in the same proportions (repeated
     until no share reaches its size);
   - largest remainder: the other sources get floor(share), and the rows still missing go one
     each to the largest fractional parts (ties: the larger source, then the source name, null
     last);
   so the kept total is exactly min(total, rows available to sources of weight > 0), and each
   n_d is within one row of its share. alpha = 1 keeps the proportions, alpha = 0 asks the same
   number of each.
4. **text share** (MoE-LLaVA, Bunny: multimodal : text-only = 7 : 3 is `text_share` 0.3): rows
   without images are text-only. With T text-only and M multimodal rows left by rules 1-2, the
   mixture keeps the largest N <= `total` (no bound when `total` is 0) rows with exactly
   round(N * share) text-only rows: N = min(total, T / share, M / (1 - share)). Text-only and
   multimodal rows are then two pools: each pool's rows are shared among its sources as in rule
   3 (by size^alpha with a total, in proportion to size without one), so a source with both
   kinds of rows gives some of each. Rule 3 is part of this rule when both are set.

Which rows a source (or a source's pool) keeps: its k rows with the smallest seeded uniform key
(`stages.select.uniform_key(ids, seed)`: a hash of the id, the same in every run and process),
ties broken by id. So for a seed the choice is a uniform random subset of each source, the rows a
smaller target keeps are among those a larger one keeps (the capped rows contain the sampled
ones), and a different seed keeps different rows in the same numbers. Ids are taken to be unique:
rows with the same id share a key and a fate, and a source could then keep fewer than k.

Rows whose source is null form one group of their own (capped and sampled like any source; it is
named `<null>` in reasons). `source_caps` and `source_weights` naming a source that is not in
the input are an error (a typo would silently do nothing).

No pass holds the dataset, and all of them run on Ray Data blocks:

1. with concepts, a counting pass: rows per vocabulary entry (one small table per block);
2. a counting pass: rows per source and kind (text-only or not) that rule 1 keeps;
3. the targets above, on the driver (a few numbers per source);
4. for each source (or pool) that keeps some but not all of its rows, the (key, id) of its row
   at rank k by distributed selection, as in `stages.select.find_cutoffs`: the keys are uniform
   on [0, 1), so rank k of n lies near k / n with a known spread (a Beta distribution), and a
   bracket of `MARGIN` standard deviations around it needs no sample pass; one counting pass
   returns, per group, the rows before its bracket and the (key, id) pairs inside it (about
   2 * MARGIN * sqrt(n) pairs), the cut-off row is read off those exactly, and a bracket that
   misses is widened and the pass repeated; with a text share, one more counting pass finds how
   many of each pool's rows the caps kept;
5. a map pass marks every row at or after its group's cut-off.

Rejected rows (the numbers are the rows kept of the rows in):

- `balance: concept over cap (rarest entry 'dog': 1,234 rows, cap 100, kept with p 0.081)`;
- `balance: no concept matched`;
- `balance: over source cap (source vqav2: 350,000 of 1,200,000 kept, cap 350,000)`;
- `balance: not sampled (source coco: 1,234 of 50,000 kept, alpha 0.5)`: within the cap (or with
  the cap off) but not among the source's n_d sampled rows; with a text share the pool is named:
  `(source coco, multimodal: ...)`;
- `balance: over text share (source sharegpt, text-only: 3,000 of 40,000 kept, text share 0.3)`:
  a text share without a total cut the larger pool.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import GlobalContext, GlobalStage, param, reject, stable_hash
from warren.stages.schema import IMAGE_MARKER
from warren.stages.select import uniform_key
from warren.stages.shards import Location

RULE = "balance"
NULL_NAME = "<null>"
TEXT, MULTIMODAL = "text-only", "multimodal"
# Standard deviations of a rank's key on each side of its bracket; a miss widens it 16 times.
MARGIN = 6.0

Cutoff = tuple[float, str]
# A cut-off that no row is before: the group keeps none of its rows.
KEEP_NONE: Cutoff = (-math.inf, "")
# A group is a source (None for null sources) or, with a text share, a (source, kind) pair.
Group = Any


# ---- targets ---------------------------------------------------------------------------------


def _name_order(group: Group) -> tuple:
    if isinstance(group, tuple):
        return (group[0] is None, group[0] or "", *group[1:])
    return (group is None, group or "")


def tempered_targets(
    sizes: Mapping[Group, int],
    total: int,
    alpha: float,
    weights: Mapping[Group, float] | None = None,
) -> dict[Group, int]:
    """Rows to keep per group: `total` shared in proportion to weight * size^alpha, each capped
    at its size, by water-filling and largest-remainder rounding (see the module docstring). The
    values add up to min(total, sum of the sizes of groups with weight > 0) exactly."""
    weights = weights or {}
    targets = {g: 0 for g in sizes}
    active = {g: n for g, n in sizes.items() if n > 0 and weights.get(g, 1.0) > 0}
    remaining = min(total, sum(active.values()))
    while active and remaining > 0:
        w = {g: weights.get(g, 1.0) * float(n) ** alpha for g, n in active.items()}
        weight_sum = math.fsum(w.values())
        shares = {g: remaining * x / weight_sum for g, x in w.items()}
        full = [g for g, s in shares.items() if s >= active[g]]
        if full:
            for g in full:
                targets[g] = active.pop(g)
                remaining -= targets[g]
            continue
        floors = {g: math.floor(s) for g, s in shares.items()}
        left = remaining - sum(floors.values())
        order = sorted(active, key=lambda g: (-(shares[g] - floors[g]), -active[g], _name_order(g)))
        for i, g in enumerate(order):
            # share < size, so floor(share) + 1 <= size: the extra row always fits
            targets[g] = floors[g] + (1 if i < left else 0)
        break
    return targets


def source_cap(source: str | None, cap: int, source_caps: Mapping[str, int]) -> int:
    """The cap of one source: its own from `source_caps` when named there, else `cap` (0 = none)."""
    if source is not None and source in source_caps:
        return source_caps[source]
    return cap


def balance_targets(
    sizes: Mapping[Any, int],
    cap: int = 0,
    total: int = 0,
    alpha: float = 0.5,
    source_caps: Mapping[str, int] | None = None,
    source_weights: Mapping[str, float] | None = None,
) -> dict[Any, tuple[int, int]]:
    """Per source: (rows kept by the cap, rows kept in the end); 0 turns a rule off."""
    source_caps = source_caps or {}
    capped = {}
    for g, n in sizes.items():
        c = source_cap(g, cap, source_caps)
        capped[g] = min(n, c) if c else n
    final = tempered_targets(capped, total, alpha, source_weights) if total else capped
    return {g: (capped[g], final[g]) for g in sizes}


def text_share_split(
    text_rows: int, multimodal_rows: int, share: float, total: int
) -> tuple[int, int]:
    """(text-only rows, multimodal rows) of the largest mixture of at most `total` rows (0: no
    bound) with round(N * share) text-only rows, given the rows there are of each."""
    n = float(total) if total else math.inf
    if share > 0:
        n = min(n, text_rows / share)
    if share < 1:
        n = min(n, multimodal_rows / (1 - share))
    n = min(n, float(text_rows + multimodal_rows))
    whole = math.floor(n + 1e-9)  # T / share may land a hair under a whole number
    n_text = min(text_rows, math.floor(whole * share + 0.5), whole)
    return n_text, min(multimodal_rows, whole - n_text)


# ---- concepts --------------------------------------------------------------------------------

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


def load_vocabulary(uri: str) -> Vocabulary:
    try:
        data = Location.of(uri).read_bytes()
    except OSError as exc:
        raise ValueError(f"{RULE}: cannot read the concept vocabulary {uri} ({exc})") from exc
    vocab = parse_vocabulary(data.decode("utf-8", "replace"))
    if not vocab.entries:
        raise ValueError(f"{RULE}: the concept vocabulary {uri} has no entries")
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


def _concept_count_pass(batch: pa.Table, vocab: Vocabulary, which: str) -> pa.Table:
    counts = np.zeros(len(vocab.entries), np.int64)
    for text in row_texts(batch, which):
        for j in vocab.matches(text):
            counts[j] += 1
    present = np.flatnonzero(counts)
    return pa.table(
        {"entry": pa.array(present, pa.int64()), "n": pa.array(counts[present], pa.int64())}
    )


def _sub_seed(seed: int, rule: str) -> int:
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
    name: str = RULE

    def reasons(self, batch: pa.Table) -> list[str | None]:
        """Per row: None (kept) or why it is rejected."""
        keys = uniform_key(batch.column("id").to_pylist(), _sub_seed(self.seed, "concepts"))
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


# ---- grouping --------------------------------------------------------------------------------


def is_text_only(batch: pa.Table) -> np.ndarray:
    """Rows with no image (a null or empty `images` list, or no `images` column)."""
    if "images" not in batch.column_names:
        return np.ones(batch.num_rows, bool)
    lengths = pc.fill_null(pc.list_value_length(batch.column("images")), 0)
    return lengths.to_numpy(zero_copy_only=False) == 0


@dataclasses.dataclass(frozen=True)
class Grouping:
    """How rows fall into groups: by source, or by (source, kind) with `by_kind`; rows the
    concept rule rejects are in no group."""

    source_column: str
    by_kind: bool = False
    concepts: ConceptRule | None = None

    def columns(self, by_kind: bool | None = None) -> list[str]:
        """The columns `groups` reads (with `by_kind` overriding the grouping's own)."""
        out = ["id", self.source_column]
        if self.by_kind if by_kind is None else by_kind:
            out.append("images")
        if self.concepts is not None:
            out += ["caption", "conversations"]
        return out

    def groups(self, batch: pa.Table) -> tuple[np.ndarray, list[Group]]:
        """(group index per row, -1 for rows in no group; the groups the indices name)."""
        col = batch.column(self.source_column).combine_chunks().cast(pa.string())
        encoded = pc.dictionary_encode(col)
        sources: list[str | None] = encoded.dictionary.to_pylist()
        idx = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        idx[idx < 0] = len(sources)
        sources.append(None)
        names: list[Group] = list(sources)
        if self.by_kind:
            text = is_text_only(batch)
            idx = idx * 2 + text.astype(np.int64)
            names = [(s, kind) for s in sources for kind in (MULTIMODAL, TEXT)]
        if self.concepts is not None:
            out = np.array([r is not None for r in self.concepts.reasons(batch)], bool)
            idx[out] = -1
        return idx, names


def _project(ds: Any, columns: list[str]) -> Any:
    """Only `columns` of `ds` (those it has): a counting pass then reads no image bytes, since
    Ray pushes the projection down into the Parquet read."""
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    wanted = [c for c in dict.fromkeys(columns) if c in names] or names[:1]
    return ds.select_columns(wanted) if names and wanted != names else ds


def _sizes_pass(batch: pa.Table, grouping: Grouping) -> pa.Table:
    """Rows per (source, kind) that the concept rule keeps."""
    idx, names = dataclasses.replace(grouping, by_kind=True).groups(batch)
    counts = np.bincount(idx[idx >= 0], minlength=len(names))
    present = np.flatnonzero(counts)
    return pa.table(
        {
            "source": pa.array([names[i][0] for i in present], pa.string()),
            "kind": pa.array([names[i][1] for i in present], pa.string()),
            "n": pa.array(counts[present].astype(np.int64), pa.int64()),
        }
    )


def group_sizes(ds: Any, grouping: Grouping) -> dict[tuple[str | None, str], int]:
    """Rows per (source, kind) in one pass over `ds` (rows the concept rule rejects left out)."""
    sizes: dict[tuple[str | None, str], int] = {}
    counts = _project(ds, grouping.columns(by_kind=True)).map_batches(
        _sizes_pass, fn_args=(grouping,), batch_format="pyarrow"
    )
    for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = (b.column(c).to_pylist() for c in ("source", "kind", "n"))
        for s, kind, n in zip(*cols, strict=True):
            sizes[(s, kind)] = sizes.get((s, kind), 0) + n
    return sizes


def _before(keys: np.ndarray, ids: np.ndarray, cut: Cutoff) -> np.ndarray:
    """Rows strictly before the cut-off row in (key, id) order."""
    ck, cid = cut
    return (keys < ck) | ((keys == ck) & (ids < cid))


def _keys_and_ids(batch: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = batch.column("id").to_pylist()
    return uniform_key(ids, seed), np.array(ids, dtype=object)


def _count_pass(
    batch: pa.Table,
    grouping: Grouping,
    seed: int,
    brackets: Mapping[Group, list[tuple[int, float, float]]],
    numbers: Mapping[Group, int],
) -> pa.Table:
    """Per (group, rank) bracket [lo, hi]: rows of the group before it (counted) and inside it
    (listed with key and id). Groups travel as their number in `numbers`."""
    idx, names = grouping.groups(batch)
    keys, ids = _keys_and_ids(batch, seed)
    out: dict[str, list] = {"group": [], "rank": [], "key": [], "id": [], "before": []}
    for j, g in enumerate(names):
        if g not in brackets:
            continue
        rows = idx == j
        if not rows.any():
            continue
        gk, gi = keys[rows], ids[rows]
        for rank, lo, hi in brackets[g]:
            inside = (gk >= lo) & (gk <= hi)
            n_in = int(inside.sum())
            out["group"] += [numbers[g]] * (n_in + 1)
            out["rank"] += [rank] * (n_in + 1)
            out["key"] += [math.nan, *gk[inside].tolist()]
            out["id"] += [None, *gi[inside].tolist()]
            out["before"] += [int((gk < lo).sum())] + [-1] * n_in
    return pa.table(
        {
            "group": pa.array(out["group"], pa.int64()),
            "rank": pa.array(out["rank"], pa.int64()),
            "key": pa.array(out["key"], pa.float64()),
            "id": pa.array(out["id"], pa.string()),
            "before": pa.array(out["before"], pa.int64()),
        }
    )


def _bracket(rank: int, n: int, margin: float) -> tuple[float, float]:
    """Keys around where the row of `rank` (0 = smallest) of n uniform keys lies."""
    if margin > 1e4:
        return -math.inf, math.inf
    p = (rank + 1) / (n + 1)  # mean of the (rank + 1)-th smallest of n uniforms
    spread = margin * (math.sqrt(p * (1 - p) / (n + 2)) + 1.0 / n)
    lo, hi = p - spread, p + spread
    return (-math.inf if lo <= 0 else lo), (math.inf if hi >= 1 else hi)


def find_group_cutoffs(
    ds: Any,
    grouping: Grouping,
    seed: int,
    ranks: Mapping[Group, list[int]],
    sizes: Mapping[Group, int],
) -> dict[Group, dict[int, Cutoff]]:
    """Per group, the (key, id) of its row at each rank in `ranks[group]` (0 = smallest key;
    each rank in [0, size)). A row is among a group's k smallest when it is strictly before the
    cut-off of rank k. Counting passes only: memory is bounded by a block and the brackets."""
    found: dict[Group, dict[int, Cutoff]] = {g: {} for g in ranks}
    todo = {g: sorted(set(rs)) for g, rs in ranks.items() if rs}
    for g, rs in todo.items():
        if not all(0 <= r < sizes[g] for r in rs):
            raise ValueError(f"{RULE}: ranks {rs} outside group {g!r} of {sizes[g]} rows")
    numbers = {g: i for i, g in enumerate(todo)}
    by_number = dict(enumerate(todo))
    margin = MARGIN
    while todo:
        brackets = {g: [(r, *_bracket(r, sizes[g], margin)) for r in rs] for g, rs in todo.items()}
        before: dict[tuple[Group, int], int] = {}
        inside: dict[tuple[Group, int], list[Cutoff]] = {}
        counts = _project(ds, grouping.columns()).map_batches(
            _count_pass, fn_args=(grouping, seed, brackets, numbers), batch_format="pyarrow"
        )
        for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for num, r, k, rid, bef in zip(
                *(b.column(c).to_pylist() for c in ("group", "rank", "key", "id", "before")),
                strict=True,
            ):
                g = by_number[num]
                if bef >= 0:
                    before[(g, r)] = before.get((g, r), 0) + bef
                else:
                    inside.setdefault((g, r), []).append((k, rid))
        missed: dict[Group, list[int]] = {}
        for g, rs in todo.items():
            for r in rs:
                within = r - before.get((g, r), 0)
                listed = inside.get((g, r), [])
                if 0 <= within < len(listed):
                    found[g][r] = sorted(listed)[within]
                else:
                    missed.setdefault(g, []).append(r)
        todo = missed
        margin = max(margin * 16, 1.0)
    return found


def _survivors_pass(
    batch: pa.Table, grouping: Grouping, seed: int, cuts: Mapping[str | None, Cutoff]
) -> pa.Table:
    """Rows per (source, kind) before their source's cut-off (every row of an uncut source)."""
    idx, names = grouping.groups(batch)
    keys, ids = _keys_and_ids(batch, seed)
    counts = np.zeros(len(names), np.int64)
    for j, (source, _) in enumerate(names):
        rows = idx == j
        if not rows.any():
            continue
        cut = cuts.get(source)
        counts[j] = rows.sum() if cut is None else _before(keys[rows], ids[rows], cut).sum()
    present = np.flatnonzero(counts)
    return pa.table(
        {
            "source": pa.array([names[i][0] for i in present], pa.string()),
            "kind": pa.array([names[i][1] for i in present], pa.string()),
            "n": pa.array(counts[present], pa.int64()),
        }
    )


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What one group keeps: rules in the order they apply, as (cut-off, reason); a row at or
    after a rule's cut-off gets its reason (the first such rule)."""

    rules: tuple[tuple[Cutoff, str], ...]


def mark_balance(
    batch: pa.Table, grouping: Grouping, seed: int, plans: Mapping[Group, GroupPlan]
) -> pa.Table:
    """Reject each row the concept rule rejects, or at or after one of its group's cut-offs."""
    n = batch.num_rows
    out = reject(batch, np.zeros(n, bool), "")  # every output carries the _reject column
    if grouping.concepts is not None:
        reasons = grouping.concepts.reasons(batch)
        out = reject(out, np.array([r is not None for r in reasons], bool), reasons)
    idx, names = dataclasses.replace(grouping, concepts=None).groups(batch)
    keys, ids = _keys_and_ids(batch, seed)
    depth = max((len(p.rules) for p in plans.values()), default=0)
    for level in range(depth):
        mask = np.zeros(n, bool)
        reasons_at: list[str | None] = [None] * n
        for j, g in enumerate(names):
            plan = plans.get(g)
            if plan is None or level >= len(plan.rules):
                continue
            rows = np.flatnonzero(idx == j)
            if not len(rows):
                continue
            cut, reason = plan.rules[level]
            hit = rows[~_before(keys[rows], ids[rows], cut)]
            mask[hit] = True
            for i in hit.tolist():
                reasons_at[i] = reason
        if mask.any():
            out = reject(out, mask, reasons_at)
    return out


# ---- the stage -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BalanceParams:
    cap: int = param(0, "keep at most this many rows of each source (Cambrian); 0 = no cap")
    source_caps: dict = param(
        {}, 'caps of named sources, overriding cap, e.g. {"vqav2": 83000}; 0 = no cap for it'
    )
    total: int = param(
        0,
        "keep this many rows in all, source d getting a share proportional to size_d^alpha "
        "(InstructBLIP); 0 = no sampling",
    )
    alpha: float = param(
        0.5, "size exponent of the sampling shares: 1 keeps proportions, 0 equal shares"
    )
    source_weights: dict = param(
        {}, "sampling weight of named sources (default 1), multiplying size^alpha; 0 = none"
    )
    text_share: float = param(
        -1.0, "share of text-only rows (no images) in the result, e.g. 0.3; -1 = off"
    )
    concepts: str = param(
        "", "MetaCLIP concept balancing: vocabulary file, one entry per line; '' = off"
    )
    concept_cap: int = param(0, "rows per concept entry (MetaCLIP's t), needed with concepts")
    concept_text: str = param(
        "auto", "text matched against the concepts: caption, conversations, or auto"
    )
    keep_unmatched: bool = param(False, "keep rows that match no concept (MetaCLIP drops them)")
    seed: int = param(0, "seed of the uniform keys that choose which rows are kept")
    source_column: str = param("source", "column naming each row's source")


class Balance(GlobalStage):
    """Balance a mixture: concept caps, per-source caps, size-tempered sampling to a total and a
    text-only share, exactly and seeded."""

    name = "balance"
    version = "2"
    Params = BalanceParams

    def check_params(self) -> None:
        p = self.params
        name = self.name
        if p.cap < 0:
            raise ValueError(f"{name}: cap must be >= 0 (0 = off), got {p.cap}")
        if p.total < 0:
            raise ValueError(f"{name}: total must be >= 0 (0 = off), got {p.total}")
        if not (math.isfinite(p.alpha) and p.alpha >= 0):
            raise ValueError(f"{name}: alpha must be a finite number >= 0, got {p.alpha}")
        for label, values, ok in (
            ("source_caps", p.source_caps, lambda v: isinstance(v, int) and v >= 0),
            (
                "source_weights",
                p.source_weights,
                lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
            ),
        ):
            if not isinstance(values, dict):
                raise ValueError(f"{name}: {label} must be a mapping of source to number")
            bad = {k: v for k, v in values.items() if isinstance(v, bool) or not ok(v)}
            if bad:
                raise ValueError(f"{name}: {label} values must be numbers >= 0, got {bad}")
        if p.source_weights and not p.total:
            raise ValueError(f"{name}: source_weights need a total to share")
        if p.text_share != -1.0 and not 0.0 <= p.text_share <= 1.0:
            raise ValueError(f"{name}: text_share must be in [0, 1] (-1 = off), got {p.text_share}")
        if p.concepts and p.concept_cap < 1:
            raise ValueError(f"{name}: concepts need concept_cap >= 1 (MetaCLIP's t)")
        if p.concept_cap and not p.concepts:
            raise ValueError(f"{name}: concept_cap needs a concepts vocabulary file")
        if p.concept_text not in ("auto", "caption", "conversations"):
            raise ValueError(
                f"{name}: concept_text must be auto, caption or conversations, "
                f"got {p.concept_text!r}"
            )
        if not (p.cap or p.source_caps or p.total or p.concepts or self.text_share_on):
            raise ValueError(
                f"{name}: set cap, source_caps, total, text_share or concepts (nothing to balance)"
            )
        if not p.source_column.strip():
            raise ValueError(f"{name}: source_column must name a column")
        if not -(2**63) <= p.seed < 2**63:
            raise ValueError(f"{name}: seed must fit in 64 bits, got {p.seed}")

    @property
    def text_share_on(self) -> bool:
        return self.params.text_share != -1.0

    @property
    def params_hash(self) -> str:
        # The vocabulary is data the decision depends on: a changed file must invalidate the cache.
        base = super().params_hash
        if not self.params.concepts:
            return base
        try:
            digest = hashlib.sha256(Location.of(self.params.concepts).read_bytes()).hexdigest()
        except OSError:
            digest = "unreadable"
        return stable_hash({"params": base, "concepts": digest})

    # ---- planning (driver side, a few numbers per source) --------------------------------------

    def _label(self, g: Group) -> str:
        if isinstance(g, tuple):
            return f"source {NULL_NAME if g[0] is None else g[0]}, {g[1]}"
        return f"source {NULL_NAME if g is None else g}"

    def plan_sources(self, sizes: Mapping[Any, int]) -> tuple[dict[Any, tuple[int, int]], dict]:
        """Without a text share: (targets per source, ranks to find per source)."""
        p = self.params
        targets = balance_targets(sizes, p.cap, p.total, p.alpha, p.source_caps, p.source_weights)
        ranks = {
            g: sorted({k for k in (cap_k, final_k) if 0 < k < sizes[g]})
            for g, (cap_k, final_k) in targets.items()
        }
        return targets, ranks

    def plan_kinds(self, survivors: Mapping[tuple, int]) -> dict[tuple, int]:
        """With a text share: rows to keep per (source, kind) from the rows the caps kept."""
        p = self.params
        by_kind = {
            kind: {g: n for g, n in survivors.items() if g[1] == kind}
            for kind in (TEXT, MULTIMODAL)
        }
        text_rows, multi_rows = sum(by_kind[TEXT].values()), sum(by_kind[MULTIMODAL].values())
        # An exact share of a kind the input lacks keeps nothing at all: surely not what was meant.
        for kind, rows, wanted in (
            (TEXT, text_rows, p.text_share > 0),
            (MULTIMODAL, multi_rows, p.text_share < 1),
        ):
            if wanted and not rows:
                raise ValueError(
                    f"{self.name}: text_share {p.text_share:g} needs {kind} rows, and the "
                    f"input has none left after the caps (rows: {text_rows:,} text-only, "
                    f"{multi_rows:,} multimodal)"
                )
        n_text, n_multi = text_share_split(text_rows, multi_rows, p.text_share, p.total)
        alpha = p.alpha if p.total else 1.0
        weights = {g: p.source_weights.get(g[0], 1.0) for g in survivors if g[0] is not None}
        out: dict[tuple, int] = {}
        for kind, n in ((TEXT, n_text), (MULTIMODAL, n_multi)):
            out.update(tempered_targets(by_kind[kind], n, alpha, weights))
        return out

    def run(self, ds, ctx: GlobalContext):
        p = self.params
        schema = ds.schema()
        names = list(schema.names) if schema is not None else []
        for column in ("id", p.source_column):
            if names and column not in names:
                raise ValueError(
                    f"{self.name}: no column {column!r} in the input (columns: {names}); "
                    f"set --{self.name}.source_column"
                )
        concepts = self._concept_rule(ds) if p.concepts else None
        by_source = Grouping(p.source_column, concepts=concepts)
        kind_sizes = group_sizes(ds, by_source)
        sizes: dict[str | None, int] = {}
        for (s, _), n in kind_sizes.items():
            sizes[s] = sizes.get(s, 0) + n
        named = set(p.source_caps) | set(p.source_weights)
        unknown = sorted(named - {s for s in sizes if s is not None})
        if unknown:
            raise ValueError(
                f"{self.name}: source_caps/source_weights name sources not in the input: "
                f"{unknown} (sources: {sorted(s for s in sizes if s is not None)})"
            )
        if self.text_share_on:
            grouping, plans = self._plan_with_text_share(ds, by_source, sizes, kind_sizes)
        else:
            grouping, plans = by_source, self._plan_by_source(ds, by_source, sizes)
        return ds.map_batches(
            mark_balance, fn_args=(grouping, p.seed, plans), batch_format="pyarrow"
        )

    def _concept_rule(self, ds) -> ConceptRule:
        p = self.params
        vocab = load_vocabulary(p.concepts)
        counts = np.zeros(len(vocab.entries), np.int64)
        texts = _project(ds, ["caption", "conversations"])
        for b in texts.map_batches(
            _concept_count_pass, fn_args=(vocab, p.concept_text), batch_format="pyarrow"
        ).iter_batches(batch_size=None, batch_format="pyarrow"):
            np.add.at(counts, b.column("entry").to_numpy(), b.column("n").to_numpy())
        return ConceptRule(
            vocab,
            tuple(int(c) for c in counts),
            p.concept_cap,
            p.seed,
            p.concept_text,
            p.keep_unmatched,
            self.name,
        )

    def _cap_rule(self, g: str | None, cut_k: int, kept: int, size: int, cuts) -> tuple:
        cap = source_cap(g, self.params.cap, self.params.source_caps)
        cut = cuts[cut_k] if cut_k else KEEP_NONE
        return (
            cut,
            f"{self.name}: over source cap ({self._label(g)}: {kept:,} of {size:,} kept, cap {cap:,})",
        )

    def _plan_by_source(self, ds, grouping: Grouping, sizes) -> dict[Any, GroupPlan]:
        p = self.params
        targets, ranks = self.plan_sources(sizes)
        cutoffs = find_group_cutoffs(ds, grouping, p.seed, ranks, sizes)
        plans = {}
        for g, (cap_k, final_k) in targets.items():
            size = sizes[g]
            rules = []
            if cap_k < size:
                rules.append(self._cap_rule(g, cap_k, final_k, size, cutoffs.get(g, {})))
            if final_k < cap_k:
                cut = cutoffs[g][final_k] if final_k else KEEP_NONE
                label = f"{self._label(g)}: {final_k:,} of {size:,} kept"
                rules.append((cut, f"{self.name}: not sampled ({label}, alpha {p.alpha:g})"))
            if rules:
                plans[g] = GroupPlan(tuple(rules))
        return plans

    def _plan_with_text_share(self, ds, by_source: Grouping, sizes, kind_sizes):
        p = self.params
        caps = balance_targets(sizes, p.cap, 0, p.alpha, p.source_caps)
        cap_ranks = {g: [k] for g, (k, _) in caps.items() if 0 < k < sizes[g]}
        cap_cuts = find_group_cutoffs(ds, by_source, p.seed, cap_ranks, sizes)
        cuts = {
            g: (cap_cuts[g][k] if k else KEEP_NONE) for g, (k, _) in caps.items() if k < sizes[g]
        }
        by_kind = dataclasses.replace(by_source, by_kind=True)
        survivors: dict[tuple, int] = dict.fromkeys(kind_sizes, 0)
        for b in (
            _project(ds, by_kind.columns())
            .map_batches(_survivors_pass, fn_args=(by_kind, p.seed, cuts), batch_format="pyarrow")
            .iter_batches(batch_size=None, batch_format="pyarrow")
        ):
            cols = (b.column(c).to_pylist() for c in ("source", "kind", "n"))
            for s, kind, n in zip(*cols, strict=True):
                survivors[(s, kind)] += n
        final = self.plan_kinds(survivors)
        ranks = {g: [k] for g, k in final.items() if 0 < k < kind_sizes[g]}
        group_cuts = find_group_cutoffs(ds, by_kind, p.seed, ranks, kind_sizes)
        kept_by_source: dict[str | None, int] = {}
        for (s, _), k in final.items():
            kept_by_source[s] = kept_by_source.get(s, 0) + k
        plans = {}
        rule = "not sampled" if p.total else "over text share"
        detail = f"alpha {p.alpha:g}, " if p.total else ""
        for g, k in final.items():
            s = g[0]
            rules = []
            if s in cuts:
                size = sizes[s]
                cap_k = caps[s][0]
                rules.append(self._cap_rule(s, cap_k, kept_by_source[s], size, cap_cuts.get(s, {})))
            if k < survivors[g]:
                cut = group_cuts[g][k] if k else KEEP_NONE
                label = f"{self._label(g)}: {k:,} of {kind_sizes[g]:,} kept"
                rules.append(
                    (cut, f"{self.name}: {rule} ({label}, {detail}text share {p.text_share:g})")
                )
            if rules:
                plans[g] = GroupPlan(tuple(rules))
        return by_kind, plans


__all__ = [
    "Balance",
    "BalanceParams",
    "ConceptRule",
    "Grouping",
    "Vocabulary",
    "balance_targets",
    "concept_words",
    "find_group_cutoffs",
    "group_sizes",
    "load_vocabulary",
    "parse_vocabulary",
    "row_texts",
    "tempered_targets",
    "text_share_split",
]
