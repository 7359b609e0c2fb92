"""balance: even out a mixture whose sources differ in size, exactly and reproducibly for a seed.

Instruction-tuning pools mix sources of very different sizes (the `source` column, or
`source_column`): a million VQA rows next to a few thousand OCR rows. Two published rules, each
optional (0 = off), applied in this order:

1. `cap` (Cambrian-7M: cap each source at t rows): a source with more than `cap` rows keeps
   exactly `cap` of them; a smaller source keeps every row.
2. `total` with `alpha` (InstructBLIP: sample source d with probability proportional to
   size_d^alpha, alpha = 0.5): keep `total` rows in all, source d getting
   n_d = total * s_d^alpha / sum_e s_e^alpha rows, where s_d is the source's size after the cap
   (its size when `cap` is off). n_d is made a whole number and capped at s_d this way:
   - water-filling: a source whose share reaches its size keeps all s_d rows, is set aside, and
     the rows it could not take are shared among the others in the same proportions (repeated
     until no share reaches its size);
   - largest remainder: the other sources get floor(share), and the rows still missing go one
     each to the largest fractional parts (ties: the larger source, then the source name, null
     last);
   so the kept total is exactly min(total, sum_d s_d), and each n_d is within one row of its
   share. alpha = 1 keeps the mixture's proportions, alpha = 0 asks the same number of each.

Which rows a source keeps: its k_d rows with the smallest seeded uniform key
(`stages.select.uniform_key(ids, seed)`: a hash of the id, the same in every run and process),
ties broken by id. So for a seed the choice is a uniform random subset of each source, the rows a
smaller target keeps are among those a larger one keeps (the cap's rows contain the sampled ones),
and a different seed keeps different rows in the same numbers. Ids are taken to be unique: rows
with the same id share a key and a fate, and a source could then keep fewer than k_d.

Rows whose source is null form one group of their own (capped and sampled like any source; it is
named `<null>` in reasons).

No pass holds the dataset, and all of them run on Ray Data blocks:

1. a counting pass: rows per source (one small table per block, summed on the driver);
2. the targets k_d above, on the driver (one number per source);
3. for each source that keeps some but not all of its rows, the (key, id) of its row at rank k_d
   by distributed selection, as in `stages.select.find_cutoffs`: the keys are uniform on [0, 1),
   so rank k of n lies near k / n with a known spread (a Beta distribution), and a bracket of
   `MARGIN` standard deviations around it needs no sample pass; one counting pass returns, per
   source, the rows before its bracket and the (key, id) pairs inside it (about
   2 * MARGIN * sqrt(n) pairs), the cut-off row is read off those exactly, and a bracket that
   misses is widened and the pass repeated;
4. a map pass marks every row at or after its source's cut-off.

Rejected rows (the numbers are the source's rows kept of its rows in):

- `balance: over source cap (source vqav2: 350,000 of 1,200,000 kept, cap 350,000)`;
- `balance: not sampled (source coco: 1,234 of 50,000 kept, alpha 0.5)`: within the cap (or with
  the cap off) but not among the source's n_d sampled rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.base import GlobalContext, GlobalStage, param, reject
from stages.select import uniform_key

RULE = "balance"
NULL_NAME = "<null>"
# Standard deviations of a rank's key on each side of its bracket; a miss widens it 16 times.
MARGIN = 6.0

Cutoff = tuple[float, str]
# A cut-off that no row is before: the source keeps none of its rows.
KEEP_NONE: Cutoff = (-math.inf, "")


# ---- targets ---------------------------------------------------------------------------------


def _name_order(group: str | None) -> tuple[bool, str]:
    return (group is None, group or "")


def tempered_targets(sizes: Mapping[Any, int], total: int, alpha: float) -> dict[Any, int]:
    """Rows to keep per source: `total` shared in proportion to size^alpha, each capped at its
    size, by water-filling and largest-remainder rounding (see the module docstring). The values
    add up to min(total, sum of sizes) exactly."""
    targets = {g: 0 for g in sizes}
    active = {g: n for g, n in sizes.items() if n > 0}
    remaining = min(total, sum(active.values()))
    while active and remaining > 0:
        weights = {g: float(n) ** alpha for g, n in active.items()}
        weight_sum = math.fsum(weights.values())
        shares = {g: remaining * w / weight_sum for g, w in weights.items()}
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


def balance_targets(
    sizes: Mapping[Any, int], cap: int = 0, total: int = 0, alpha: float = 0.5
) -> dict[Any, tuple[int, int]]:
    """Per source: (rows kept by the cap, rows kept in the end); 0 turns a rule off."""
    capped = {g: min(n, cap) if cap else n for g, n in sizes.items()}
    final = tempered_targets(capped, total, alpha) if total else capped
    return {g: (capped[g], final[g]) for g in sizes}


# ---- per-source passes -----------------------------------------------------------------------


def _groups(batch: pa.Table, source_column: str) -> tuple[np.ndarray, list[str | None]]:
    """(group index per row, group names): the batch's distinct sources, null ones last as None."""
    col = batch.column(source_column).combine_chunks().cast(pa.string())
    encoded = pc.dictionary_encode(col)
    names: list[str | None] = encoded.dictionary.to_pylist()
    idx = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    idx[idx < 0] = len(names)
    names.append(None)
    return idx, names


