"""The run report: on a real demo run, in headless Chromium, and on small hand-built outputs whose
recorded thresholds, windows, clusters and duplicate groups are known."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import outputs
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from report_outputs import threshold, with_provenance, write_stage

from warren.pipelines import demo
from warren.pipelines.cli import main as cli_main
from warren.pipelines.recipe import main as recipe_main
from warren.pipelines.report import (
    KEPT_COLOUR,
    NOT_RECORDED,
    RankWindow,
    read_stages,
    write_report,
)
from warren.pipelines.report import window_values as report_window_values
from warren.pipelines.report.statistics import duplicate_group_sizes
from warren.pipelines.report.thresholds import recorded, windows

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory) -> tuple[Path, str]:
    """The demo recipe on the bundled pool, run once for the module: (output, what it printed)."""
    out = tmp_path_factory.mktemp("report") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert recipe_main(demo.pipeline(), ["--output", str(out), "--quiet"]) == 0
    return out, printed.getvalue()


class _Page(HTMLParser):
    """What the tests look at in the report: funnel cells, charts, galleries, every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.funnel: dict[str, dict[str, int]] = {}
        self.charts: list[dict[str, str]] = []
        self.galleries: list[dict[str, str]] = []
        self.thumbs: dict[int, int] = {}  # gallery index -> thumbnails (img or placeholder)
        self.srcs: list[str] = []
        self.tags: set[str] = set()
        self.body: dict[str, str] = {}
        self._row: str | None = None
        self._field: str | None = None
        self._stage: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "body":
            self.body = a
        if tag == "section" and "data-stage" in a:
            self._stage = a["id"]
        if tag == "tr" and "data-folder" in a:
            self._row = a["data-folder"]
            self.funnel[self._row] = {}
        if tag == "td" and "data-field" in a:
            self._field = a["data-field"]
        if tag == "figure" and "data-chart" in a:
            self.charts.append({**a, "stage": self._stage or ""})
        if tag == "div" and "data-gallery" in a:
            self.galleries.append({**a, "stage": self._stage or ""})
        if tag == "figure" and a.get("class") == "thumb":
            i = len(self.galleries) - 1
            self.thumbs[i] = self.thumbs.get(i, 0) + 1
        if tag == "img":
            self.srcs.append(a.get("src", ""))

    def handle_data(self, data: str) -> None:
        if self._row and self._field:
            self.funnel[self._row][self._field] = int(data.replace(",", ""))
            self._field = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _score_columns(out: Path) -> dict[str, set[str]]:
    """Per stage folder: the numeric columns its shards have that its input's did not."""
    run = json.loads((out / "run.json").read_text())
    expected, previous = {}, None
    for s in run["stages"]:
        files = sorted((out / s["folder"]).glob("*.parquet")) + sorted(
            (out / s["folder"] / "rejected").glob("*.parquet")
        )
        schema = pq.read_schema(files[0])
        # provenance (a dedup stage's similarity) and window ranks are no scores to histogram
        numeric = {
            f.name
            for f in schema
            if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
            and f.name != "similarity"
            and not f.name.endswith("_rank")
        }
        if previous is not None:
            expected[s["folder"]] = numeric - previous
        previous = numeric
    return expected


def test_every_run_writes_its_report_and_prints_its_path(demo_run):
    out, printed = demo_run
    assert f"report: {out / 'report.html'}" in printed
    assert (out / "report.html").stat().st_size > 10_000


def test_report_shows_the_run_json_funnel_a_histogram_per_score_column_and_reason_galleries(
    demo_run,
):
    out, _ = demo_run
    page = _parse(out / "report.html")
    run = json.loads((out / "run.json").read_text())
    assert page.funnel == {
        s["folder"]: {k: s[k] for k in ("rows_in", "kept", "rejected")} for s in run["stages"]
    }
    assert any(c["data-chart"] == "funnel" for c in page.charts)
    assert any(c["data-chart"] == "reasons" for c in page.charts)

    histograms = {
        (c["stage"], c["data-column"]) for c in page.charts if c["data-chart"] == "histogram"
    }
    expected = {(f, col) for f, cols in _score_columns(out).items() for col in cols}
    assert expected == {("01-image_check", "width"), ("01-image_check", "height")}
    assert histograms == expected

    rejected = [g for g in page.galleries if g["data-gallery"] == "rejected"]
    reasons = {(g["stage"], g["data-reason"]) for g in rejected}
    assert len(reasons) >= 2
    assert ("03-exact_dedup", "exact_dedup: duplicate") in reasons
    for i, g in enumerate(page.galleries):
        assert page.thumbs.get(i, 0) >= 1, g
    kept = [g for g in page.galleries if g["data-gallery"] == "kept"]
    assert {g["stage"] for g in kept} == {s["folder"] for s in run["stages"]}


