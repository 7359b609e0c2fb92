"""The run report and `warren explain`: on a real demo run, in headless Chromium, and on a small
hand-built output whose windows, thresholds, clusters and duplicate groups are known."""

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

from warren.pipelines import demo
from warren.pipelines.cli import main as cli_main
from warren.pipelines.recipe import main as recipe_main
from warren.pipelines.report import (
    KEPT_COLOUR,
    RankWindow,
    duplicate_of,
    read_stages,
    write_report,
)
from warren.pipelines.report import window_values as report_window_values

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
        numeric = {
            f.name for f in schema if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        }
        # provenance (a removed duplicate's similarity) and ranks are not scores
        numeric = {c for c in numeric if c != "similarity" and not c.endswith("_rank")}
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
    # the exact_dedup stage ran: its duplicate groups are charted
    assert any(
        c["data-chart"] == "duplicates" and c["stage"] == "03-exact_dedup" for c in page.charts
    )


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
    import warren.pipelines.report as report_module

    out, _ = demo_run
    monkeypatch.setattr(report_module, "THUMBNAIL_BUDGET", 40_000)
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


def test_explain_names_the_stage_rule_and_kept_copy_of_a_removed_duplicate(demo_run, capsys):
    out, _ = demo_run
    reasons = outputs.rejected_reasons(out / "03-exact_dedup")
    row, reason = sorted(reasons.items())[0]
    kept = re.search(r"of ([^)]+)\)", reason).group(1)
    assert cli_main(["explain", str(out), row]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"row {row!r} in {out}"
    for folder in ("00-ingest", "01-image_check", "02-caption_check"):
        assert any(line.split()[:2] == [folder, "passed"] for line in lines), printed
    removed = next(line for line in lines if "REMOVED" in line)
    assert "03-exact_dedup" in removed and "exact_dedup: duplicate" in removed and kept in removed
    assert f"duplicate of {kept} (kept to the end (03-exact_dedup))" in printed
    assert (
        lines[-1]
        == "ended: removed at 03-exact_dedup (stage exact_dedup), rule 'exact_dedup: duplicate'"
    )


def test_explain_shows_scores_of_a_kept_row_and_skips_stages_after_a_removal(demo_run, capsys):
    out, _ = demo_run
    final = outputs.table(out / "03-exact_dedup").to_pylist()[0]
    assert cli_main(["explain", str(out), final["id"]]) == 0
    printed = capsys.readouterr().out
    assert f"width {final['width']}, height {final['height']}" in printed
    assert printed.rstrip().endswith("ended: kept, in the final output 03-exact_dedup")

    broken = sorted(outputs.rejected_reasons(out / "01-image_check").items())[0]
    assert cli_main(["explain", str(out), broken[0]]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"01-image_check +REMOVED +{re.escape(broken[1])}", printed), printed
    assert printed.count("not in the input of this stage") == 2


def test_explain_an_unknown_id_is_a_clear_error_with_exit_code_1(demo_run, capsys):
    out, _ = demo_run
    assert cli_main(["explain", str(out), "no-such-row"]) == 1
    err = capsys.readouterr().err
    assert "no row with id 'no-such-row'" in err and "00-ingest" in err


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


# ---- a hand-built output: known windows, thresholds, clusters and duplicate groups ----------


def _stage(
    out: Path, index: int, name: str, params: dict, table: pa.Table, reasons: dict
) -> pa.Table:
    """Write a stage folder as the runner does; `reasons` maps rejected ids to their reason."""
    folder = out / f"{index:02d}-{name}"
    (folder / "rejected").mkdir(parents=True)
    ids = table.column("id").to_pylist()
    mask = pa.array([i in reasons for i in ids])
    kept, rejected = table.filter(pc.invert(mask)), table.filter(mask)
    rejected = rejected.append_column(
        "reason", pa.array([reasons[i] for i in rejected.column("id").to_pylist()])
    )
    pq.write_table(kept, folder / "part-0.parquet")
    files = [{"name": "part-0.parquet", "rows": kept.num_rows}]
    rejected_files = []
    if rejected.num_rows:
        pq.write_table(rejected, folder / "rejected" / "part-0.parquet")
        rejected_files = [{"name": "part-0.parquet", "rows": rejected.num_rows}]
    keys: dict[str, int] = {}
    for r in reasons.values():
        keys[r.split(" (")[0]] = keys.get(r.split(" (")[0], 0) + 1
    manifest = {
        "stage": name,
        "version": "1",
        "params": params,
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "rejected": rejected.num_rows,
        "reasons": keys,
        "files": files,
        "rejected_files": rejected_files,
        "seconds": 1.0,
        "status": "computed",
    }
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return kept


@pytest.fixture()
def built(tmp_path) -> Path:
    """No run.json: the report finds the stage folders by their manifests."""
    rng = np.random.default_rng(0)
    n = 200
    ids = [f"r{i:03d}" for i in range(n)]
    t = pa.table({"id": ids, "caption": [f"caption {i}" for i in range(n)]})
    t = _stage(tmp_path, 0, "ingest", {}, t, {})
    t = t.append_column("cluster_id", pa.array(np.repeat([0, 1, 2, 3], 50), pa.int64()))
    t = t.append_column("nsfw_score", pa.array(rng.random(n), pa.float32()))
    risky = {
        i: f"nsfw: above max_score 0.9 (nsfw_score {s:.2f})"
        for i, s in zip(ids, t.column("nsfw_score").to_pylist(), strict=True)
        if s > 0.9
    }
    t = _stage(tmp_path, 1, "nsfw", {"max_score": 0.9, "model": "x"}, t, risky)
    left = t.column("id").to_pylist()
    # groups: left[0] keeps 3 copies, left[1] keeps 1
    dups = {
        left[2]: f"exact_dedup: duplicate (of {left[0]})",
        left[3]: f"exact_dedup: duplicate (of {left[0]})",
    }
    dups[left[4]] = f"exact_dedup: duplicate (image of {left[0]})"
    dups[left[5]] = f"exact_dedup: duplicate (of {left[1]})"
    t = _stage(tmp_path, 2, "exact_dedup", {"key": "image"}, t, dups)
    scores = rng.normal(0.3, 0.1, t.num_rows).astype(np.float32)
    t = t.append_column("clip_score", pa.array(scores))
    order = sorted(range(t.num_rows), key=lambda i: (-scores[i], t.column("id")[i].as_py()))
    m = len(order)
    outside = set(order[: round(0.4 * m)]) | set(order[round(0.6 * m) :])
    window = {t.column("id")[i].as_py(): "clip_score: outside window 40-60%" for i in outside}
    _stage(tmp_path, 3, "clip_score", {"threshold": -1.0, "lo": 0.4, "hi": 0.6}, t, window)
    return tmp_path


def test_report_of_a_built_output_draws_windows_thresholds_clusters_and_groups(built):
    path = Path(write_report(built))
    page = _parse(path)
    by_stage = {(c["stage"], c["data-chart"], c.get("data-column", "")) for c in page.charts}
    assert ("01-nsfw", "histogram", "nsfw_score") in by_stage
    assert ("01-nsfw", "clusters", "") in by_stage
    assert ("02-exact_dedup", "duplicates", "") in by_stage
    assert ("03-clip_score", "histogram", "clip_score") in by_stage
    assert not any(col == "cluster_id" for _, kind, col in by_stage if kind == "histogram")
    text = path.read_text()
    assert "cluster sizes (cluster_id): 4 clusters, median 50 rows" in text
    assert "duplicate groups: 2 kept rows with 4 copies removed, largest group 4" in text
    # the window is drawn between the lowest and highest score the stage kept
    kept = pq.read_table(built / "03-clip_score" / "part-0.parquet").column("clip_score")
    lo, hi = pc.min(kept).as_py(), pc.max(kept).as_py()
    assert f"window 40-60% (highest first): clip_score {lo:.4g} to {hi:.4g}" in text
    assert "nsfw_score: nsfw; max_score 0.9" in text
    _, stages = read_stages(built)
    assert [s.folder for s in stages] == ["00-ingest", "01-nsfw", "02-exact_dedup", "03-clip_score"]
    assert stages[1].score_columns() == ["nsfw_score"]


def test_window_edges_are_the_values_at_the_window_ranks():
    values = np.arange(100, dtype=np.float64)[::-1].copy()  # 99..0
    np.random.default_rng(1).shuffle(values)
    lo, hi = report_window_values(values, RankWindow("clip_score", 0.4, 0.6, descending=True))
    # ranks 40..59 of the highest-first order are the values 59..40
    assert (lo, hi) == (40.0, 59.0)
    lo, hi = report_window_values(values, RankWindow("ppl", 0.0, 0.2, descending=False))
    assert (lo, hi) == (None, 19.0)


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("exact_dedup: duplicate (of abc)", "abc"),
        ("exact_dedup: duplicate (image+caption of a.b_c)", "a.b_c"),
        ("semdedup: duplicate (of x1, cos 0.931)", "x1"),
        ("semdedup: duplicate (of k, cos 0.9, component of 3)", "k"),
        ("phash_dedup: near duplicate (of 0042, distance 3)", "0042"),
        ("clip_score: below window 40-60% (rank 87.3%, clip_score 0.1)", None),
    ],
)
def test_duplicate_reasons_name_the_kept_copy(reason, kept):
    assert duplicate_of(reason) == kept


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
