"""report: one self-contained HTML page about a pipeline run, for choosing thresholds by looking.

`write_report(OUTPUT)` reads a run's output folder (the runner's layout: `run.json`, and per stage
`NN-stage/_manifest.json`, kept shards and `rejected/` shards) and writes `OUTPUT/report.html`:

- the funnel as a chart and a table (rows in, kept, rejected per stage) and the rejections by
  reason;
- per stage, a histogram of every score column the stage added or ranked by, kept and rejected
  rows stacked, with the stage's threshold (a line) or rank window (a shaded band between the
  values at the window's ranks, computed from the column) drawn on it;
- cluster sizes (from `cluster_id` value counts) and duplicate-group sizes (from the "(of <id>"
  in dedup reasons) where such stages ran;
- per stage, a gallery of kept rows and one per rejection reason: a seeded, bounded sample,
  128 px JPEG thumbnails with caption, id, scores and reason;
- the parameters, versions and timings from the manifests.

Everything is embedded (charts as SVG data URIs drawn by matplotlib through `Figure` objects,
which never touch pyplot's global backend; thumbnails as JPEG data URIs; CSS and a few lines of
script inline), so the file opens offline and can be mailed around. Statistics read only the
Parquet columns they need; images are read only for the sampled gallery rows, so a report over a
million rows takes seconds (benchmarks/report.py), not minutes.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warren.stages.base import reason_key
from warren.stages.ledger import REJECTED_DIR
from warren.stages.run_layout import MANIFEST
from warren.stages.schema import REASON_COLUMN
from warren.stages.shards import Location

REPORT_FILE = "report.html"
KEPT_SAMPLES = 12  # thumbnails of kept rows per stage
REASON_SAMPLES = 8  # thumbnails per rejection reason
MAX_REASON_GALLERIES = 12  # per stage, the most frequent reasons first
THUMB_PX = 128
CAPTION_CHARS = 140
BINS = 50
# Rejected galleries hold decompression bombs on purpose, and the report is drawn on the driver:
# a thumbnail takes the stages' pixel limit (stages.images.DEFAULT_MAX_PIXELS) and at most this
# much memory for its decode. A large JPEG still shows (it decodes at 1/8 scale); a 16000 px PNG,
# decoded in full, does not.
THUMB_MEMORY = 256 * 2**20
# Thumbnails are the bulk of the page (about 5 kB each): past this many bytes of them the rest
# are left out, so a run with many stages and reasons still gives a page under 20 MB.
THUMBNAIL_BUDGET = 12 * 2**20

# Numeric columns that are identifiers or hashes, not scores: a histogram of them means nothing.
NOT_SCORES = frozenset({"phash", "cluster_id", "image_cluster"})
# Columns holding cluster assignments: their value counts are the cluster sizes.
CLUSTER_COLUMNS = ("cluster_id", "image_cluster")

# Absolute thresholds: stage parameter -> (score column it bounds, the value that turns it off).
# A line is drawn only when the stage added (or ranks by) that column, so a parameter name shared
# by stages (caption_check's and caption_filter's min_chars) never draws on a foreign column.
THRESHOLDS: dict[str, tuple[str, float | None]] = {
    "threshold": ("clip_score", -1.0),
    "min_width": ("width", 0),
    "max_width": ("width", 0),
    "min_height": ("height", 0),
    "max_height": ("height", 0),
    "max_aspect_ratio": ("aspect_ratio", 0),
    "min_bytes": ("image_bytes", 0),
    "max_bytes": ("image_bytes", 0),
    "max_frames": ("n_frames", 0),
    "max_blank_share": ("blank_share", 0),
    "min_words": ("caption_words", 0),
    "max_words": ("caption_words", 0),
    "min_chars": ("caption_chars", 0),
    "max_chars": ("caption_chars", 0),
    "max_char_rep_ratio": ("char_rep_ratio", 0),
    "max_word_rep_ratio": ("word_rep_ratio", 0),
    "min_score": ("lang_score", None),
    "max_score": ("nsfw_score", None),
    "max_ppl": ("ppl", 0),
    "max_distance": ("phash_distance", None),
}

# Thresholds on a column an earlier stage wrote (image_filter bounds image_check's width and
# height). Other parameter names are too generic to follow upstream (semdedup's `threshold` is no
# clip_score threshold), so their lines are drawn only on columns their own stage added.
UPSTREAM_THRESHOLDS = ("min_width", "max_width", "min_height", "max_height")

# "(of <id>, ...)", "(image of <id>)": the kept row a duplicate was removed in favour of.
# The lazy `??` matters: "(of a, cos 0.9, component of 3)" names a, not 3.
_DUPLICATE_OF = re.compile(r"\((?:[^()]*?\s)??of ([^,)\s]+)")


def duplicate_of(reason: str | None) -> str | None:
    """The id a dedup reason names as the copy that was kept, or None."""
    if not reason or "duplicate" not in reason_key(reason):
        return None
    m = _DUPLICATE_OF.search(reason)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------
# Reading a run's output


@dataclasses.dataclass
class StageOutput:
    """One stage folder of a run: its manifest, its shard paths and the columns it added."""

    index: int
    folder: str
    loc: Location
    manifest: dict
    kept_files: list[tuple[str, int]]  # (path, rows)
    rejected_files: list[tuple[str, int]]
    schema: dict[str, pa.DataType]  # union of the kept and rejected shards' columns
    added: list[str]  # columns this stage's rows have and its input's did not

    @property
    def name(self) -> str:
        return self.manifest.get("stage", self.folder.split("-", 1)[-1])

    @property
    def params(self) -> dict:
        return self.manifest.get("params") or {}

    def score_columns(self) -> list[str]:
        """Numeric columns the stage added, then upstream columns it ranks by or bounds."""
        cols = [c for c in self.added if _is_numeric(self.schema[c]) and c not in NOT_SCORES]
        window = rank_window(self)
        upstream = [window.column] if window else []
        upstream += [
            THRESHOLDS[name][0]
            for name in UPSTREAM_THRESHOLDS
            if name in self.params and self.params[name] != THRESHOLDS[name][1]
        ]
        for c in upstream:
            if c in self.schema and c not in cols:
                cols.append(c)
        return cols

    def cluster_columns(self) -> list[str]:
        return [c for c in CLUSTER_COLUMNS if c in self.added]


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _schema_of(loc: Location, files: Sequence[tuple[str, int]]) -> dict[str, pa.DataType]:
    if not files:
        return {}
    with loc.fs.open_input_file(files[0][0]) as f:
        return {field.name: field.type for field in pq.read_schema(f)}


def read_stages(output: str | Location) -> tuple[dict | None, list[StageOutput]]:
    """(run.json or None, every completed stage of the run in order).

    The folders come from run.json when there is one (the runner's order); without it, every
    `NN-name` folder that has a manifest. Shards are the ones the manifest lists: nothing else
    in a folder (leftovers of a killed task) is read.
    """
    out = Location.of(output) if not isinstance(output, Location) else output
    if not out.is_dir():
        raise FileNotFoundError(f"{out.uri}: no such folder")
    run_loc = out.join("run.json")
    run = run_loc.read_json() if run_loc.exists() else None
    if run is not None:
        folders = [s["folder"] for s in run["stages"]]
    else:
        import pyarrow.fs as pafs

        infos = out.fs.get_file_info(pafs.FileSelector(out.path))
        folders = sorted(
            fi.base_name
            for fi in infos
            if fi.type == pafs.FileType.Directory and re.match(r"^\d\d-", fi.base_name)
        )
    stages: list[StageOutput] = []
    previous: dict[str, pa.DataType] = {}
    for i, folder in enumerate(folders):
        loc = out.join(folder)
        if not loc.join(MANIFEST).exists():
            continue
        manifest = loc.join(MANIFEST).read_json()
        kept = [(loc.join(f["name"]).path, int(f["rows"])) for f in manifest.get("files", [])]
        rejected = [
            (loc.join(REJECTED_DIR, f["name"]).path, int(f["rows"]))
            for f in manifest.get("rejected_files", [])
        ]
        schema = {**_schema_of(loc, rejected), **_schema_of(loc, kept)}
        schema.pop(REASON_COLUMN, None)
        # ingest has no input to compare with: what the source had is not a stage's score.
        added = [c for c in schema if c not in previous] if i and stages else []
        stages.append(StageOutput(i, folder, loc, manifest, kept, rejected, schema, added))
        if schema:
            previous = schema
    if not stages:
        raise FileNotFoundError(f"{out.uri}: no stage folder with a {MANIFEST}; not a run output")
    return run, stages


# --------------------------------------------------------------------------------------------
# Thresholds and windows


@dataclasses.dataclass(frozen=True)
class RankWindow:
    """Keep ranks [lo, hi) of `column` (rank 0 = highest when descending)."""

    column: str
    lo: float
    hi: float
    descending: bool


def rank_window(stage: StageOutput) -> RankWindow | None:
    """The rank window a stage applies, read off its parameters; None for stages without one."""
    p = stage.params
    if "keep_lowest" in p:  # ppl_filter: the lowest fraction by ppl (or its per-source z-score)
        column = "ppl_norm" if p.get("normalize") == "source" else "ppl"
        return RankWindow(column, 0.0, float(p["keep_lowest"]), descending=False)
    if "lo" in p and "hi" in p:
        if (float(p["lo"]), float(p["hi"])) == (0.0, 1.0):
            return None
        column = p.get("column") if isinstance(p.get("column"), str) else None
        if column is None or "descending" not in p:
            column = "clip_score"  # clip_score ranks its own score, highest first
        return RankWindow(column, float(p["lo"]), float(p["hi"]), bool(p.get("descending", True)))
    return None


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


def threshold_lines(stage: StageOutput, column: str) -> list[tuple[str, float]]:
    """(parameter, value) of every absolute threshold of the stage on `column`."""
    lines = []
    for name, value in stage.params.items():
        if name not in THRESHOLDS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        target, off = THRESHOLDS[name]
        if target == column and (off is None or value != off):
            lines.append((name, float(value)))
    if column == "max_cos_earlier" and "eps" in stage.params:
        lines.append(("1 - eps", 1.0 - float(stage.params["eps"])))
    return lines


# --------------------------------------------------------------------------------------------
# Statistics: only the columns they need


@dataclasses.dataclass
class StageStats:
    kept: dict[str, np.ndarray]  # score column -> values (NaN for null)
    rejected: dict[str, np.ndarray]
    reasons: np.ndarray  # one reason per rejected row, in rejected_files order (object array)
    cluster_sizes: dict[str, np.ndarray]  # cluster column -> sizes of its clusters
    duplicate_groups: np.ndarray | None  # sizes of duplicate groups (kept row + its copies)


def _read(stage: StageOutput, path: str, columns: Sequence[str]) -> pa.Table:
    """The given columns of one shard (those it has); nothing else is read."""
    with stage.loc.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])


def _numeric_columns(
    stage: StageOutput, files: Sequence[tuple[str, int]], columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each column over the files as float64; NaN for nulls and for shards without the column."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for path, rows in files:
        table = _read(stage, path, columns) if columns else None
        for c in columns:
            if table is not None and c in table.column_names:
                values = pc.fill_null(table.column(c).cast(pa.float64()), np.nan)
                parts[c].append(values.to_numpy())
            else:
                parts[c].append(np.full(rows, np.nan))
    return {c: np.concatenate(p) if p else np.array([]) for c, p in parts.items()}


def _reasons(stage: StageOutput) -> np.ndarray:
    out: list[str] = []
    for path, _ in stage.rejected_files:
        out.extend(_read(stage, path, [REASON_COLUMN]).column(REASON_COLUMN).to_pylist())
    return np.asarray(out, dtype=object)


def stage_stats(stage: StageOutput) -> StageStats:
    scores = stage.score_columns()
    clusters = stage.cluster_columns()
    kept = _numeric_columns(stage, stage.kept_files, scores + clusters)
    rejected = _numeric_columns(stage, stage.rejected_files, scores + clusters)
    reasons = _reasons(stage)
    cluster_sizes = {}
    for c in clusters:
        ids = np.concatenate([kept.pop(c), rejected.pop(c)])
        ids = ids[np.isfinite(ids)]
        cluster_sizes[c] = np.unique(ids, return_counts=True)[1] if len(ids) else np.array([])
    groups = None
    if any("duplicate" in r for r in stage.manifest.get("reasons", {})):
        kept_ids = [k for k in map(duplicate_of, reasons) if k is not None]
        if kept_ids:
            _, copies = np.unique(np.asarray(kept_ids, dtype=object), return_counts=True)
            groups = copies + 1
    return StageStats(kept, rejected, reasons, cluster_sizes, groups)


# --------------------------------------------------------------------------------------------
# Charts (matplotlib, SVG)

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
    labels = [_shorten(k, 70) for k, _ in items]
    fig, ax = _figure(9.0, 0.32 * len(items) + 1.0, left_in=max(map(len, labels)) * 0.065 + 0.3)
    ax.barh(labels, [n for _, n in items], color=REJECTED_COLOUR)
    for y, (_, n) in enumerate(items):
        ax.text(n, y, f" {n:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(n for _, n in items) * 1.2)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("rows rejected")
    return _svg_data_uri(fig)


# --------------------------------------------------------------------------------------------
# Galleries: a seeded sample, only the sampled rows' images read


@dataclasses.dataclass
class Sample:
    id: str
    caption: str
    thumbnail: str | None  # a data URI, or None when the image cannot be shown
    note: str  # why there is no thumbnail
    scores: dict[str, Any]
    reason: str | None = None


def _locate(files: Sequence[tuple[str, int]], positions: Iterable[int]) -> dict[int, list[int]]:
    """Global row positions over `files` -> {file index: [row in file]}."""
    bounds = np.cumsum([0] + [rows for _, rows in files])
    out: dict[int, list[int]] = {}
    for p in positions:
        f = int(np.searchsorted(bounds, p, side="right") - 1)
        out.setdefault(f, []).append(int(p - bounds[f]))
    return out


def _read_rows(stage: StageOutput, path: str, rows: list[int], columns: list[str]) -> list[dict]:
    """The given rows of one shard, read row group by row group in small batches, stopping after
    the last wanted row: a sample of 12 never decompresses a whole shard's images."""
    out = []
    with stage.loc.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        start = 0
        wanted = sorted(set(rows))
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            here = [r - start for r in wanted if start <= r < start + n]
            start += n
            if not here:
                continue
            pos = 0
            for batch in pf.iter_batches(batch_size=64, row_groups=[rg], columns=present):
                take = [r - pos for r in here if pos <= r < pos + batch.num_rows]
                if take:
                    out.extend(batch.take(pa.array(take)).to_pylist())
                pos += batch.num_rows
                if pos > here[-1]:
                    break
    return out


def thumbnail(images: list[dict] | None) -> tuple[str | None, str]:
    """(JPEG data URI of the first image at THUMB_PX, '') or (None, why not)."""

    from warren.stages.images import ImageTooLargeError, decode_image

    if not images:
        return None, "no image"
    data = images[0].get("bytes")
    if not data:
        return None, "image stored by path" if images[0].get("path") else "empty image"
    try:
        # As every stage sees it (orientation, transparency on white, first frame), decoded at
        # a reduced scale (JPEG draft) that keeps at least THUMB_PX on the shorter side.
        img = decode_image(data, reduce_to=THUMB_PX, memory_limit=THUMB_MEMORY)
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75)
    except ImageTooLargeError as exc:
        return None, f"too many pixels to show ({exc.detail})"
    except Exception as exc:  # anything PIL raises on a damaged file means: no thumbnail
        return None, f"cannot decode: {type(exc).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), ""


