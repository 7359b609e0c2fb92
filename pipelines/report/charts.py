"""The report's charts: matplotlib `Figure` objects (never pyplot's global backend) saved as SVG
data URIs, so the page embeds them and opens offline. Text stays text and a fixed salt makes a
rerun's SVG identical."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

from warren.pipelines.report.text import shorten

BINS = 50

KEPT_COLOUR = "#3a8f5c"
REJECTED_COLOUR = "#c8553d"
WINDOW_COLOUR = "#f2c14e"
WINDOW_EDGE_COLOUR = "#9a6b00"  # darker, so a narrow window still shows over the bars
LINE_COLOUR = "#1f3b73"


def _figure(width: float = 6.4, height: float = 2.8, left_in: float = 0.75):
    from matplotlib.figure import Figure

    # Fixed margins (in inches, so labels fit at any size): a layout engine would draw every
    # figure twice, which is most of a small report's time.
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left_in / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.15 / height
    )
    return fig, fig.subplots()


def _svg_data_uri(fig) -> str:
    import matplotlib

    buf = io.BytesIO()
    # Text stays text (smaller, no embedded glyphs); a fixed salt and no date make reruns identical.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "warren"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _bin_edges(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """(edges, log x): integer bins for small integer ranges, log bins for heavy positive tails."""
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo - 0.5, hi + 0.5]), False
    if np.all(values == np.round(values)) and hi - lo <= BINS:
        return np.arange(lo - 0.5, hi + 1.5), False
    if lo > 0:
        p1, p99 = np.percentile(values, [1, 99])
        if p1 > 0 and p99 / p1 > 1000:
            return np.geomspace(lo, hi, BINS + 1), True
    return np.linspace(lo, hi, BINS + 1), False


def histogram_chart(
    column: str,
    kept: np.ndarray,
    rejected: np.ndarray,
    lines: list[tuple[str, float]],
    band: tuple[float | None, float | None] | None,
    band_label: str = "",
) -> str | None:
    """Stacked histogram of kept and rejected values with thresholds and a window; None if empty."""
    k = kept[np.isfinite(kept)]
    r = rejected[np.isfinite(rejected)]
    both = np.concatenate([k, r])
    if not len(both):
        return None
    edges, log_x = _bin_edges(both)
    hk, _ = np.histogram(k, edges)
    hr, _ = np.histogram(r, edges)
    fig, ax = _figure()
    widths = np.diff(edges)
    ax.bar(edges[:-1], hk, widths, align="edge", color=KEPT_COLOUR, label=f"kept ({len(k):,})")
    ax.bar(
        edges[:-1],
        hr,
        widths,
        bottom=hk,
        align="edge",
        color=REJECTED_COLOUR,
        label=f"rejected here ({len(r):,})",
    )
    if band is not None and band != (None, None):
        lo = band[0] if band[0] is not None else edges[0]
        hi = band[1] if band[1] is not None else edges[-1]
        ax.axvspan(lo, hi, color=WINDOW_COLOUR, alpha=0.3, zorder=0, label=band_label)
        for edge in band:
            if edge is not None:
                ax.axvline(edge, color=WINDOW_EDGE_COLOUR, linewidth=1.5)
    for name, value in lines:
        ax.axvline(
            value, color=LINE_COLOUR, linestyle="--", linewidth=1.5, label=f"{name} {value:g}"
        )
    if log_x:
        ax.set_xscale("log")
    if hk.max(initial=0) + hr.max(initial=0) > 50 * max(1, np.median((hk + hr)[hk + hr > 0])):
        ax.set_yscale("log")
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8, frameon=False)
    return _svg_data_uri(fig)


def sizes_chart(sizes: np.ndarray, xlabel: str, ylabel: str) -> str | None:
    if not len(sizes):
        return None
    fig, ax = _figure()
    edges, log_x = _bin_edges(sizes.astype(np.float64))
    counts, _ = np.histogram(sizes, edges)
    ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color=LINE_COLOUR)
    if log_x:
        ax.set_xscale("log")
    if counts.max(initial=0) > 50 * max(1, np.median(counts[counts > 0])):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _svg_data_uri(fig)


def funnel_chart(stages: Sequence[dict]) -> str:
    """Horizontal bars, one per stage: kept and rejected stacking up to the rows in."""
    labels = [s["folder"] for s in stages][::-1]
    kept = np.array([s["kept"] for s in stages][::-1])
    rejected = np.array([s["rejected"] for s in stages][::-1])
    width = max(len(label) for label in labels) * 0.075 + 0.3
    fig, ax = _figure(8.0, 0.45 * len(stages) + 1.0, left_in=width)
    ax.barh(labels, kept, color=KEPT_COLOUR, label="kept")
    ax.barh(labels, rejected, left=kept, color=REJECTED_COLOUR, label="rejected")
    for y, (kp, rj) in enumerate(zip(kept, rejected, strict=True)):
        ax.text(kp + rj, y, f" {kp:,} / {kp + rj:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(1, int((kept + rejected).max(initial=1))) * 1.25)
    ax.set_xlabel("rows")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _svg_data_uri(fig)


def reasons_chart(stages: Sequence[dict], most: int = 30) -> str | None:
    # "06 clip_score: above window": the reason already names its rule, the number its stage.
    items = [(f"{s['folder'][:2]} {r}", n) for s in stages for r, n in s["reasons"].items()]
    items = sorted(items, key=lambda kv: -kv[1])[:most][::-1]
    if not items:
        return None
    labels = [shorten(k, 70) for k, _ in items]
    fig, ax = _figure(9.0, 0.32 * len(items) + 1.0, left_in=max(map(len, labels)) * 0.065 + 0.3)
    ax.barh(labels, [n for _, n in items], color=REJECTED_COLOUR)
    for y, (_, n) in enumerate(items):
        ax.text(n, y, f" {n:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(n for _, n in items) * 1.2)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("rows rejected")
    return _svg_data_uri(fig)
