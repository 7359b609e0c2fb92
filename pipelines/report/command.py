"""`warren report OUTPUT`: write the page (page.py) next to the run, atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from warren.pipelines.report.page import render
from warren.stages.shards import Location

REPORT_FILE = "report.html"


def write_report(
    output: str | os.PathLike | Location, dest: str | None = None, seed: int = 0
) -> str:
    """Write the report (default OUTPUT/report.html) atomically; return its path or URI."""
    out = output if isinstance(output, Location) else Location.of(output)
    target = Location.of(dest) if dest else out.join(REPORT_FILE)
    if dest:
        target.mkdir_parent()  # `--to reports/run1.html`, as `warren export --to` makes its folder
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