def _text_of(row: dict) -> str:
    if row.get("caption"):
        return row["caption"]
    turns = row.get("conversations") or []
    return " / ".join((t.get("value") or "") for t in turns[:2])


@dataclasses.dataclass
class _Budget:
    """Bytes of thumbnails the page may still take."""

    # Read at creation, not at import, so the budget can be changed (tests, a caller).
    left: int = dataclasses.field(default_factory=lambda: THUMBNAIL_BUDGET)


def _samples(
    stage: StageOutput,
    files: Sequence[tuple[str, int]],
    positions: Sequence[int],
    scores: list[str],
    rejected: bool,
    budget: _Budget,
) -> list[Sample]:
    columns = ["id", "caption", "conversations", "images", *scores]
    if rejected:
        columns.append(REASON_COLUMN)
    rows: list[dict] = []
    for f, local in sorted(_locate(files, positions).items()):
        rows.extend(_read_rows(stage, files[f][0], local, columns))
    out = []
    for row in sorted(rows, key=lambda r: r["id"]):
        uri, note = thumbnail(row.get("images")) if budget.left > 0 else (None, "")
        if budget.left <= 0 or (uri and len(uri) > budget.left):
            uri, note = None, "left out: the page's thumbnail budget is spent"
        budget.left -= len(uri or "")
        out.append(
            Sample(
                id=row["id"],
                caption=_shorten(_text_of(row), CAPTION_CHARS),
                thumbnail=uri,
                note=note,
                scores={c: row.get(c) for c in scores if c in row},
                reason=row.get(REASON_COLUMN),
            )
        )
    return out


