"""Reading a stage's output folder in tests: its kept shards and its rejected ledger."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def table(folder: Path, rejected: bool = False) -> pa.Table:
    """Every kept (or rejected) row of a stage folder, as one table."""
    files = sorted((folder / "rejected" if rejected else folder).glob("*.parquet"))
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def rejected_reasons(folder: Path) -> dict[str, str]:
    """id -> reason of every row the stage rejected."""
    t = table(folder, rejected=True)
    if not t.num_rows:
        return {}
    return dict(zip(t.column("id").to_pylist(), t.column("reason").to_pylist(), strict=True))
