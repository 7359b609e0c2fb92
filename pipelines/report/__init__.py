"""report: one self-contained HTML page about a pipeline run, for choosing thresholds by looking.

`write_report(OUTPUT)` reads a run's output folder through `warren.stages.run_layout` and writes
`OUTPUT/report.html`. One concern per module:

- stage_view.py   the run's stages with their columns and recorded thresholds (also `explain`'s)
- thresholds.py   the manifest's thresholds: lines and rank windows, and the windows' edges
- statistics.py   score values, reasons, cluster and duplicate-group sizes (only needed columns)
- charts.py       matplotlib charts as SVG data URIs
- galleries.py    seeded samples of kept and rejected rows as JPEG thumbnails
- page.py         the HTML page
- command.py      `write_report` and `warren report`

Statistics read only the Parquet columns they need; images are read only for the sampled gallery
rows, so a report over a million rows takes seconds (benchmarks/report.py), not minutes.
"""

from warren.pipelines.report.charts import KEPT_COLOUR, REJECTED_COLOUR
from warren.pipelines.report.command import REPORT_FILE, main, write_report
from warren.pipelines.report.galleries import thumbnail
from warren.pipelines.report.page import render
from warren.pipelines.report.stage_view import StageView, read_stages
from warren.pipelines.report.thresholds import NOT_RECORDED, RankWindow, window_values

__all__ = [
    "KEPT_COLOUR",
    "NOT_RECORDED",
    "REJECTED_COLOUR",
    "REPORT_FILE",
    "RankWindow",
    "StageView",
    "main",
    "read_stages",
    "render",
    "thumbnail",
    "window_values",
    "write_report",
]
