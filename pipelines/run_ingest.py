"""Running the reader stage: read every unit under `_read/`, decide on repeated ids, then write
the stage's rows.

Each step resumes: read by unit, the id decisions once, the final rows by unit. The `_read/` and
`_ids/` folders go once every unit is written. Ids are unique per run: a repeated id is
rejected (or, on request, suffixed), the first in input order kept; see `stages.unique_ids`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa

from warren.pipelines.funnel import summary_table
from warren.pipelines.ray_session import READ_CPUS, cluster_cpus
from warren.pipelines.run_errors import PipelineError, compact_errors
from warren.stages import unique_ids
from warren.stages.ledger import (
    PROGRESS_DIR,
    commit_piece,
    complete_sources,
    mark_source_done,
    read_ledger,
)
from warren.stages.readers.base import Reader, ReadUnit
from warren.stages.readers.stage import INGEST, ReaderStage
from warren.stages.run_layout import REJECTED_DIR, StageFolder
from warren.stages.schema import conform
from warren.stages.shards import Location

if TYPE_CHECKING:
    from warren.pipelines.runner import Runner


@compact_errors
def _ingest_task(batch: pa.Table, reader: Reader, out: Location) -> pa.Table:
    entries = []
    for row in batch.to_pylist():
        unit = ReadUnit(key=row["key"], path=row["path"], options=json.loads(row["options"]))
        total = 0
        for seq, table in enumerate(reader.read(unit)):
            table = conform(table, where=f"{reader.format} reader, {unit.path}")
            # Each row's record index in its unit: where a repeated id was first seen.
            table = unique_ids.with_records(table, total)
            entries.append(commit_piece(out, unit.key, table, piece=str(seq)))
            total += table.num_rows
        mark_source_done(out, unit.key, total)
    return summary_table(entries)


@compact_errors
def _unique_ids_task(batch: pa.Table, raw: Location, out: Location, mode: str) -> pa.Table:
    entries = []
    for row in batch.to_pylist():
        entries += unique_ids.apply_unit(
            raw, out, row["key"], row["unit"], json.loads(row["entries"]), mode
        )
    return summary_table(entries)


def run_ingest(
    runner: Runner, stage: ReaderStage, out: Location, upstream: StageFolder | None = None
) -> None:
    """Read the input into `out`; returns None (the input's row count is what the reader finds)
    once every planned unit is written."""
    import ray

    reader = stage.reader
    units = stage.plan()
    if len({u.key for u in units}) != len(units):
        raise PipelineError(f"{reader.format} reader planned duplicate unit keys")
    by_key = {u.key: u for u in units}
    keys = list(by_key)
    raw = out.join(unique_ids.RAW_DIR)
    if runner.pending(out, None, keys):
        raw.mkdir()
        raw.join(REJECTED_DIR).mkdir()
        raw.join(PROGRESS_DIR).mkdir()
        pending = runner.pending(raw, None, keys)
        if pending:
            items = [
                {"key": k, "path": by_key[k].path, "options": json.dumps(by_key[k].options)}
                for k in pending
            ]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                _ingest_task,
                batch_size=1,
                batch_format="pyarrow",
                fn_args=(reader, raw),
                num_cpus=stage.num_cpus,
            )
            runner.drain(ds, INGEST, None)
        _unique_ids(runner, stage, out, raw, keys)
    raw.rmtree()
    out.join(unique_ids.IDS_DIR).rmtree()
    complete = complete_sources(read_ledger(out), None)
    if complete != set(keys):
        folder = out.path.rstrip("/").rsplit("/", 1)[-1]
        raise PipelineError(f"{folder}: {len(set(keys) - complete)} input units did not finish")
    return None


def _unique_ids(
    runner: Runner, stage: ReaderStage, out: Location, raw: Location, keys: list[str]
) -> None:
    import ray

    mode = stage.on_duplicate_id
    state = read_ledger(raw)
    if complete_sources(state, None) != set(keys):
        raise PipelineError(f"{INGEST}: {len(set(keys) - set(state.done_markers))} units unread")
    order = {k: i for i, k in enumerate(keys)}
    entries = unique_ids.raw_entries(state.entries)
    # Input order: units as planned, a unit's pieces by name (the reader's piece order
    # decides nothing: the record index in each row does).
    files = [
        (raw.join(f["name"]).path, order[k])
        for k in keys
        for e in sorted(entries.get(k, []), key=lambda e: e["tag"])
        for f in e["files"]
    ]
    kept = sum(e["kept"] for e in state.entries)
    repeated = unique_ids.decide(out, files, keys, mode, kept, cluster_cpus())
    if repeated:
        verb = "renamed or rejected" if mode == "suffix" else "rejected"
        runner.log(f"  {repeated:,} rows repeat an id seen before: {verb}")
    pending = runner.pending(out, None, keys)
    if not pending:
        return
    items = [
        {"key": k, "unit": order[k], "entries": json.dumps(entries.get(k, []))} for k in pending
    ]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    ds = ds.map_batches(
        _unique_ids_task,
        batch_size=1,
        batch_format="pyarrow",
        fn_args=(raw, out, mode),
        num_cpus=READ_CPUS,
    )
    runner.drain(ds, f"{INGEST}: unique ids", sum(state.done_markers.values()))
