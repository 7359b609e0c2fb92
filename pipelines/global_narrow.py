"""The narrow side of a global stage: the columns its decision reads, and nothing else.

A global stage decides on `id`, the input position and its `decision_columns()`; the image bytes
and every other wide column stay in the input's Parquet files until the decisions are applied
(`pipelines.run_global`). Each piece of the input (the fixed position ranges of
`run_global.global_pieces`) is read with Parquet column projection, so a column not named is never
read from storage. A stage with a `prepare` step (hashing image bytes, say) runs it once per piece
here and its narrow output is kept under the stage's work folder: a resumed run reads it back
instead of hashing again. A cheap `prepare` (`keeps_prepared = False`) runs in the read task and
is not kept.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines.run_errors import PipelineError, compact_errors
from warren.stages.base import IMAGES_WITHOUT_BYTES, POSITION_COLUMN, GlobalStage
from warren.stages.shards import Location, RowReader, write_table_atomic

# Under the stage's work folder: the prepared narrow pieces.
NARROW_DIR = "narrow"


def parquet_columns(pf: pq.ParquetFile, wanted: tuple[str, ...]) -> list[str]:
    """The Parquet column paths to read for `wanted` (top-level names, or IMAGES_WITHOUT_BYTES)
    from one file; names the file lacks are left out."""
    names = set(pf.schema_arrow.names)
    out: list[str] = []
    for name in ("id", *wanted):
        if name == IMAGES_WITHOUT_BYTES:
            if "images" not in names:
                continue
            # Every leaf of the image list except the bytes: the list lengths come with any leaf.
            leaves = [
                pf.schema.column(i).path
                for i in range(len(pf.schema))
                if pf.schema.column(i).path.startswith("images.")
            ]
            light = [p for p in leaves if not p.endswith(".bytes")]
            out.extend(light or ["images"])
        elif name in names and name not in out:
            out.append(name)
    return out


def narrow_reader(fs: Any, wanted: tuple[str, ...] | None) -> RowReader:
    """A reader of consecutive pieces: the `wanted` columns (the id, the position and
    IMAGES_WITHOUT_BYTES as `parquet_columns` reads them), or every column for None (the wide
    rows). A row group two pieces share is read once."""
    if wanted is None:
        return RowReader(fs)
    return RowReader(fs, lambda pf: parquet_columns(pf, wanted))


def read_piece(reader: RowReader, segments: list) -> pa.Table:
    """One piece (its segments [path, offset, rows, first position]) with the position column."""
    tables = []
    for path, offset, rows, pos in segments:
        table = reader.read(path, offset, rows)
        positions = pa.array(np.arange(pos, pos + table.num_rows, dtype=np.int64))
        tables.append(table.append_column(POSITION_COLUMN, positions))
    return pa.concat_tables(tables, promote_options="default")


def read_names(stage: GlobalStage) -> set[str]:
    """The top-level input columns the narrow rows may carry as read (not made by the stage)."""
    names = {"id", POSITION_COLUMN}
    for name in stage.decision_columns():
        names.add("images" if name == IMAGES_WITHOUT_BYTES else name)
    return names


def narrow_file(work: Location, part: int) -> Location:
    return work.join(NARROW_DIR, f"{part:09d}.parquet")


@compact_errors
def narrow_read_task(
    items: pa.Table, fs: Any, stage: GlobalStage, work: Location | None
) -> pa.Table:
    """Each item's piece as narrow rows: read, then `prepare`d when the stage prepares (kept in
    `work` and read back from there once written)."""
    tables = []
    reader = narrow_reader(fs, stage.decision_columns())
    for item in items.to_pylist():
        saved = narrow_file(work, item["part"]) if work is not None else None
        if saved is not None and saved.exists():
            with saved.fs.open_input_file(saved.path) as f:
                tables.append(pq.read_table(f))
            continue
        table = read_piece(reader, json.loads(item["segments"]))
        if stage.prepares:
            table = prepared(stage, table)
        if saved is not None:
            write_table_atomic(table, saved)
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default")


def prepared(stage: GlobalStage, table: pa.Table) -> pa.Table:
    out = stage.prepare(table)
    if not isinstance(out, pa.Table) or out.num_rows != table.num_rows:
        raise PipelineError(
            f"stage {stage.name}: prepare() must return every row of its piece "
            f"({table.num_rows}), got {getattr(out, 'num_rows', type(out).__name__)}"
        )
    if POSITION_COLUMN not in out.column_names or not out.column(POSITION_COLUMN).equals(
        table.column(POSITION_COLUMN)
    ):
        raise PipelineError(
            f"stage {stage.name}: prepare() lost or reordered the {POSITION_COLUMN!r} column"
        )
    return out