def _source_sizes_pass(batch: pa.Table, source_column: str) -> pa.Table:
    idx, names = _groups(batch, source_column)
    counts = np.bincount(idx, minlength=len(names))
    present = np.flatnonzero(counts)
    return pa.table(
        {
            "source": pa.array([names[i] for i in present], pa.string()),
            "n": pa.array(counts[present].astype(np.int64), pa.int64()),
        }
    )


def source_sizes(ds: Any, source_column: str = "source") -> dict[str | None, int]:
    """Rows per source value (None for null sources), in one pass over `ds`."""
    sizes: dict[str | None, int] = {}
    for b in ds.map_batches(
        _source_sizes_pass, fn_args=(source_column,), batch_format="pyarrow"
    ).iter_batches(batch_size=None, batch_format="pyarrow"):
        for g, n in zip(b.column("source").to_pylist(), b.column("n").to_pylist(), strict=True):
            sizes[g] = sizes.get(g, 0) + n
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
    source_column: str,
    seed: int,
    brackets: Mapping[Any, list[tuple[int, float, float]]],
) -> pa.Table:
    """Per (source, rank) bracket [lo, hi]: rows of the source before it (counted) and inside it
    (listed with key and id)."""
    idx, names = _groups(batch, source_column)
    keys, ids = _keys_and_ids(batch, seed)
    out: dict[str, list] = {"source": [], "rank": [], "key": [], "id": [], "before": []}
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
            out["source"] += [g] * (n_in + 1)
            out["rank"] += [rank] * (n_in + 1)
            out["key"] += [math.nan, *gk[inside].tolist()]
            out["id"] += [None, *gi[inside].tolist()]
            out["before"] += [int((gk < lo).sum())] + [-1] * n_in
    return pa.table(
        {
            "source": pa.array(out["source"], pa.string()),
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


def find_source_cutoffs(
    ds: Any,
    source_column: str,
    seed: int,
    ranks: Mapping[Any, list[int]],
    sizes: Mapping[Any, int],
) -> dict[Any, dict[int, Cutoff]]:
    """Per source, the (key, id) of its row at each rank in `ranks[source]` (0 = smallest key;
    each rank in [0, size)). A row is among a source's k smallest when it is strictly before the
    cut-off of rank k. Counting passes only: memory is bounded by a block and the brackets."""
    found: dict[Any, dict[int, Cutoff]] = {g: {} for g in ranks}
    todo = {g: sorted(set(rs)) for g, rs in ranks.items() if rs}
    for g, rs in todo.items():
        if not all(0 <= r < sizes[g] for r in rs):
            raise ValueError(f"{RULE}: ranks {rs} outside source {g!r} of {sizes[g]} rows")
    margin = MARGIN
    while todo:
        brackets = {g: [(r, *_bracket(r, sizes[g], margin)) for r in rs] for g, rs in todo.items()}
        before: dict[tuple[Any, int], int] = {}
        inside: dict[tuple[Any, int], list[Cutoff]] = {}
        counts = ds.map_batches(
            _count_pass, fn_args=(source_column, seed, brackets), batch_format="pyarrow"
        )
        for b in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for g, r, k, rid, bef in zip(
                *(b.column(c).to_pylist() for c in ("source", "rank", "key", "id", "before")),
                strict=True,
            ):
                if bef >= 0:
                    before[(g, r)] = before.get((g, r), 0) + bef
                else:
                    inside.setdefault((g, r), []).append((k, rid))
        missed: dict[Any, list[int]] = {}
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


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """What one source keeps: rules in the order they apply, as (cut-off, reason); a row at or
    after a rule's cut-off gets its reason (the first such rule)."""

    rules: tuple[tuple[Cutoff, str], ...]


def mark_balance(
    batch: pa.Table, source_column: str, seed: int, plans: Mapping[Any, SourcePlan]
) -> pa.Table:
    """Reject each row at or after one of its source's cut-offs, with that rule's reason."""
    idx, names = _groups(batch, source_column)
    keys, ids = _keys_and_ids(batch, seed)
    n = batch.num_rows
    depth = max((len(p.rules) for p in plans.values()), default=0)
    out = batch
    for level in range(depth):
        mask = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
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
                reasons[i] = reason
        if mask.any():
            out = reject(out, mask, reasons)
    if out is batch:  # every output carries the _reject column, all null here
        out = reject(out, np.zeros(n, bool), "")
    return out


# ---- the stage -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BalanceParams:
    cap: int = param(0, "keep at most this many rows of each source (Cambrian); 0 = no cap")
    total: int = param(
        0,
        "keep this many rows in all, source d getting a share proportional to size_d^alpha "
        "(InstructBLIP); 0 = no sampling",
    )
    alpha: float = param(
        0.5, "size exponent of the sampling shares: 1 keeps proportions, 0 equal shares"
    )
    seed: int = param(0, "seed of the uniform keys that choose which rows a source keeps")
    source_column: str = param("source", "column naming each row's source")


class Balance(GlobalStage):
    """Cap each source and/or sample a size-tempered mixture, exactly and seeded, per source."""

    name = "balance"
    version = "1"
    Params = BalanceParams

    def check_params(self) -> None:
        p = self.params
        if p.cap < 0:
            raise ValueError(f"{self.name}: cap must be >= 0 (0 = off), got {p.cap}")
        if p.total < 0:
            raise ValueError(f"{self.name}: total must be >= 0 (0 = off), got {p.total}")
        if not (math.isfinite(p.alpha) and p.alpha >= 0):
            raise ValueError(f"{self.name}: alpha must be a finite number >= 0, got {p.alpha}")
        if p.cap == 0 and p.total == 0:
            raise ValueError(f"{self.name}: set cap or total (both are 0: nothing to balance)")
        if not p.source_column.strip():
            raise ValueError(f"{self.name}: source_column must name a column")
        if not -(2**63) <= p.seed < 2**63:
            raise ValueError(f"{self.name}: seed must fit in 64 bits, got {p.seed}")

    def plan(self, sizes: Mapping[Any, int]) -> tuple[dict[Any, tuple[int, int]], dict]:
        """(targets per source, ranks to find per source) for the given source sizes."""
        p = self.params
        targets = balance_targets(sizes, p.cap, p.total, p.alpha)
        ranks = {
            g: sorted({k for k in (cap_k, final_k) if 0 < k < sizes[g]})
            for g, (cap_k, final_k) in targets.items()
        }
        return targets, ranks

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
        sizes = source_sizes(ds, p.source_column)
        targets, ranks = self.plan(sizes)
        cutoffs = find_source_cutoffs(ds, p.source_column, p.seed, ranks, sizes)
        plans = {}
        for g, (cap_k, final_k) in targets.items():
            size = sizes[g]
            label = f"source {NULL_NAME if g is None else g}: {final_k:,} of {size:,} kept"
            rules = []
            if cap_k < size:
                cut = cutoffs[g][cap_k] if cap_k else KEEP_NONE
                rules.append((cut, f"{self.name}: over source cap ({label}, cap {p.cap:,})"))
            if final_k < cap_k:
                cut = cutoffs[g][final_k] if final_k else KEEP_NONE
                rules.append((cut, f"{self.name}: not sampled ({label}, alpha {p.alpha:g})"))
            if rules:
                plans[g] = SourcePlan(tuple(rules))
        return ds.map_batches(
            mark_balance, fn_args=(p.source_column, p.seed, plans), batch_format="pyarrow"
        )
