"""What a run tells while and after it works: progress lines per stage, the report of each stage
(`StageReport`), the funnel table, and the summary saved as `OUTPUT/run.json`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from warren.stages.shards import Location


@dataclasses.dataclass
class StageReport:
    index: int
    name: str
    folder: str
    status: str  # "computed", "resumed", "cached"
    rows_in: int
    kept: int
    rejected: int
    reasons: dict[str, int]
    seconds: float
    fingerprint: str
    sums: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def kept_share(self) -> float:
        return self.kept / self.rows_in if self.rows_in else 0.0

    @classmethod
    def from_manifest(cls, index: int, folder: str, m: dict, status: str) -> StageReport:
        return cls(
            index=index,
            name=m["stage"],
            folder=folder,
            status=status,
            rows_in=m["rows_in"],
            kept=m["kept"],
            rejected=m["rejected"],
            reasons=m["reasons"],
            seconds=m["seconds"] if status != "cached" else 0.0,
            fingerprint=m["fingerprint"],
            sums=m.get("sums", {}),
        )


def summary_table(entries: list[dict]) -> pa.Table:
    """What a worker returns per piece: its source and rows in, kept and rejected."""
    return pa.table(
        {
            "src": [e["src"] for e in entries],
            "rows_in": [e["rows_in"] for e in entries],
            "kept": [e["kept"] for e in entries],
            "rejected": [e["rejected"] for e in entries],
        },
        schema=pa.schema(
            [
                ("src", pa.string()),
                ("rows_in", pa.int64()),
                ("kept", pa.int64()),
                ("rejected", pa.int64()),
            ]
        ),
    )


class Progress:
    """Progress lines of one stage, at most one every two seconds, and the last on demand."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.rows = self.kept = self.rejected = self.printed_rows = 0
        self.start = self.last = time.monotonic()

    def add(self, summary: pa.Table) -> None:
        self.rows += sum(summary.column("rows_in").to_pylist())
        self.kept += sum(summary.column("kept").to_pylist())
        self.rejected += sum(summary.column("rejected").to_pylist())
        now = time.monotonic()
        if self.enabled and now - self.last >= 2.0:
            self.last = now
            self.print()

    def print(self) -> None:
        self.printed_rows = self.rows
        done = f"{self.rows:,}" + (
            f"/{self.total:,} ({100 * self.rows / self.total:.0f}%)" if self.total else ""
        )
        rate = self.rows / max(time.monotonic() - self.start, 1e-9)
        print(
            f"  [{self.label}] {done} rows, kept {self.kept:,}, rejected {self.rejected:,}, "
            f"{rate:,.0f} rows/s",
            flush=True,
        )


def run_summary(
    pipeline: str, input_: dict, output: str, reports: list[StageReport], seconds: float
) -> dict[str, Any]:
    """The content of run.json: the funnel and the final stage."""
    return {
        "pipeline": pipeline,
        "input": input_,
        "output": output,
        "finished_at": now(),
        "seconds": round(seconds, 3),
        "stages": [dict(dataclasses.asdict(r), kept_share=round(r.kept_share, 6)) for r in reports],
        "final": {"folder": reports[-1].folder, "rows": reports[-1].kept} if reports else None,
    }


def format_funnel(summary: dict, top_reasons: int = 3) -> str:
    """The funnel table: rows in, kept, rejected, kept share, top rejection reasons and seconds."""
    head = (
        f"{'stage':<24} {'status':<9} {'rows in':>10} {'kept':>10} {'rejected':>10} "
        f"{'kept %':>7} {'sec':>7}  top rejection reasons"
    )
    lines = [f"funnel for {summary['pipeline']} -> {summary['output']}", head, "-" * len(head)]
    for s in summary["stages"]:
        reasons = sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:top_reasons]
        rtext = "; ".join(f"{k} x{v:,}" for k, v in reasons)
        lines.append(
            f"{s['folder']:<24} {s['status']:<9} {s['rows_in']:>10,} {s['kept']:>10,} "
            f"{s['rejected']:>10,} {100 * s['kept_share']:>6.1f}% {s['seconds']:>7.1f}  {rtext}"
        )
    for s in summary["stages"]:
        if s.get("sums"):
            totals = "; ".join(f"{k} {v:,.0f}" for k, v in s["sums"].items())
            lines.append(f"{s['folder']}: {totals}")
    if summary.get("final"):
        lines.append(
            f"final: {summary['final']['rows']:,} rows in {summary['final']['folder']} "
            f"({summary['seconds']:.1f} s)"
        )
    return "\n".join(lines)


def sum_columns(out: Location, files: list[str], columns: Sequence[str]) -> dict[str, float]:
    """Totals of numeric columns over a stage's shards; a file without a column adds nothing."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sums = dict.fromkeys(columns, 0)
    for f in files if columns else []:
        with out.fs.open_input_file(out.join(f).path) as fh:
            pf = pq.ParquetFile(fh)
            present = [c for c in columns if c in pf.schema_arrow.names]
            if not present:
                continue
            table = pf.read(columns=present)
        for c in present:
            sums[c] += pc.sum(table.column(c)).as_py() or 0
    return sums


def schema_of(out: Location, files: list[dict]) -> str | None:
    import pyarrow.parquet as pq

    if not files:
        return None
    with out.fs.open_input_file(out.join(files[0]["name"]).path) as f:
        return str(pq.read_schema(f))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
