"""The report's HTML: one self-contained page about a run, for choosing thresholds by looking.

`render(OUTPUT)` reads the run through `stage_view.read_stages` and writes

- the funnel as a chart and a table (rows in, kept, rejected per stage) and the rejections by
  reason;
- per stage, a histogram of every score column the stage added or bounds, kept and rejected rows
  stacked, with the thresholds its manifest recorded drawn on it (a line, or a rank window as a
  shaded band between the values at the window's ranks, computed from the column);
- cluster sizes (from `cluster_id` value counts) and duplicate-group sizes (from the rejected
  rows' `duplicate_of` column) where such stages ran;
- per stage, the galleries (galleries.py);
- the parameters, versions and timings from the manifests.

Everything is embedded (charts as SVG data URIs, thumbnails as JPEG data URIs, CSS and a few
lines of script inline), so the file opens offline and can be mailed around.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from warren.pipelines.report.charts import funnel_chart, histogram_chart, reasons_chart, sizes_chart
from warren.pipelines.report.galleries import Budget, Sample, galleries
from warren.pipelines.report.stage_view import StageView, read_stages
from warren.pipelines.report.statistics import StageStats, stage_stats
from warren.pipelines.report.text import fmt, shorten, slug
from warren.pipelines.report.thresholds import NOT_RECORDED, window_values
from warren.stages.shards import Location

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#1f3b73;color:#fff;padding:16px 24px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;font-size:13px;opacity:.9}
main{padding:8px 24px 40px;max-width:1400px}
nav{font-size:13px;margin:12px 0}
nav a{margin-right:12px;color:#1f3b73}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:16px 0;padding:8px 16px 16px}
h2{font-size:18px;margin:12px 0 8px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{margin:0}
.chart img{max-width:640px;width:100%;height:auto;display:block}
.chart figcaption{font-size:12px;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
.thumb{width:150px;margin:0;font-size:11px;border:1px solid #eee;padding:4px;background:#fcfcfc;
overflow-wrap:anywhere}
.thumb img{width:128px;height:128px;object-fit:contain;background:#eee;display:block;margin:auto}
.noimg{width:128px;height:128px;background:#eee;color:#777;display:flex;align-items:center;
justify-content:center;text-align:center;margin:auto;font-size:11px}
.id{font-family:ui-monospace,monospace;color:#1f3b73}
.reason{color:#c8553d}
.scores{color:#555}
code{font-size:12px}
"""

