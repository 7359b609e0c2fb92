"""Running a global stage: read in fixed pieces, the stage's Ray Data plan, written back in the
same pieces.

A global stage reads its input in fixed pieces of GLOBAL_ROWS_PER_PART rows (in the order of the
upstream manifest's files), each row tagged with its input position (POSITION_COLUMN). Whatever
the stage does to the rows (shuffles, groups), its output is written back in the same pieces:
piece k holds the rows at positions [k * GLOBAL_ROWS_PER_PART, (k + 1) * GLOBAL_ROWS_PER_PART),
sorted by position. A block that holds a whole piece (a row-wise stage keeps the read's blocks)
is committed at once; the parts of a piece spread over several blocks (a grouping stage) are
staged as fragments and merged by one task per piece. Memory: a block, or a piece. A global
stage restarts from its input.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from warren.pipelines.funnel import summary_table
from warren.pipelines.ray_session import READ_CPUS, cluster_cpus
from warren.pipelines.run_errors import PipelineError, compact_errors
from warren.pipelines.run_map import GLOBAL_ROWS_PER_PART, normalise_src, upstream_rows
from warren.stages.base import POSITION_COLUMN, GlobalContext, GlobalStage
from warren.stages.ledger import commit_piece
from warren.stages.run_layout import StageFolder
from warren.stages.schema import conform
from warren.stages.shards import TMP_PREFIX, Location, read_rows, write_table_atomic

if TYPE_CHECKING:
    from warren.pipelines.runner import Runner

# Where a global stage stages the fragments of pieces that its output spread over several blocks.
STAGING_DIR = "_staging"


def global_pieces(files: list[tuple[str, int]], total: int) -> list[dict[str, Any]]:
    """The read items: piece k's segments [path, offset, rows, first position], as JSON."""
    # One walk over the files and pieces together (pieces and files both in position order), so
    # planning stays linear in their number.
    items: list[dict[str, Any]] = []
    f, start = 0, 0  # the first file that may overlap the piece, and its first position
    for k in range(-(-total // GLOBAL_ROWS_PER_PART)):
        lo, hi = k * GLOBAL_ROWS_PER_PART, min(total, (k + 1) * GLOBAL_ROWS_PER_PART)
        while f < len(files) and start + files[f][1] <= lo:
            start += files[f][1]
            f += 1
        segments, g, g_start = [], f, start
        while g < len(files) and g_start < hi:
            path, n = files[g]
            a, b = max(lo, g_start), min(hi, g_start + n)
            if a < b:
                segments.append([path, a - g_start, b - a, a])
            g_start += n
            g += 1
        items.append({"part": k, "segments": json.dumps(segments)})
    return items


@compact_errors
def _global_read_task(items: pa.Table, fs: Any) -> pa.Table:
    import numpy as np

    tables = []
    for item in items.to_pylist():
        for path, offset, rows, pos in json.loads(item["segments"]):
            table = read_rows(fs, path, offset, rows)
            positions = pa.array(np.arange(pos, pos + table.num_rows, dtype=np.int64))
            tables.append(table.append_column(POSITION_COLUMN, positions))
    return pa.concat_tables(tables, promote_options="default")


def _piece_rows(part: int, total: int) -> int:
    return min(GLOBAL_ROWS_PER_PART, total - part * GLOBAL_ROWS_PER_PART)


def _commit_global(out: Location, name: str, part: int, table: pa.Table) -> dict:
    import pyarrow.compute as pc

    table = table.take(pc.sort_indices(table, [(POSITION_COLUMN, "ascending")]))
    table = conform(table.drop_columns([POSITION_COLUMN]), where=f"stage {name}")
    return commit_piece(out, "global", table, piece=f"{part:09d}")


def _positions(batch: pa.Table, name: str) -> Any:
    if POSITION_COLUMN not in batch.column_names:
        raise PipelineError(
            f"stage {name}: its output lost the {POSITION_COLUMN!r} column; a global stage must "
            "return every input column"
        )
    return batch.column(POSITION_COLUMN).to_numpy()


@compact_errors
def _global_write_task(
    batch: pa.Table, out: Location, staging: Location, name: str, total: int
) -> pa.Table:
    import numpy as np

    pos = _positions(batch, name)
    part = pos // GLOBAL_ROWS_PER_PART
    entries = []
    for p in np.unique(part).tolist():
        mask = part == p
        piece = batch.filter(pa.array(mask))
        if piece.num_rows == _piece_rows(p, total) == len(np.unique(pos[mask])):
            entries.append(_commit_global(out, name, p, piece))
        else:
            first = int(pos[mask].min())
            write_table_atomic(piece, staging.join(f"{p:09d}-{first:012d}.parquet"))
    return summary_table(entries)


@compact_errors
def _global_merge_task(items: pa.Table, out: Location, name: str, total: int) -> pa.Table:
    import numpy as np
    import pyarrow.parquet as pq

    entries = []
    for item in items.to_pylist():
        part = item["part"]
        tables = []
        for path in json.loads(item["files"]):
            with out.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables, promote_options="default")
        # A retried write task may have staged the same rows twice; they are identical copies.
        _, first = np.unique(_positions(table, name), return_index=True)
        table = table.take(pa.array(np.sort(first)))
        if table.num_rows != _piece_rows(part, total):
            raise PipelineError(
                f"stage {name}: output piece {part} has {table.num_rows} rows, expected "
                f"{_piece_rows(part, total)}: the stage lost or duplicated rows"
            )
        entries.append(_commit_global(out, name, part, table))
    return summary_table(entries)


def _staged_fragments(staging: Location) -> dict[int, list[str]]:
    import pyarrow.fs as pafs

    by_part: dict[int, list[str]] = {}
    for fi in staging.fs.get_file_info(pafs.FileSelector(staging.path)):
        if fi.type == pafs.FileType.File and fi.base_name.endswith(".parquet"):
            if not fi.base_name.startswith(TMP_PREFIX):
                by_part.setdefault(int(fi.base_name.split("-", 1)[0]), []).append(fi.path)
    return {p: sorted(paths) for p, paths in sorted(by_part.items())}


def run_global(
    runner: Runner, stage: GlobalStage, out: Location, upstream: StageFolder | None
) -> int:
    """Run the stage over every upstream row; returns the rows it received."""
    import ray

    sources, rows = upstream_rows(upstream)
    total = sum(rows.values())
    if not sources or not total:
        return total
    files = [(p, rows[normalise_src(p)]) for p in sources]
    items = global_pieces(files, total)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _global_read_task,
        fn_args=(runner.output.fs,),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
    )
    ds = stage.run(
        ds, GlobalContext(num_rows=total, num_shards=len(sources), num_cpus=cluster_cpus())
    )
    staging = out.join(STAGING_DIR)
    staging.mkdir()
    ds = ds.map_batches(
        _global_write_task,
        fn_args=(out, staging, stage.name, total),
        batch_format="pyarrow",
        batch_size=None,
    )
    runner.drain(ds, stage.name, total)
    fragments = _staged_fragments(staging)
    if fragments:
        merge = [{"part": p, "files": json.dumps(f)} for p, f in fragments.items()]
        ds = ray.data.from_items(merge, override_num_blocks=len(merge)).map_batches(
            _global_merge_task,
            fn_args=(out, stage.name, total),
            batch_size=1,
            batch_format="pyarrow",
        )
        runner.drain(ds, f"{stage.name} (merge)", None)
    staging.rmtree()
    return total
