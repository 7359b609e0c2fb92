"""Running a global stage: decide on narrow columns, apply the decisions to the wide rows.

The input is cut into fixed pieces of GLOBAL_ROWS_PER_PART rows (in the order of the upstream
manifest's files); piece k holds the rows at positions [k * GLOBAL_ROWS_PER_PART, (k + 1) *
GLOBAL_ROWS_PER_PART), and the stage's output is written in the same pieces, in position order.
Three steps, each resumable, all under the stage folder's `_work/` until the stage is done:

1. Narrow (`pipelines.global_narrow`): each piece's `id`, position and the stage's
   `decision_columns()`, read with Parquet column projection. A stage with a `prepare` step runs it
   once per piece and its output is kept in `_work/narrow/` (a resumed run reads it back), or,
   when it `keeps_prepared = False` (clip_score's dot product), runs it in the read task.
2. Decide: the stage's `run` on the narrow rows (its shuffles move only those); it may keep
   finished partitions in `_work/checkpoint/` (`GlobalContext.checkpoint`). The decisions (the
   position, `_reject` and the columns the stage adds, never the columns it read) are regrouped by
   piece with plain Ray tasks, one file per piece in `_work/decisions/`; `_done.json` marks the
   step complete.
3. Apply: one task per piece reads the piece's wide rows and its decisions, sets the decided
   columns and commits the piece to the ledger (`stages.ledger.commit_piece`). A resumed run
   skips the committed pieces.

A stage that `fits` (its decision is a small fitted state, then a function of each row: k-means
centroids and each row's nearest one) makes no per-piece decisions: step 2 runs its `fit` on the
narrow rows and keeps the state in `_work/decisions/_state.pkl`, and step 3 runs its `transform` on
each piece of wide rows. That saves a second read of the narrow columns and the regrouping.

The wide rows (image bytes) are read once, in step 3, and never enter a shuffle or Ray's object
store; only narrow rows and decisions do. Memory per task: a piece, or a regroup partition of
decisions.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from warren.pipelines.funnel import summary_table
from warren.pipelines.global_narrow import (
    NARROW_DIR,
    narrow_file,
    narrow_read_task,
    narrow_reader,
    read_names,
    read_piece,
)
from warren.pipelines.ray_session import cluster_cpus, cluster_gpus
from warren.pipelines.run_errors import PipelineError, compact_errors
from warren.pipelines.run_map import (
    GLOBAL_ROWS_PER_PART,
    normalise_src,
    pieces_per_task,
    upstream_rows,
)
from warren.stages.base import (
    POSITION_COLUMN,
    GlobalContext,
    GlobalStage,
    gpu_share,
    put_column,
)
from warren.stages.ledger import PROGRESS_DIR, commit_piece, source_tag
from warren.stages.run_layout import StageFolder
from warren.stages.schema import REJECT_COLUMN, conform
from warren.stages.shards import Location, write_table_atomic

if TYPE_CHECKING:
    from warren.pipelines.runner import Runner

# Under the stage folder while the stage runs: narrow pieces, checkpoints and decisions.
WORK_DIR = "_work"
DECISIONS_DIR = "decisions"
CHECKPOINT_DIR = "checkpoint"
DONE = "_done.json"
# A stage that `fits`: its fitted state (pickled), in place of per-piece decisions.
STATE = "_state.pkl"
# The source every piece of a global stage's output is committed under.
GLOBAL_SRC = "global"
# Decisions per regroup task (narrow rows: a position, a reason, the added columns).
DECISION_ROWS_PER_TASK = 500_000
# CPUs a narrow read task asks for. No actor pool runs beside a global stage's reads, so they need
# not take the quarter CPU map stages' reads do (ray_session.READ_CPUS), which let Ray Data run
# four tasks a core: reading 1M narrow rows (id and a 768-d float16 embedding) took 7-10 s so
# on 2 cores, 5 s at half a CPU, 6.3 s at one (its slow start then weighs more).
NARROW_READ_CPUS = 0.5


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
        items.append({"part": k, "rows": hi - lo, "segments": json.dumps(segments)})
    return items


def _piece_rows(part: int, total: int) -> int:
    return min(GLOBAL_ROWS_PER_PART, total - part * GLOBAL_ROWS_PER_PART)


def piece_name(part: int) -> str:
    return f"{part:09d}"


def piece_tag(part: int) -> str:
    """The ledger tag `commit_piece` gives piece `part` of a global stage (its source is the
    constant GLOBAL_SRC, which lies outside every run folder)."""
    return f"{source_tag(GLOBAL_SRC)}-{hashlib.sha1(piece_name(part).encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# Step 1 and 2: narrow rows, the stage's decisions, regrouped by piece


@compact_errors
def _prepare_task(items: pa.Table, fs: Any, stage: GlobalStage, work: Location) -> pa.Table:
    table = narrow_read_task(items, fs, stage, work)
    n = table.num_rows
    return summary_table([{"src": GLOBAL_SRC, "rows_in": n, "kept": n, "rejected": 0}])


def _decided_columns(batch: pa.Table, stage: GlobalStage, read: set[str]) -> list[str]:
    """The columns of a decision batch the wide rows take: `_reject`, the columns the stage adds,
    and whatever else it made (never a column it only read)."""
    added = set(stage.added_columns())
    return [
        c
        for c in batch.column_names
        if c != POSITION_COLUMN and (c == REJECT_COLUMN or c in added or c not in read)
    ]


@compact_errors
def _split_decisions(per_task: int, parts: int, name: str, keep: list[str], *tables: pa.Table):
    """One run of decision blocks cut by regroup task (contiguous piece ranges)."""
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    if POSITION_COLUMN not in table.column_names:
        raise PipelineError(
            f"stage {name}: its output lost the {POSITION_COLUMN!r} column; a global stage must "
            "return every input column"
        )
    table = table.select([POSITION_COLUMN, *[c for c in keep if c in table.column_names]])
    task = table.column(POSITION_COLUMN).to_numpy() // (GLOBAL_ROWS_PER_PART * per_task)
    order = np.argsort(task, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(task[order], np.arange(parts + 1))
    slices = [table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]
    return slices if parts > 1 else slices[0]


@compact_errors
def _write_decisions(
    decisions: Location,
    name: str,
    total: int,
    columns: list[tuple[str, pa.DataType]],
    *tables: pa.Table,
) -> pa.Table:
    """One regroup task: its pieces' decisions, sorted by position, one file per piece."""
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    # Every piece's file has the same columns, even where this task's blocks lacked one.
    for c, kind in columns:
        if c not in table.column_names:
            table = table.append_column(pa.field(c, kind), pa.nulls(table.num_rows, kind))
    table = table.select([POSITION_COLUMN, *[c for c, _ in columns]])
    pos = table.column(POSITION_COLUMN).to_numpy()
    order = np.argsort(pos, kind="stable")
    table, pos = table.take(pa.array(order)), pos[order]
    # A retried task may have returned a block twice: the copies are identical.
    first = np.r_[True, pos[1:] != pos[:-1]] if len(pos) else np.zeros(0, bool)
    table, pos = table.filter(pa.array(first)), pos[first]
    part = pos // GLOBAL_ROWS_PER_PART
    entries = []
    for p in np.unique(part).tolist():
        a, b = np.searchsorted(part, [p, p + 1])
        if b - a != _piece_rows(p, total):
            raise PipelineError(
                f"stage {name}: piece {p} got {b - a} decisions for {_piece_rows(p, total)} rows: "
                "the stage lost or duplicated rows"
            )
        write_table_atomic(table.slice(a, b - a), decisions.join(f"{piece_name(p)}.parquet"))
        rejected = 0
        if REJECT_COLUMN in table.column_names:
            rejected = b - a - table.column(REJECT_COLUMN).slice(a, b - a).null_count
        entries.append(
            {"src": GLOBAL_SRC, "rows_in": b - a, "kept": b - a - rejected, "rejected": rejected}
        )
    return summary_table(entries)