def galleries(
    stage: StageOutput, stats: StageStats, seed: int, budget: _Budget | None = None
) -> tuple[list[Sample], list[tuple[str, int, list[Sample]]]]:
    """(kept samples, [(reason, rejected rows with it, samples)]) for one stage, seeded."""
    budget = budget if budget is not None else _Budget()
    rng = np.random.default_rng([seed, stage.index])
    scores = stage.score_columns()
    n_kept = sum(rows for _, rows in stage.kept_files)
    picks = rng.choice(n_kept, size=min(KEPT_SAMPLES, n_kept), replace=False) if n_kept else []
    kept = _samples(stage, stage.kept_files, sorted(int(p) for p in picks), scores, False, budget)
    keys = np.asarray([reason_key(r or "") for r in stats.reasons], dtype=object)
    by_reason = []
    if len(keys):
        uniq, counts = np.unique(keys, return_counts=True)
        for key, count in sorted(zip(uniq, counts, strict=True), key=lambda kc: (-kc[1], kc[0])):
            if len(by_reason) == MAX_REASON_GALLERIES:
                break
            where = np.flatnonzero(keys == key)
            chosen = rng.choice(where, size=min(REASON_SAMPLES, len(where)), replace=False)
            samples = _samples(
                stage, stage.rejected_files, sorted(int(p) for p in chosen), scores, True, budget
            )
            by_reason.append((str(key), int(count), samples))
    return kept, by_reason