def test_report_charts_the_demo_duplicate_groups_from_the_duplicate_of_column(demo_run, tmp_path):
    out, _ = demo_run
    run = with_provenance(out, tmp_path / "run")
    # ground truth: the kept copy each exact_dedup reason names, "(of <id>)"
    named = [
        re.search(r"of ([^)]+)\)", r).group(1)
        for r in outputs.rejected_reasons(run / "03-exact_dedup").values()
    ]
    sizes = {k: named.count(k) + 1 for k in named}
    text = Path(write_report(run)).read_text()
    page = _parse(run / "report.html")
    assert any(
        c["data-chart"] == "duplicates" and c["stage"] == "03-exact_dedup" for c in page.charts
    )
    assert (
        f"duplicate groups: {len(sizes)} kept rows with {len(named)} copies removed, "
        f"largest group {max(sizes.values())}"
    ) in text
    assert NOT_RECORDED not in text


def test_report_is_self_contained(demo_run):
    out, _ = demo_run
    page = _parse(out / "report.html")
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs)
    assert "link" not in page.tags and "iframe" not in page.tags
    text = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(" not in text


def test_report_galleries_are_a_seeded_sample(demo_run, tmp_path):
    out, _ = demo_run
    a, b, c = (tmp_path / f"{n}.html" for n in "abc")
    write_report(out, str(a), seed=0)
    write_report(out, str(b), seed=0)
    write_report(out, str(c), seed=1)

    def ids(p: Path) -> list[str]:
        return re.findall(r'class="thumb" data-id="([^"]+)"', p.read_text())

    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_thumbnails_stop_at_the_page_budget(demo_run, tmp_path, monkeypatch):
    import warren.pipelines.report.galleries as galleries_module

    out, _ = demo_run
    monkeypatch.setattr(galleries_module, "THUMBNAIL_BUDGET", 40_000)
    html = Path(write_report(out, str(tmp_path / "small.html"))).read_text()
    thumbs = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', html)
    assert thumbs and sum(map(len, thumbs)) <= 40_000
    assert "thumbnail budget is spent" in html


def test_report_renders_in_headless_chromium_with_charts_and_thumbnails(demo_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (CI installs Debian's `chromium` in .ci/run)")
    from PIL import Image

    out, _ = demo_run
    url = (out / "report.html").as_uri()
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    # The page's own script marks <body data-images-ok="yes"> once every <img> decoded.
    dom = subprocess.run(
        [
            *flags,
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    assert 'data-images-ok="yes"' in body.group(0), body.group(0)
    images = int(re.search(r'data-images="(\d+)"', body.group(0)).group(1))
    assert images == len(_parse(out / "report.html").srcs)
    # The page logs nothing: any console line is an error (uncaught exceptions included).
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console

    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 20  # not a blank page
    # The funnel chart's kept bars are drawn in KEPT_COLOUR: the charts rendered.
    green = np.array([int(KEPT_COLOUR[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)
    assert (np.abs(pixels - green).max(axis=2) < 12).sum() > 2000


def test_no_report_flag_skips_the_report_and_a_failing_report_only_warns(
    demo_run, monkeypatch, capsys
):
    out, _ = demo_run
    report = out / "report.html"
    report.unlink()
    assert recipe_main(demo.pipeline(), ["--output", str(out), "--quiet", "--no-report"]) == 0
    assert not report.exists() and "report:" not in capsys.readouterr().out

    import warren.pipelines.report as report_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "write_report", broken)
    assert recipe_main(demo.pipeline(), ["--output", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "report could not be written" in captured.err and "disk full" in captured.err
    monkeypatch.undo()
    assert cli_main(["report", str(out)]) == 0
    assert f"report: {report}" in capsys.readouterr().out and report.exists()


# ---- hand-built outputs: known thresholds, windows, clusters and duplicate groups -----------


def _built(out: Path, record: bool = True) -> Path:
    """No run.json: the report finds the stage folders by their manifests. With `record` False,
    no manifest records thresholds (a run written before they were)."""

    def rec(entries: list[dict]) -> list[dict] | None:
        return entries if record else None

    rng = np.random.default_rng(0)
    n = 200
    ids = [f"r{i:03d}" for i in range(n)]
    t = pa.table({"id": ids, "caption": [f"caption {i}" for i in range(n)]})
    t = write_stage(out, 0, "ingest", {}, t, {}, rec([]))
    t = t.append_column("cluster_id", pa.array(np.repeat([0, 1, 2, 3], 50), pa.int64()))
    t = t.append_column("nsfw_score", pa.array(rng.random(n), pa.float32()))
    risky = {
        i: f"nsfw: above max_score 0.9 (nsfw_score {s:.2f})"
        for i, s in zip(ids, t.column("nsfw_score").to_pylist(), strict=True)
        if s > 0.9
    }
    nsfw = rec([threshold("max_score", "max", "nsfw_score", 0.9)])
    t = write_stage(out, 1, "nsfw", {"max_score": 0.9, "model": "x"}, t, risky, nsfw)
    left = t.column("id").to_pylist()
    # groups: left[0] keeps 3 copies, left[1] keeps 1; the reasons' "(of ...)" is not read
    of = {left[2]: left[0], left[3]: left[0], left[4]: left[0], left[5]: left[1]}
    dups = {i: f"exact_dedup: duplicate (of {k})" for i, k in of.items()}
    provenance = {"duplicate_of": of, "similarity": {i: 1.0 for i in of}}
    t = write_stage(out, 2, "exact_dedup", {"key": "image"}, t, dups, rec([]), provenance)
    t = t.drop_columns(["duplicate_of", "similarity"])
    scores = rng.normal(0.3, 0.1, t.num_rows).astype(np.float32)
    t = t.append_column("clip_score", pa.array(scores))
    order = sorted(range(t.num_rows), key=lambda i: (-scores[i], t.column("id")[i].as_py()))
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))  # rank 0: the highest score
    t = t.append_column("clip_score_rank", pa.array(ranks))
    m = len(order)
    outside = set(order[: round(0.4 * m)]) | set(order[round(0.6 * m) :])
    window = {t.column("id")[i].as_py(): "clip_score: outside window 40-60%" for i in outside}
    params = {"threshold": -1.0, "lo": 0.4, "hi": 0.6}
    clip = rec(
        [
            threshold("lo", "rank_lo", "clip_score", 0.4),
            threshold("hi", "rank_hi", "clip_score", 0.6),
        ]
    )
    write_stage(out, 3, "clip_score", params, t, window, clip)
    return out


@pytest.fixture()
def built(tmp_path) -> Path:
    return _built(tmp_path)


def test_report_of_a_built_output_draws_windows_thresholds_clusters_and_groups(built):
    path = Path(write_report(built))
    page = _parse(path)
    by_stage = {(c["stage"], c["data-chart"], c.get("data-column", "")) for c in page.charts}
    assert ("01-nsfw", "histogram", "nsfw_score") in by_stage
    assert ("01-nsfw", "clusters", "") in by_stage
    assert ("02-exact_dedup", "duplicates", "") in by_stage
    assert ("03-clip_score", "histogram", "clip_score") in by_stage
    assert not any(col == "cluster_id" for _, kind, col in by_stage if kind == "histogram")
    # provenance and ranks are not scores
    histogrammed = {col for _, kind, col in by_stage if kind == "histogram"}
    assert not histogrammed & {"similarity", "clip_score_rank"}
    text = path.read_text()
    assert "cluster sizes (cluster_id): 4 clusters, median 50 rows" in text
    assert "duplicate groups: 2 kept rows with 4 copies removed, largest group 4" in text
    # the window is drawn between the lowest and highest score the stage kept
    kept = pq.read_table(built / "03-clip_score" / "part-0.parquet").column("clip_score")
    lo, hi = pc.min(kept).as_py(), pc.max(kept).as_py()
    assert f"window 40-60% (highest first): clip_score {lo:.4g} to {hi:.4g}" in text
    assert "nsfw_score: nsfw; max_score 0.9" in text
    assert NOT_RECORDED not in text
    _, stages = read_stages(built)
    assert [s.folder for s in stages] == ["00-ingest", "01-nsfw", "02-exact_dedup", "03-clip_score"]
    assert stages[1].score_columns() == ["nsfw_score"]


def _figures(monkeypatch) -> list:
    """Every matplotlib Figure the report draws, kept for the test to inspect."""
    import warren.pipelines.report.charts as charts

    figures: list = []
    real = charts._svg_data_uri

    def keep(fig):
        figures.append(fig)
        return real(fig)

    monkeypatch.setattr(charts, "_svg_data_uri", keep)
    return figures


def _vertical_lines(fig, label: str) -> list[float]:
    """x of each vertical line whose legend label is `label` on the figure's axes."""
    ax = fig.axes[0]
    return [
        line.get_xdata()[0]
        for line in ax.get_lines()
        if line.get_label() == label and line.get_xdata()[0] == line.get_xdata()[1]
    ]


def test_a_threshold_line_is_drawn_at_the_recorded_value_also_on_an_earlier_stages_column(
    tmp_path, monkeypatch
):
    n = 40
    t = pa.table({"id": [f"r{i:02d}" for i in range(n)], "caption": ["c"] * n})
    t = write_stage(tmp_path, 0, "ingest", {}, t, {}, [])
    t = t.append_column("width", pa.array(np.arange(100, 100 + 10 * n, 10), pa.int32()))
    t = write_stage(tmp_path, 1, "image_check", {}, t, {}, [])
    # image_filter bounds image_check's width: the column is in its rows, not one it added. The
    # value (237.5) is none of a parameter's usual values: it can only come from the manifest.
    small = {
        i: "image_filter: too small"
        for i, w in zip(t["id"].to_pylist(), t["width"].to_pylist(), strict=True)
        if w < 237.5
    }
    recorded_here = [
        threshold("min_width", "min", "width", 237.5),
        threshold("max_height", "max", "height", 900),  # no height in the rows: no chart
    ]
    write_stage(tmp_path, 2, "image_filter", {"min_width": 1}, t, small, recorded_here)
    figures = _figures(monkeypatch)
    page = _parse(Path(write_report(tmp_path)))
    histograms = [
        (c["stage"], c["data-column"]) for c in page.charts if c["data-chart"] == "histogram"
    ]
    assert histograms == [("01-image_check", "width"), ("02-image_filter", "width")]
    drawn = [f for f in figures if f.axes[0].get_xlabel() == "width"]
    assert len(drawn) == 2
    assert _vertical_lines(drawn[0], "min_width 237.5") == []  # image_check recorded none
    assert _vertical_lines(drawn[1], "min_width 237.5") == [237.5]
    assert "width: image_filter; min_width 237.5" in (tmp_path / "report.html").read_text()


def test_an_output_without_recorded_thresholds_draws_none_and_says_so_once(tmp_path, monkeypatch):
    out = _built(tmp_path, record=False)
    figures = _figures(monkeypatch)
    text = Path(write_report(out)).read_text()
    assert text.count(NOT_RECORDED) == 1
    # the histograms of what the stages added are there; no line and no window on them
    page = _parse(out / "report.html")
    histograms = {c["data-column"] for c in page.charts if c["data-chart"] == "histogram"}
    assert histograms == {"nsfw_score", "clip_score"}
    assert "nsfw_score: nsfw; max_score" not in text and "(highest first)" not in text
    for fig in figures:
        assert not [line for line in fig.axes[0].get_lines() if "max_score" in line.get_label()]


def test_duplicate_group_sizes_come_from_the_duplicate_of_column_of_rejected_rows(tmp_path):
    ids = [f"r{i}" for i in range(9)]
    t = write_stage(tmp_path, 0, "ingest", {}, pa.table({"id": ids}), {}, [])
    # hand-worked: r0 kept with copies r3, r4, r5 (a group of 4); r1 with r6 (2); r2 with r7 (2);
    # r8 rejected for another reason (null duplicate_of). The reasons name other ids on purpose.
    of = {"r3": "r0", "r4": "r0", "r5": "r0", "r6": "r1", "r7": "r2"}
    reasons = {i: "semdedup: duplicate (of zz, cos 0.9)" for i in of} | {"r8": "semdedup: empty"}
    similarity = {"r3": 0.99, "r4": 0.95, "r5": 0.97, "r6": 0.91, "r7": 0.9}
    columns = {"duplicate_of": of, "similarity": similarity}
    write_stage(tmp_path, 1, "semdedup", {}, t, reasons, [], columns)
    _, stages = read_stages(tmp_path)
    assert sorted(duplicate_group_sizes(stages[1]).tolist()) == [2, 2, 4]
    assert duplicate_group_sizes(stages[0]) is None
    text = Path(write_report(tmp_path)).read_text()
    assert "duplicate groups: 3 kept rows with 5 copies removed, largest group 4" in text


def test_report_to_a_file_in_a_folder_that_does_not_exist_yet(tmp_path, capsys):
    ids = [f"r{i}" for i in range(3)]
    write_stage(tmp_path / "out", 0, "ingest", {}, pa.table({"id": ids}), {}, [])
    dest = tmp_path / "reports" / "run1.html"
    assert cli_main(["report", str(tmp_path / "out"), "--to", str(dest)]) == 0
    assert dest.read_text().startswith("<!") and str(dest) in capsys.readouterr().out


def test_an_old_dedup_output_without_duplicate_of_has_no_group_chart(tmp_path):
    ids = [f"r{i}" for i in range(4)]
    t = write_stage(tmp_path, 0, "ingest", {}, pa.table({"id": ids}), {}, None)
    reasons = {"r2": "exact_dedup: duplicate (of r0)", "r3": "exact_dedup: duplicate (of r0)"}
    write_stage(tmp_path, 1, "exact_dedup", {}, t, reasons, None)
    page = _parse(Path(write_report(tmp_path)))
    assert not [c for c in page.charts if c["data-chart"] == "duplicates"]
    assert [g["data-reason"] for g in page.galleries if g["data-gallery"] == "rejected"] == [
        "exact_dedup: duplicate"
    ]


def test_recorded_windows_pair_rank_lo_and_rank_hi_per_column_open_where_one_is_absent():
    entries = [
        threshold("keep_lowest", "rank_hi", "ppl", 0.2, descending=False),
        threshold("lo", "rank_lo", "clip_score", 0.4),
        threshold("hi", "rank_hi", "clip_score", 0.6),
        threshold("max_ppl", "max", "ppl", 300.0),
    ]
    assert windows(recorded({"thresholds": entries}, "m")) == [
        RankWindow("ppl", 0.0, 0.2, descending=False),
        RankWindow("clip_score", 0.4, 0.6, descending=True),
    ]
    # a window open above: rank_lo alone keeps ranks [lo, 1)
    assert windows([recorded({"thresholds": [threshold("lo", "rank_lo", "x", 0.9)]}, "m")[0]]) == [
        RankWindow("x", 0.9, 1.0, descending=True)
    ]
    assert recorded({}, "m") is None
    with pytest.raises(ValueError, match="01-x/_manifest.json.*kind 'above'"):
        recorded({"thresholds": [threshold("p", "above", "c", 1.0)]}, "01-x/_manifest.json")
    with pytest.raises(ValueError, match="malformed thresholds entry"):
        recorded({"thresholds": [{"param": "p", "kind": "min"}]}, "01-x/_manifest.json")


def test_window_edges_are_the_values_at_the_window_ranks():
    values = np.arange(100, dtype=np.float64)[::-1].copy()  # 99..0
    np.random.default_rng(1).shuffle(values)
    lo, hi = report_window_values(values, RankWindow("clip_score", 0.4, 0.6, descending=True))
    # ranks 40..59 of the highest-first order are the values 59..40
    assert (lo, hi) == (40.0, 59.0)
    lo, hi = report_window_values(values, RankWindow("ppl", 0.0, 0.2, descending=False))
    assert (lo, hi) == (None, 19.0)


def test_a_thumbnail_never_decodes_a_huge_png_on_the_driver():
    import struct
    import zlib

    from warren.pipelines.report import thumbnail

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    # An RGBA PNG header claiming 16000 x 16000 (256 Mpx: under the pixel limit, ~1 GiB decoded)
    ihdr = struct.pack(">IIBBBBB", 16000, 16000, 8, 6, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    uri, why = thumbnail([{"bytes": png, "path": None}])
    assert uri is None and why.startswith("too many pixels to show (") and "memory" in why