# The page checks its own images once loaded, so a headless browser (and a curious user) can see
# whether every chart and thumbnail decoded: <body data-images-ok="yes">.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.imagesOk = broken.length ? "no: " + broken.length + " broken" : "yes";
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _chart(uri: str | None, caption: str, kind: str, column: str = "") -> str:
    if uri is None:
        return f'<p class="empty">{_e(caption)}: no values</p>'
    col = f' data-column="{_e(column)}"' if column else ""
    return (
        f'<figure class="chart" data-chart="{kind}"{col}><img src="{uri}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _gallery(samples: list[Sample], kind: str, reason: str = "") -> str:
    attrs = f' data-gallery="{kind}"' + (f' data-reason="{_e(reason)}"' if reason else "")
    cards = []
    for s in samples:
        pic = (
            f'<img src="{s.thumbnail}" alt="{_e(s.id)}">'
            if s.thumbnail
            else f'<div class="noimg">{_e(s.note)}</div>'
        )
        scores = ", ".join(f"{k} {fmt(v)}" for k, v in s.scores.items())
        parts = [pic, f'<div class="id">{_e(s.id)}</div>', f"<div>{_e(s.caption)}</div>"]
        if scores:
            parts.append(f'<div class="scores">{_e(scores)}</div>')
        if s.reason:
            parts.append(f'<div class="reason">{_e(s.reason)}</div>')
        cards.append(f'<figure class="thumb" data-id="{_e(s.id)}">{"".join(parts)}</figure>')
    return f'<div class="gallery"{attrs}>{"".join(cards)}</div>'


def _funnel_table(stages: Sequence[dict]) -> str:
    head = (
        "<tr><th>stage</th><th>status</th><th>rows in</th><th>kept</th><th>rejected</th>"
        "<th>kept %</th><th>seconds</th><th>rejections by reason</th></tr>"
    )
    rows = []
    for s in stages:
        share = 100 * s["kept"] / s["rows_in"] if s["rows_in"] else 0.0
        reasons = "<br>".join(f"{_e(r)} &times;{n:,}" for r, n in s["reasons"].items())
        rows.append(
            f'<tr data-folder="{_e(s["folder"])}"><td><a href="#{slug(s["folder"])}">'
            f"{_e(s['folder'])}</a></td><td>{_e(s['status'])}</td>"
            f'<td class="num" data-field="rows_in">{s["rows_in"]:,}</td>'
            f'<td class="num" data-field="kept">{s["kept"]:,}</td>'
            f'<td class="num" data-field="rejected">{s["rejected"]:,}</td>'
            f'<td class="num">{share:.1f}%</td><td class="num">{s["seconds"]:.1f}</td>'
            f"<td>{reasons}</td></tr>"
        )
    return f'<table class="funnel">{head}{"".join(rows)}</table>'


def _params_table(stages: Sequence[StageView]) -> str:
    head = (
        "<tr><th>stage</th><th>version</th><th>kind</th><th>status</th><th>seconds</th>"
        "<th>completed</th><th>parameters</th></tr>"
    )
    rows = []
    for st in stages:
        m = st.manifest
        params = "<br>".join(
            f"<code>{_e(k)}={_e(shorten(json.dumps(v, default=str), 200))}</code>"
            for k, v in st.params.items()
        )
        rows.append(
            f"<tr><td>{_e(st.folder)}</td><td>{_e(m.get('version', ''))}</td>"
            f"<td>{_e(m.get('kind', ''))}</td><td>{_e(m.get('status', ''))}</td>"
            f'<td class="num">{float(m.get("seconds", 0.0)):.1f}</td>'
            f"<td>{_e(m.get('completed_at', ''))}</td><td>{params}</td></tr>"
        )
    return f'<table class="params">{head}{"".join(rows)}</table>'


def _funnel_from_manifests(stages: Sequence[StageView]) -> list[dict]:
    return [
        {
            "folder": st.folder,
            "status": st.manifest.get("status", ""),
            "rows_in": st.manifest["rows_in"],
            "kept": st.manifest["kept"],
            "rejected": st.manifest["rejected"],
            "reasons": st.manifest.get("reasons", {}),
            "seconds": st.manifest.get("seconds", 0.0),
        }
        for st in stages
    ]


def _histograms(stage: StageView, stats: StageStats) -> list[str]:
    """One histogram per score column, with the stage's recorded lines and rank window on it."""
    charts = []
    windows = {w.column: w for w in stage.windows()}
    for col in stage.score_columns():
        kept, rej = stats.kept[col], stats.rejected[col]
        band, label = None, ""
        window = windows.get(col)
        if window is not None:
            band = window_values(np.concatenate([kept, rej]), window)
            order = "highest first" if window.descending else "lowest first"
            label = f"window {100 * window.lo:g}-{100 * window.hi:g}% ({order})"
        lines = stage.lines(col)
        missing = int((~np.isfinite(kept)).sum() + (~np.isfinite(rej)).sum())
        notes = [f"{name} {value:g}" for name, value in lines]
        if band is not None and band != (None, None):
            edges = " to ".join("open" if e is None else f"{e:.4g}" for e in band)
            notes.append(f"{label}: {col} {edges}")
        if missing:
            notes.append(f"{missing:,} rows without a value")
        caption = "; ".join([f"{col}: {stage.name}", *notes])
        uri = histogram_chart(col, kept, rej, lines, band, label)
        charts.append(_chart(uri, caption, "histogram", col))
    return charts


def _stage_section(stage: StageView, seed: int, budget: Budget) -> str:
    m = stage.manifest
    stats = stage_stats(stage)
    parts = [
        f'<section class="stage" id="{slug(stage.folder)}" data-stage="{_e(stage.name)}">',
        f"<h2>{_e(stage.folder)}</h2>",
        f"<p>{m['rows_in']:,} rows in, {m['kept']:,} kept, {m['rejected']:,} rejected; "
        f"{float(m.get('seconds', 0.0)):.1f} s ({_e(m.get('status', ''))}).</p>",
    ]
    charts = _histograms(stage, stats)
    for col, sizes in stats.cluster_sizes.items():
        caption = (
            f"cluster sizes ({col}): {len(sizes):,} clusters, median {np.median(sizes):g} rows"
            if len(sizes)
            else f"cluster sizes ({col})"
        )
        charts.append(
            _chart(sizes_chart(sizes, "rows per cluster", "clusters"), caption, "clusters")
        )
    if stats.duplicate_groups is not None:
        g = stats.duplicate_groups
        caption = (
            f"duplicate groups: {len(g):,} kept rows with {int(g.sum() - len(g)):,} copies removed, "
            f"largest group {int(g.max())}"
        )
        charts.append(
            _chart(sizes_chart(g, "rows per duplicate group", "groups"), caption, "duplicates")
        )
    if charts:
        parts.append(f'<div class="charts">{"".join(charts)}</div>')
    kept_samples, by_reason = galleries(stage, stats, seed, budget)
    if kept_samples:
        parts.append(f"<h3>kept: {len(kept_samples)} of {m['kept']:,} (seeded sample)</h3>")
        parts.append(_gallery(kept_samples, "kept"))
    for key, count, samples in by_reason:
        parts.append(f'<h3 class="reason">rejected: {_e(key)} ({len(samples)} of {count:,})</h3>')
        parts.append(_gallery(samples, "rejected", key))
    hidden = len(m.get("reasons", {})) - len(by_reason)
    if hidden > 0:
        parts.append(f"<p>{hidden} less frequent reasons have no gallery.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _not_recorded_note(stages: Sequence[StageView]) -> list[str]:
    """Once per page: a stage whose manifest predates recorded thresholds draws no lines."""
    if all(st.thresholds is not None for st in stages):
        return []
    return [f'<p class="note" data-note="thresholds">{_e(NOT_RECORDED)}</p>']


def _evaluations_section(output: str | os.PathLike | Location) -> str:
    """Models trained on this output and evaluated (`warren eval` notes each one in
    OUTPUT/evaluations.json): their headline metrics and a link to each evaluation."""
    loc = output if isinstance(output, Location) else Location.of(output)
    file = loc.join("evaluations.json")
    if not file.exists():
        return ""
    from warren.stages.run_layout import read_json

    try:
        entries = read_json(file)
    except (ValueError, OSError):
        return ""
    rows = []
    for e in entries:
        metrics = "; ".join(
            f"{_e(task)}: " + ", ".join(f"{_e(k)} {v:.2f}" for k, v in list(m.items())[:3])
            for task, m in e.get("metrics", {}).items()
        )
        href = _e(Path(str(e.get("results", ""))).as_uri()) if e.get("results") else ""
        rows.append(
            f"<tr><td>{_e(e.get('checkpoint'))}</td><td>{metrics}</td>"
            f'<td><a href="{href}">results.json</a></td><td>{_e(e.get("evaluated_at"))}</td></tr>'
        )
    return (
        '<section id="evaluations"><h2>Models trained on this output</h2><table>'
        "<tr><th>checkpoint</th><th>metrics</th><th>evaluation</th><th>when</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def render(output: str | os.PathLike | Location, seed: int = 0) -> str:
    """The report's HTML for a run output folder."""
    run, stages = read_stages(output)
    funnel = run["stages"] if run else _funnel_from_manifests(stages)
    title = run["pipeline"] if run else stages[-1].loc.path.rsplit("/", 2)[-2]
    meta = []
    if run:
        meta.append(f"input: {_e(json.dumps(run.get('input'), default=str))}")
        meta.append(f"output: {_e(run.get('output'))}")
        meta.append(
            f"finished {_e(run.get('finished_at'))} in {float(run.get('seconds', 0)):.1f} s"
        )
        if run.get("final"):
            meta.append(f"final: {run['final']['rows']:,} rows in {_e(run['final']['folder'])}")
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    nav = " ".join(
        f'<a href="#{slug(x)}">{_e(x)}</a>' for x in ["funnel"] + [s.folder for s in stages]
    )
    body = [
        f"<header><h1>warren report: {_e(title)}</h1>"
        + "".join(f"<p>{line}</p>" for line in meta)
        + f"<p>report written {generated}</p></header><main>",
        f'<nav><a href="#params">parameters</a> {nav}</nav>',
        *_not_recorded_note(stages),
        '<section id="funnel"><h2>Funnel</h2>',
        _chart(funnel_chart(funnel), "rows per stage: kept and rejected", "funnel"),
        _funnel_table(funnel),
    ]
    reasons = reasons_chart(funnel)
    if reasons:
        body.append(_chart(reasons, "rejections by reason", "reasons"))
    body.append("</section>")
    budget = Budget()
    body.extend(_stage_section(st, seed, budget) for st in stages)
    body.append(_evaluations_section(output))
    body.append(f'<section id="params"><h2>Parameters and timings</h2>{_params_table(stages)}')
    body.append("</section></main>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>warren report: {_e(title)}</title><style>{CSS}</style></head>"
        f'<body data-images-ok="pending">{"".join(body)}<script>{SCRIPT}</script></body></html>\n'
    )