# --------------------------------------------------------------------------------------------
# HTML

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


def _shorten(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-")


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
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in s.scores.items())
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
            f'<tr data-folder="{_e(s["folder"])}"><td><a href="#{_slug(s["folder"])}">'
            f"{_e(s['folder'])}</a></td><td>{_e(s['status'])}</td>"
            f'<td class="num" data-field="rows_in">{s["rows_in"]:,}</td>'
            f'<td class="num" data-field="kept">{s["kept"]:,}</td>'
            f'<td class="num" data-field="rejected">{s["rejected"]:,}</td>'
            f'<td class="num">{share:.1f}%</td><td class="num">{s["seconds"]:.1f}</td>'
            f"<td>{reasons}</td></tr>"
        )
    return f'<table class="funnel">{head}{"".join(rows)}</table>'


def _params_table(stages: Sequence[StageOutput]) -> str:
    head = (
        "<tr><th>stage</th><th>version</th><th>kind</th><th>status</th><th>seconds</th>"
        "<th>completed</th><th>parameters</th></tr>"
    )
    rows = []
    for st in stages:
        m = st.manifest
        params = "<br>".join(
            f"<code>{_e(k)}={_e(_shorten(json.dumps(v, default=str), 200))}</code>"
            for k, v in st.params.items()
        )
        rows.append(
            f"<tr><td>{_e(st.folder)}</td><td>{_e(m.get('version', ''))}</td>"
            f"<td>{_e(m.get('kind', ''))}</td><td>{_e(m.get('status', ''))}</td>"
            f'<td class="num">{float(m.get("seconds", 0.0)):.1f}</td>'
            f"<td>{_e(m.get('completed_at', ''))}</td><td>{params}</td></tr>"
        )
    return f'<table class="params">{head}{"".join(rows)}</table>'


