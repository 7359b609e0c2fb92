"""select: exact global rank windows on a score column, and seeded uniform sampling of N rows.

`rank_window` keeps the rows whose global rank by `column` falls in [lo, hi) of the ranked rows
(Bunny: CLIP score 40-60%, then cosine to the cluster centroid 15-35%; DataComp: the top 30% of
CLIP scores is the window 0-30% with `descending`). `sample` keeps N rows drawn uniformly at random
without replacement, reproducibly for a seed (Bunny: 2M).

Ranks are exact, with ties broken by id, and no pass holds the dataset. A window stage writes the
exact rank of every ranked row to `<column>_rank` (int64, 0 = the first row in the window's
order; `stages.ranks`, a distributed sort of (key, id, row) only) and keeps the rows whose rank
falls in the window. `sample` needs no ranks, only the row at rank N: the cut-off row is found by
distributed selection. A seeded sample of the keys brackets it, one counting pass returns the
number of rows before the bracket and the (key, id) pairs inside it (a few thousand), the cut-off
is read off those exactly, and a last map pass marks the rows. If a bracket misses (a badly skewed
sample), it is widened and the counting pass repeated.

A rejected row's reason names the window, its exact rank (0% = first) and its value, e.g.
`rank_window: below window 15-35% by cos_to_centroid (rank 61.2%, cos_to_centroid 0.4120)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import GlobalContext, GlobalStage, Threshold, param, reject
from warren.stages.ranks import add_ranks
from warren.stages.schema import column_type, rank_column

SAMPLE_ROWS = 20_000  # keys gathered to bracket each cut-off


def uniform_key(ids: list[str], seed: int) -> np.ndarray:
    """A uniform [0, 1) number per id, the same for an id and seed in every run and process."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, rid in enumerate(ids):
        h = hashlib.blake2b(
            rid.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)
        )
        out[i] = int.from_bytes(h.digest(), "little") / 2.0**64
    return out


# ---- distributed selection -----------------------------------------------------------------
# A row's position is ordered by (key ascending, id ascending); "key" is whatever the stage ranks
# by, negated for descending ranks, so that every comparison below is ascending.


def row_keys(batch: pa.Table, spec: tuple) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(keys of rows that have one, mask of those rows, their ids)."""
    kind, column, descending, seed = spec
    ids_all = batch.column("id").to_pylist()
    if kind == "uniform":
        return uniform_key(ids_all, seed), np.ones(batch.num_rows, bool), ids_all
    col = batch.column(column)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    vals = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.float64)
    valid &= ~np.isnan(vals)
    keys = -vals if descending else vals
    return keys[valid], valid, [i for i, v in zip(ids_all, valid, strict=True) if v]


def rank_rows(ds, spec: tuple):
    """(`ds` with `<column>_rank`, the number of ranked rows): each row's exact rank in the order
    `spec` ranks by (see `stages.ranks`); null for rows without a value. Materialises `ds`."""
    return add_ranks(ds, row_keys, spec, rank_column(spec[1]))


def window_ranks(n: int, lo: float, hi: float) -> tuple[int, int]:
    """The ranks [first, end) a window [lo, hi) of `n` ranked rows keeps."""
    return round(lo * n), round(hi * n)


def mark_ranked(
    batch: pa.Table,
    spec: tuple,
    first: int,
    end: int,
    n: int,
    reasons: tuple[str, str, str],
) -> pa.Table:
    """Reject the rows ranked before `first` or at `end` and after (the ranks `rank_rows` wrote),
    and rows without a value; a rejected row's reason gives its exact rank as a share of the `n`
    ranked rows (0% = first) and its value: `"... (rank 87.3%, clip_score 0.1012)"`."""
    _, column, _, _ = spec
    rank_col = batch.column(rank_column(column))
    valid = pc.is_valid(rank_col).to_numpy(zero_copy_only=False)
    rank = pc.fill_null(rank_col, 0).to_numpy(zero_copy_only=False)
    above = valid & (rank < first)
    below = valid & (rank >= end)
    missing_reason, above_reason, below_reason = reasons
    out = reject(batch, ~valid, missing_reason)
    if not (above.any() or below.any()):
        return out
    value = pc.fill_null(batch.column(column), 0).to_numpy(zero_copy_only=False)
    details = [
        f" (rank {100.0 * r / max(n, 1):.1f}%, {column} {v:.4f})"
        for r, v in zip(rank.tolist(), value.astype(np.float64).tolist(), strict=True)
    ]
    out = reject(out, above, [above_reason + d for d in details])
    return reject(out, below, [below_reason + d for d in details])


def window_thresholds(thresholds: list[Threshold], lo: float, hi: float) -> list[Threshold]:
    """A stage's thresholds without its rank window when the window is (0, 1): no window."""
    if (lo, hi) != (0.0, 1.0):
        return thresholds
    return [t for t in thresholds if t.kind not in ("rank_lo", "rank_hi")]


