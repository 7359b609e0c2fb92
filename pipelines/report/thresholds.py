"""The thresholds a stage recorded in its manifest, as the report draws them.

The runner writes `manifest["thresholds"]`: the stage's own `Stage.thresholds()`, a list of
{param, kind, column, value, descending} with kind one of min, max, rank_lo, rank_hi. A min or
max is a line at `value` on `column`; a rank window is the rank_lo/rank_hi pair on one column
(either may be absent: the window is open on that side), drawn as a band between the column's
values at the window's ranks. A manifest written before thresholds were recorded has no such key:
`recorded()` gives None and the page says so once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from warren.stages.base import Threshold

LINE_KINDS = ("min", "max")
WINDOW_KINDS = ("rank_lo", "rank_hi")
NOT_RECORDED = (
    "thresholds not recorded (run written by an older warren; re-run the stage to see them)"
)


@dataclasses.dataclass(frozen=True)
class RankWindow:
    """Keep ranks [lo, hi) of `column` (rank 0 = highest when descending)."""

    column: str
    lo: float
    hi: float
    descending: bool


def recorded(manifest: dict, where: str) -> list[Threshold] | None:
    """The thresholds a manifest recorded; None for a manifest from before they were recorded.
    `where` names the manifest in the error a malformed entry raises."""
    entries = manifest.get("thresholds")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'thresholds' is {type(entries).__name__}, expected a list")
    out = []
    for entry in entries:
        try:
            t = Threshold(
                param=str(entry["param"]),
                kind=str(entry["kind"]),
                column=str(entry["column"]),
                value=float(entry["value"]),
                descending=bool(entry.get("descending", True)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"{where}: malformed thresholds entry {entry!r} ({exc!r}); expected "
                "{param, kind, column, value, descending}"
            ) from exc
        if t.kind not in LINE_KINDS + WINDOW_KINDS:
            raise ValueError(
                f"{where}: threshold {t.param!r} has kind {t.kind!r}; "
                f"expected one of {', '.join(LINE_KINDS + WINDOW_KINDS)}"
            )
        out.append(t)
    return out


def windows(thresholds: Sequence[Threshold]) -> list[RankWindow]:
    """One window per column that has a rank_lo or rank_hi, in the order they were recorded."""
    bounds: dict[str, dict[str, Threshold]] = {}
    for t in thresholds:
        if t.kind in WINDOW_KINDS:
            bounds.setdefault(t.column, {})[t.kind] = t
    out = []
    for column, pair in bounds.items():
        lo, hi = pair.get("rank_lo"), pair.get("rank_hi")
        descending = (lo or hi).descending  # type: ignore[union-attr]
        out.append(RankWindow(column, lo.value if lo else 0.0, hi.value if hi else 1.0, descending))
    return out


def lines(thresholds: Sequence[Threshold], column: str) -> list[tuple[str, float]]:
    """(parameter, value) of every min or max threshold on `column`."""
    return [(t.param, t.value) for t in thresholds if t.kind in LINE_KINDS and t.column == column]


def window_values(values: np.ndarray, w: RankWindow) -> tuple[float | None, float | None]:
    """(smallest kept value, largest kept value) of the window, from the column's own values.

    None on a side where the window is open. Ranks are exact (ties broken by id in the stage,
    which only matters inside one value, so the values at the boundary ranks are exact too).
    """
    v = values[~np.isnan(values)]  # as stages.select ranks: +-inf take part, NaN (null) not
    n = len(v)
    if not n:
        return None, None
    first, last = round(w.lo * n), round(w.hi * n) - 1  # ranks of the first and last kept rows
    if last < first:
        return None, None

    def at_rank(r: int) -> float:
        k = n - 1 - r if w.descending else r  # position in ascending order
        return float(np.partition(v, k)[k])

    edge_first = at_rank(first) if first > 0 else None
    edge_last = at_rank(last) if last < n - 1 else None
    # An infinite edge cannot be drawn: that side of the band then runs to the plot's edge.
    edge_first = edge_first if edge_first is not None and np.isfinite(edge_first) else None
    edge_last = edge_last if edge_last is not None and np.isfinite(edge_last) else None
    return (edge_last, edge_first) if w.descending else (edge_first, edge_last)