def _decide(
    runner: Runner, stage: GlobalStage, items: list[dict], total: int, shards: int, work: Location
) -> None:
    import ray

    fs = runner.output.fs
    decisions = work.join(DECISIONS_DIR)
    if decisions.exists():
        decisions.rmtree()
    decisions.mkdir()
    work.join(NARROW_DIR).mkdir()
    work.join(CHECKPOINT_DIR).mkdir()
    saved = None
    if stage.prepares and stage.keeps_prepared:
        saved = work
        pending = [it for it in items if not narrow_file(work, it["part"]).exists()]
        if len(pending) < len(items):
            runner.log(f"  {len(items) - len(pending)} of {len(items)} pieces already prepared")
        if pending:
            # Consecutive pieces per task, as the narrow read takes them: a row group two pieces
            # share is read once, and tasks are tens per million rows, not one per piece. Each
            # piece is still kept on its own, so a resumed run redoes only unfinished pieces.
            per_block = pieces_per_task(pending, cluster_cpus())
            ds = ray.data.from_items(
                pending, override_num_blocks=-(-len(pending) // per_block)
            ).map_batches(
                _prepare_task, fn_args=(fs, stage, work), batch_size=None, batch_format="pyarrow"
            )
            runner.drain(
                ds, f"{stage.name} (prepare)", sum(_piece_rows(it["part"], total) for it in pending)
            )
    # Narrow rows are a few KB each: a block of several consecutive pieces (as many rows as a map
    # task takes) keeps every pass of the stage to tens of tasks per million rows, where a block
    # per 2048-row piece cost several Ray tasks per piece and pass.
    per_block = pieces_per_task(items, cluster_cpus())
    narrow = ray.data.from_items(
        items, override_num_blocks=-(-len(items) // per_block)
    ).map_batches(
        narrow_read_task,
        fn_args=(fs, stage, saved),
        batch_size=None,  # a block of pieces per task, as from_items cut them
        batch_format="pyarrow",
        num_cpus=NARROW_READ_CPUS,
    )
    ctx = GlobalContext(
        num_rows=total,
        num_shards=shards,
        num_cpus=cluster_cpus(),
        checkpoint=work.join(CHECKPOINT_DIR),
        decisions_only=True,
        num_gpus=cluster_gpus(),
    )
    try:
        # The stage's plan runs here (and its Ray tasks' errors arrive here): one line, as drain
        # gives for the other steps, with the traceback in the stage's log.
        if stage.fits:
            state = stage.fit(narrow, ctx)
        else:
            refs = stage.run(narrow, ctx).to_arrow_refs()
            schemas = ray.get([ray.remote(_schema_of).remote(r) for r in refs])
    except (PipelineError, ValueError) as exc:
        if isinstance(exc, PipelineError) or not _from_ray(exc):
            raise
        raise runner._failure(stage.name, exc) from exc
    except Exception as exc:
        raise runner._failure(stage.name, exc) from exc
    pieces = -(-total // GLOBAL_ROWS_PER_PART)
    if stage.fits:
        # The state is all there is to decide: each piece is transformed as it is applied.
        decisions.join(STATE).write_bytes_atomic(pickle.dumps(state))
        decisions.join(DONE).write_json_atomic({"pieces": pieces, "fitted": True})
        runner.log(f"  {stage.name}: fitted on {total:,} rows")
        return
    if not refs:
        raise PipelineError(f"stage {stage.name}: run() returned no rows for {total:,} rows in")
    # The columns every decision file carries (and their types): what any block decided.
    read = read_names(stage)
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for c in _decided_columns(schema.empty_table(), stage, read):
            if c not in types or pa.types.is_null(types[c]):
                types[c] = schema.field(c).type
    columns = list(types.items())
    keep = list(types)
    per_task = max(1, DECISION_ROWS_PER_TASK // GLOBAL_ROWS_PER_PART)
    parts = max(1, math.ceil(pieces / per_task))
    runs = max(
        1, min(len(refs), max(2 * int(ctx.num_cpus), math.ceil(total / DECISION_ROWS_PER_TASK)))
    )
    split = ray.remote(_split_decisions).options(num_returns=parts)
    bounds = np.linspace(0, len(refs), runs + 1).round().astype(int)
    slices = []
    for r in range(runs):
        out = split.remote(per_task, parts, stage.name, keep, *refs[bounds[r] : bounds[r + 1]])
        slices.append(out if parts > 1 else [out])
    write = ray.remote(_write_decisions)
    written = [
        write.remote(decisions, stage.name, total, columns, *[s[i] for s in slices])
        for i in range(parts)
    ]
    runner.drain(ray.data.from_arrow_refs(written), f"{stage.name} (decide)", total)
    missing = [p for p in range(pieces) if not decisions.join(f"{piece_name(p)}.parquet").exists()]
    if missing:
        raise PipelineError(
            f"stage {stage.name}: no decisions for {len(missing)} pieces (first: {missing[0]}): "
            "the stage lost rows"
        )
    decisions.join(DONE).write_json_atomic({"pieces": pieces, "columns": keep})


def _from_ray(exc: BaseException) -> bool:
    """A worker's error (Ray wraps it in a subclass of the cause's type), not the stage's own
    ValueError about its input, raised in the driver and already one line for the user."""
    return type(exc).__module__.startswith("ray")


def _schema_of(table: pa.Table) -> pa.Schema:
    return table.schema


# ---------------------------------------------------------------------------------------------
# Step 3: the decisions applied to the wide rows, piece by piece


@compact_errors
def _apply_task(
    items: pa.Table, fs: Any, out: Location, decisions: Location, stage: GlobalStage, total: int
) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    reader = narrow_reader(fs, None)
    state = pickle.loads(decisions.join(STATE).read_bytes()) if stage.fits else None
    for item in items.to_pylist():
        part = item["part"]
        table = read_piece(reader, json.loads(item["segments"]))
        if stage.fits:
            table = _transformed(stage, table, state, part)
        else:
            loc = decisions.join(f"{piece_name(part)}.parquet")
            with loc.fs.open_input_file(loc.path) as f:
                decided = pq.read_table(f)
            if decided.num_rows != table.num_rows or not decided.column(POSITION_COLUMN).equals(
                table.column(POSITION_COLUMN)
            ):
                raise PipelineError(
                    f"stage {stage.name}: the decisions for piece {part} do not match its "
                    f"{_piece_rows(part, total)} rows"
                )
            for c in decided.column_names:
                if c != POSITION_COLUMN:
                    table = put_column(table, c, decided.column(c).combine_chunks())
        table = conform(table.drop_columns([POSITION_COLUMN]), where=f"stage {stage.name}")
        # One summary per piece as it is committed: progress moves within a task.
        yield summary_table([commit_piece(out, GLOBAL_SRC, table, piece=piece_name(part))])


def _transformed(stage: GlobalStage, table: pa.Table, state: Any, part: int) -> pa.Table:
    """A fitted stage's `transform` of one piece of wide rows, checked to keep every row."""
    out = stage.transform(table, state, False)
    if (
        not isinstance(out, pa.Table)
        or POSITION_COLUMN not in out.column_names
        or not out.column(POSITION_COLUMN).equals(table.column(POSITION_COLUMN))
    ):
        raise PipelineError(
            f"stage {stage.name}: transform() must return every row of piece {part} in order "
            f"({table.num_rows}), got {getattr(out, 'num_rows', type(out).__name__)}"
        )
    return out


def apply_resources(stage: GlobalStage) -> dict[str, float]:
    """The apply tasks' GPU share: none, unless the stage's transform uses a GPU and the cluster
    has some (then split evenly among a task per CPU, `stages.base.gpu_share`)."""
    if not (stage.fits and stage.transform_uses_gpu):
        return {}
    gpus = gpu_share(cluster_gpus(), cluster_cpus())
    return {"num_gpus": gpus} if gpus > 0 else {}


def _committed(out: Location) -> set[str]:
    import pyarrow.fs as pafs

    progress = out.join(PROGRESS_DIR)
    if not progress.exists():
        return set()
    infos = progress.fs.get_file_info(pafs.FileSelector(progress.path))
    return {fi.base_name[: -len(".json")] for fi in infos if fi.base_name.endswith(".json")}


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
    work = out.join(WORK_DIR)
    decisions = work.join(DECISIONS_DIR)
    if decisions.join(DONE).exists():
        runner.log(f"  {stage.name}: decisions already made; applying them")
    else:
        _decide(runner, stage, items, total, len(sources), work)
    done = _committed(out)
    pending = [it for it in items if piece_tag(it["part"]) not in done]
    if len(pending) < len(items):
        runner.log(f"  {len(items) - len(pending)} of {len(items)} pieces already written")
    if pending:
        # Several consecutive pieces per task, as a map stage runs them: fewer, longer tasks.
        per_task = pieces_per_task(pending, cluster_cpus())
        ds = ray.data.from_items(
            pending, override_num_blocks=-(-len(pending) // per_task)
        ).map_batches(
            _apply_task,
            fn_args=(runner.output.fs, out, decisions, stage, total),
            batch_size=None,  # a block of pieces per task, as from_items cut them
            batch_format="pyarrow",
            **apply_resources(stage),
        )
        runner.drain(ds, stage.name, sum(_piece_rows(it["part"], total) for it in pending))
    work.rmtree()
    return total