def _before(keys: np.ndarray, ids: list[str], cut: tuple[float, str]) -> np.ndarray:
    """Rows strictly before the cut-off row in (key, id) order."""
    ck, cid = cut
    idarr = np.array(ids, dtype=object)
    return (keys < ck) | ((keys == ck) & (idarr < cid))


def _sample_pass(batch: pa.Table, spec: tuple, rate: float) -> pa.Table:
    """One row per batch: how many rows it ranks, and a seeded sample of their keys."""
    keys, _, ids = row_keys(batch, spec)
    take = uniform_key(ids, 7919) < rate
    return pa.table(
        {
            "n": pa.array([len(keys)], pa.int64()),
            "keys": pa.array([keys[take].tolist()], pa.list_(pa.float64())),
        }
    )


def _count_pass(batch: pa.Table, spec: tuple, brackets: list[tuple[float, float]]) -> pa.Table:
    """For each bracket [lo_key, hi_key]: rows before it (count) and rows inside it (listed)."""
    keys, _, ids = row_keys(batch, spec)
    rows = {"bracket": [], "key": [], "id": [], "before": []}
    for b, (lo, hi) in enumerate(brackets):
        inside = (keys >= lo) & (keys <= hi)
        rows["bracket"].append(b)
        rows["key"].append(math.nan)
        rows["id"].append(None)
        rows["before"].append(int((keys < lo).sum()))
        for k, rid in zip(
            keys[inside].tolist(), (i for i, m in zip(ids, inside, strict=True) if m), strict=True
        ):
            rows["bracket"].append(b)
            rows["key"].append(k)
            rows["id"].append(rid)
            rows["before"].append(-1)
    return pa.table(
        {
            "bracket": pa.array(rows["bracket"], pa.int32()),
            "key": pa.array(rows["key"], pa.float64()),
            "id": pa.array(rows["id"], pa.string()),
            "before": pa.array(rows["before"], pa.int64()),
        }
    )


def find_cutoffs(
    ds, spec: tuple, num_rows: int, ranks_of
) -> tuple[int, list[tuple[float, str] | None]]:
    """(number of ranked rows n, the (key, id) of the row at each rank in `ranks_of(n)`).

    A rank outside [0, n) gives None (no cut-off on that side)."""
    rate = min(1.0, SAMPLE_ROWS / max(num_rows, 1))
    sample_keys, n = [], 0
    for b in ds.map_batches(
        _sample_pass, fn_args=(spec, rate), batch_format="pyarrow"
    ).iter_batches(batch_size=None, batch_format="pyarrow"):
        n += int(pc.sum(b.column("n")).as_py() or 0)
        sample_keys.extend(np.asarray(k, dtype=np.float64) for k in b.column("keys").to_pylist())
    sample = np.sort(np.concatenate(sample_keys)) if sample_keys else np.array([])
    ranks = ranks_of(n)
    cutoffs: list[tuple[float, str] | None] = [None] * len(ranks)
    todo = [i for i, r in enumerate(ranks) if 0 <= r < n]
    margin = 4.0
    while todo:
        brackets = []
        for i in todo:
            if len(sample) == 0 or margin > 1e6:
                brackets.append((-math.inf, math.inf))
                continue
            pos = ranks[i] / n * len(sample)
            spread = margin * math.sqrt(len(sample)) + 8
            lo_i = int(max(0, math.floor(pos - spread)))
            hi_i = int(min(len(sample) - 1, math.ceil(pos + spread)))
            lo = -math.inf if lo_i == 0 else float(sample[lo_i])
            hi = math.inf if hi_i == len(sample) - 1 else float(sample[hi_i])
            brackets.append((lo, hi))
        counts = ds.map_batches(_count_pass, fn_args=(spec, brackets), batch_format="pyarrow")
        before = [0] * len(todo)
        inside: list[list[tuple[float, str]]] = [[] for _ in todo]
        for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for bi, k, rid, bef in zip(
                *(b.column(c).to_pylist() for c in ("bracket", "key", "id", "before")), strict=True
            ):
                if bef >= 0:
                    before[bi] += bef
                else:
                    inside[bi].append((k, rid))
        missed = []
        for j, i in enumerate(todo):
            within = ranks[i] - before[j]
            if 0 <= within < len(inside[j]):
                cutoffs[i] = sorted(inside[j])[within]
            else:
                missed.append(i)
        todo = missed
        margin *= 16
    return n, cutoffs


