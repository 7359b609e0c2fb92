"""balance: even out a mixture whose sources differ in size, exactly and reproducibly for a seed.

Instruction-tuning pools mix sources of very different sizes (the `source` column, or
`source_column`): a million VQA rows next to a few thousand OCR rows. Three published rules, each
optional, applied in this order (each one sees only the rows the rules before it kept; MetaCLIP's
concept balancing, once rule 1 here, is the stage `concept_balance`, run before this one):

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
   without images are text-only. With T text-only and M multimodal rows left by rule 2, the
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

No pass holds the dataset, and all of them run on Ray Data blocks (`stages.group_select`):

1. a counting pass: rows per source and kind (text-only or not);
2. the targets above, on the driver (a few numbers per source);
3. for each source (or pool) that keeps some but not all of its rows, the (key, id) of its row
   at rank k by distributed selection (`group_select.find_group_cutoffs`); with a text share,
   one more counting pass finds how many of each pool's rows the caps kept;
4. a map pass marks every row at or after its group's cut-off.

Rejected rows (the numbers are the rows kept of the rows in):

- `balance: over source cap (source vqav2: 350,000 of 1,200,000 kept, cap 350,000)`;
- `balance: not sampled (source coco: 1,234 of 50,000 kept, alpha 0.5)`: within the cap (or with
  the cap off) but not among the source's n_d sampled rows; with a text share the pool is named:
  `(source coco, multimodal: ...)`;
- `balance: over text share (source sharegpt, text-only: 3,000 of 40,000 kept, text share 0.3)`:
  a text share without a total cut the larger pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from warren.stages.base import IMAGES_WITHOUT_BYTES, GlobalContext, GlobalStage, param
from warren.stages.group_select import (
    KEEP_NONE,
    MULTIMODAL,
    NULL_NAME,
    TEXT,
    Group,
    Grouping,
    GroupPlan,
    find_group_cutoffs,
    group_sizes,
    mark_groups,
    project,
    survivors_pass,
)
from warren.stages.schema import CORE_FIELDS

RULE = "balance"

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
    seed: int = param(0, "seed of the uniform keys that choose which rows are kept")
    source_column: str = param("source", "column naming each row's source")


class Balance(GlobalStage):
    """Balance a mixture: per-source caps, size-tempered sampling to a total and a text-only
    share, exactly and seeded."""

    name = "balance"
    version = "2"
    Params = BalanceParams

    def required_columns(self) -> tuple[str, ...]:
        column = self.params.source_column
        return () if column in {f.name for f in CORE_FIELDS} else (column,)

    def decision_columns(self) -> tuple[str, ...]:
        # A row's kind (text or multimodal) is whether it has images: the list, not the bytes.
        return (self.params.source_column, IMAGES_WITHOUT_BYTES)

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
        if not (p.cap or p.source_caps or p.total or self.text_share_on):
            raise ValueError(
                f"{name}: set cap, source_caps, total or text_share (nothing to balance; "
                "concept balancing is the stage concept_balance)"
            )
        if not p.source_column.strip():
            raise ValueError(f"{name}: source_column must name a column")
        if not -(2**63) <= p.seed < 2**63:
            raise ValueError(f"{name}: seed must fit in 64 bits, got {p.seed}")

    @property
    def text_share_on(self) -> bool:
        return self.params.text_share != -1.0

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
        by_source = Grouping(p.source_column)
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
            mark_groups, fn_args=(grouping, p.seed, plans), batch_format="pyarrow"
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
            project(ds, by_kind.columns())
            .map_batches(survivors_pass, fn_args=(by_kind, p.seed, cuts), batch_format="pyarrow")
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
    "balance_targets",
    "source_cap",
    "tempered_targets",
    "text_share_split",
]