def _funnel_from_manifests(stages: Sequence[StageOutput]) -> list[dict]:
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


def _stage_section(stage: StageOutput, seed: int, budget: _Budget) -> str:
    m = stage.manifest
    stats = stage_stats(stage)
    parts = [
        f'<section class="stage" id="{_slug(stage.folder)}" data-stage="{_e(stage.name)}">',
        f"<h2>{_e(stage.folder)}</h2>",
        f"<p>{m['rows_in']:,} rows in, {m['kept']:,} kept, {m['rejected']:,} rejected; "
        f"{float(m.get('seconds', 0.0)):.1f} s ({_e(m.get('status', ''))}).</p>",
    ]
    charts = []
    window = rank_window(stage)
    for col in stage.score_columns():
        kept, rej = stats.kept[col], stats.rejected[col]
        band, label = None, ""
        if window and window.column == col:
            band = window_values(np.concatenate([kept, rej]), window)
            order = "highest first" if window.descending else "lowest first"
            label = f"window {100 * window.lo:g}-{100 * window.hi:g}% ({order})"
        lines = threshold_lines(stage, col)
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


def render(output: str | Location, seed: int = 0) -> str:
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
        f'<a href="#{_slug(x)}">{_e(x)}</a>' for x in ["funnel"] + [s.folder for s in stages]
    )
    body = [
        f"<header><h1>warren report: {_e(title)}</h1>"
        + "".join(f"<p>{line}</p>" for line in meta)
        + f"<p>report written {generated}</p></header><main>",
        f'<nav><a href="#params">parameters</a> {nav}</nav>',
        '<section id="funnel"><h2>Funnel</h2>',
        _chart(funnel_chart(funnel), "rows per stage: kept and rejected", "funnel"),
        _funnel_table(funnel),
    ]
    reasons = reasons_chart(funnel)
    if reasons:
        body.append(_chart(reasons, "rejections by reason", "reasons"))
    body.append("</section>")
    budget = _Budget()
    body.extend(_stage_section(st, seed, budget) for st in stages)
    body.append(f'<section id="params"><h2>Parameters and timings</h2>{_params_table(stages)}')
    body.append("</section></main>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>warren report: {_e(title)}</title><style>{CSS}</style></head>"
        f'<body data-images-ok="pending">{"".join(body)}<script>{SCRIPT}</script></body></html>\n'
    )


def write_report(output: str | Location, dest: str | None = None, seed: int = 0) -> str:
    """Write the report (default OUTPUT/report.html) atomically; return its path or URI."""
    out = Location.of(output) if not isinstance(output, Location) else output
    target = Location.of(dest) if dest else out.join(REPORT_FILE)
    target.write_bytes_atomic(render(out, seed).encode())
    return target.uri


def main(argv: Sequence[str] | None = None) -> int:
    """`warren report OUTPUT [--to FILE] [--seed N]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="warren report", description="Write an HTML report of a pipeline output folder."
    )
    parser.add_argument("output", help="a run's output folder (has run.json or NN-stage folders)")
    parser.add_argument("--to", dest="dest", help=f"the HTML file (default: OUTPUT/{REPORT_FILE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gallery samples")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        path = write_report(args.output, args.dest, args.seed)
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        print(f"warren report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path} ({time.time() - started:.1f} s)")
    return 0


__all__ = ["REPORT_FILE", "duplicate_of", "read_stages", "render", "write_report", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