def mark_outside(batch: pa.Table, spec: tuple, cut_lo, cut_hi, reasons: tuple[str, str, str]):
    """Reject rows before `cut_lo`, at or after `cut_hi` (the (key, id) rows `find_cutoffs`
    found; None: no cut-off on that side), and rows without a key."""
    keys, valid, ids = row_keys(batch, spec)
    n = batch.num_rows
    above = np.zeros(n, bool)
    below = np.zeros(n, bool)
    if cut_lo is not None:
        above[valid] = _before(keys, ids, cut_lo)
    if cut_hi is not None:
        below[valid] = ~_before(keys, ids, cut_hi)
    missing_reason, above_reason, below_reason = reasons
    out = reject(batch, ~valid, missing_reason)
    out = reject(out, above, above_reason)
    return reject(out, below, below_reason)


# ---- stages --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankWindowParams:
    column: str = param("clip_score", "score column to rank by")
    # the window's ends are thresholds on `column`'s ranks (the base class reads `column` and
    # `descending` off the parameters)
    lo: float = param(
        0.4, "keep ranks from this fraction of the ranked rows (inclusive)", threshold="rank_lo"
    )
    hi: float = param(0.6, "keep ranks up to this fraction (exclusive)", threshold="rank_hi")
    descending: bool = param(True, "rank 0 is the highest score")


class RankWindow(GlobalStage):
    """Keep rows whose exact global rank by a score falls in [lo, hi); ties broken by id."""

    name = "rank_window"
    version = "1"
    Params = RankWindowParams

    def check_params(self) -> None:
        p = self.params
        if not 0.0 <= p.lo < p.hi <= 1.0:
            raise ValueError(f"{self.name}: need 0 <= lo < hi <= 1, got lo={p.lo} hi={p.hi}")

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def added_columns(self) -> dict[str, Any]:
        name = rank_column(self.params.column)
        return {name: column_type(name)}

    def thresholds(self) -> list[Threshold]:
        return window_thresholds(super().thresholds(), self.params.lo, self.params.hi)

    def run(self, ds, ctx: GlobalContext):
        p = self.params
        spec = ("column", p.column, p.descending, 0)
        ds, n = rank_rows(ds, spec)
        window = f"{100 * p.lo:g}-{100 * p.hi:g}% by {p.column}"
        reasons = (
            f"{self.name}: missing {p.column}",
            f"{self.name}: above window {window}",
            f"{self.name}: below window {window}",
        )
        return ds.map_batches(
            mark_ranked,
            fn_args=(spec, *window_ranks(n, p.lo, p.hi), n, reasons),
            batch_format="pyarrow",
        )


@dataclasses.dataclass(frozen=True)
class SampleParams:
    n: int = param(2_000_000, "rows to keep (all when fewer remain)")
    seed: int = param(0, "seed of the draw")


class Sample(GlobalStage):
    """N rows uniformly at random without replacement; the same N rows for the same seed and ids."""

    name = "sample"
    version = "1"
    Params = SampleParams

    def check_params(self) -> None:
        if self.params.n < 0:
            raise ValueError(f"{self.name}: n must be >= 0, got {self.params.n}")

    #: The draw is a cut-off (the (key, id) of the n-th row by a seeded hash of the id), then a
    #: comparison per row: the runner marks the wide rows as it writes them.
    fits = True

    def _spec(self) -> tuple:
        return ("uniform", None, False, self.params.seed)

    def fit(self, ds, ctx: GlobalContext):
        """The (key, id) of the first row not drawn, or None when every row is drawn."""
        return find_cutoffs(ds, self._spec(), ctx.num_rows, lambda n: [self.params.n])[1][0]

    def transform(self, table: pa.Table, state, drop: bool = False) -> pa.Table:
        reasons = (
            f"{self.name}: unreachable",
            f"{self.name}: unreachable",
            f"{self.name}: not drawn (seed {self.params.seed})",
        )
        return mark_outside(table, self._spec(), None, state, reasons)
