"""Running a batch stage: each upstream shard in fixed pieces, processed in Ray and committed to
the stage's ledger piece by piece, so an interrupted stage resumes shard by shard.

Units of work come from the input, never from scheduling: a map stage processes each input shard
in fixed row ranges (`map_pieces`), and a piece is named by its shard and row offset, so the same
input gives the same pieces, the same model batches and the same files whatever Ray does (how
many workers, which block boundaries, which retries, where a resumed run starts). A piece holds
up to MAP_ROWS_PER_READ rows, read once, and the stage sees it in batches of its `batch_size` cut
from the piece's start: a small-batch stage neither re-reads a row group per batch nor writes a
file per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from warren.pipelines.funnel import summary_table
from warren.pipelines.ray_session import cluster_cpus, map_resources
from warren.pipelines.run_errors import PipelineError, StageFailed, compact_errors
from warren.stages.base import BatchStage, Stage
from warren.stages.ledger import commit_piece, read_ledger
from warren.stages.run_layout import StageFolder
from warren.stages.schema import REJECT_COLUMN, conform
from warren.stages.shards import Location, RowReader

if TYPE_CHECKING:
    from warren.pipelines.runner import Runner

# Rows per output piece of a global stage (see run_global), and per piece of a map stage without
# a batch size.
GLOBAL_ROWS_PER_PART = 2048
MAP_ROWS_PER_PIECE = 4096
# Rows a map stage with a batch size reads and writes as one piece (a whole number of its batches):
# one read of the upstream rows instead of one per batch, one file instead of one per batch, and a
# worker's memory bounded by a piece. The size of a global stage's pieces, so those read once.
MAP_ROWS_PER_READ = GLOBAL_ROWS_PER_PART
# A Ray task of a stage without a model runs several pieces one after the other: each task costs
# Ray Data some 20-40 ms of scheduling, as much as reading, filtering and writing a piece of a
# few hundred 50 KB rows, so one task per piece made the runner twice as slow as a plain loop.
# Tasks stay at least TASKS_PER_CPU per CPU (so a slow shard does not leave a CPU idle at the
# end) and at most MAP_ROWS_PER_TASK rows (so a retried task redoes little). Pieces, their
# files and the ledger are the same whatever the grouping: resume stays piece by piece.
MAP_ROWS_PER_TASK = 32 * 1024
TASKS_PER_CPU = 4

_SETUP_DONE: dict[tuple[str, str, str], Stage] = {}


def normalise_src(path: str) -> str:
    return path.split("://", 1)[-1]


def upstream_rows(upstream: StageFolder) -> tuple[list[str], dict[str, int]]:
    """The upstream manifest's files (paths) and their rows by source: exactly the files that
    stage committed; nothing else in its folder (a stray file, a leftover of a retried task) is
    read."""
    sources = [f.path for f in upstream.kept]
    return sources, {normalise_src(f.path): f.rows for f in upstream.kept}


def apply_stage(stage: BatchStage, batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    ids = batch.column("id")
    out = stage.process(batch)
    if not isinstance(out, pa.Table):
        raise PipelineError(
            f"stage {stage.name}: process() returned {type(out).__name__}, expected pyarrow.Table"
        )
    if out.num_rows != n:
        raise PipelineError(
            f"stage {stage.name}: process() returned {out.num_rows} rows for {n} input rows; "
            "a stage must return every row (mark rejects with stages.base.reject)"
        )
    if not out.column("id").equals(ids):
        raise PipelineError(f"stage {stage.name}: process() changed the row order or the ids")
    return conform(out, where=f"stage {stage.name}")


def map_pieces(sources: dict[str, str], rows: dict[str, int], step: int) -> list[dict[str, Any]]:
    """One work item per piece of each source shard: {"src", "path", "offset", "rows", "step"};
    a piece is a whole number of batches of `step` rows (or the shard's rest)."""
    size = max(step, MAP_ROWS_PER_READ // step * step)
    return [
        {"src": src, "path": path, "offset": o, "rows": min(size, rows[src] - o), "step": step}
        for src, path in sources.items()
        for o in range(0, rows[src], size)
    ]


def pieces_per_task(items: list[dict[str, Any]], cpus: float) -> int:
    """How many consecutive pieces one task of a stage without a model runs (see MAP_ROWS_PER_TASK)."""
    if not items:
        return 1
    rows = max(1, max(item["rows"] for item in items))
    by_rows = max(1, MAP_ROWS_PER_TASK // rows)
    by_cpus = max(1, len(items) // max(1, int(cpus * TASKS_PER_CPU)))
    return min(by_rows, by_cpus)


def _piece_name(offset: int) -> str:
    return f"{offset:012d}"


def _map_pieces_of(
    stage: BatchStage, fs: Any, out: Location, items: pa.Table
) -> Iterator[pa.Table]:
    """Process and commit each piece, yielding a progress summary per batch as it is done: a slow
    model stage shows progress before its piece is written (the ledger, not these, counts)."""
    reader = RowReader(fs)  # consecutive pieces that share a row group read it once
    for item in items.to_pylist():
        table = reader.read(item["path"], item["offset"], item["rows"])
        if table.num_rows != item["rows"]:
            raise PipelineError(
                f"stage {stage.name}: {item['path']} has {table.num_rows} rows at offset "
                f"{item['offset']}, expected {item['rows']} (changed since its stage wrote it?)"
            )
        step = item["step"]
        parts = []
        for o in range(0, table.num_rows, step):
            parts.append(apply_stage(stage, table.slice(o, step)))
            if o + step < table.num_rows:  # the piece's last batch is reported once written
                yield _batch_summary(item["src"], parts[-1])
        out_table = (
            pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        )
        commit_piece(out, item["src"], out_table, piece=_piece_name(item["offset"]))
        yield _batch_summary(item["src"], parts[-1])


def _batch_summary(src: str, part: pa.Table) -> pa.Table:
    marks = part.column(REJECT_COLUMN) if REJECT_COLUMN in part.column_names else None
    rejected = 0 if marks is None else part.num_rows - marks.null_count
    return summary_table(
        [
            {
                "src": src,
                "rows_in": part.num_rows,
                "kept": part.num_rows - rejected,
                "rejected": rejected,
            }
        ]
    )


class _MapActor:
    """Actor-pool worker for model stages: setup() once, then process and write each piece."""

    def __init__(self, stage: BatchStage, fs: Any, out: Location) -> None:
        self.stage = stage
        self.fs = fs
        self.out = out
        # A failed setup (a model that cannot be loaded) is raised by the first batch instead:
        # Ray Data retries a failing actor constructor and prints every attempt, while a failed
        # batch ends the run at once with one error.
        self.failed: StageFailed | None = None
        try:
            compact_errors(stage.setup)()
        except StageFailed as exc:
            self.failed = exc

    @compact_errors
    def __call__(self, items: pa.Table) -> Iterator[pa.Table]:
        if self.failed is not None:
            raise self.failed
        yield from _map_pieces_of(self.stage, self.fs, self.out, items)


@compact_errors
def _map_task(items: pa.Table, stage: BatchStage, fs: Any, out: Location) -> Iterator[pa.Table]:
    # Each task gets a fresh copy of the stage; set it up once per worker process and reuse it.
    key = (type(stage).__module__, type(stage).__qualname__, stage.params_hash)
    if key not in _SETUP_DONE:
        stage.setup()
        _SETUP_DONE[key] = stage
    yield from _map_pieces_of(_SETUP_DONE[key], fs, out, items)


def run_map(runner: Runner, stage: BatchStage, out: Location, upstream: StageFolder | None) -> int:
    """Process every pending piece of the upstream shards; returns the rows the stage received
    once it checked rows in = kept + rejected for each shard."""
    import ray

    sources, expected = upstream_rows(upstream)
    by_src = {normalise_src(p): p for p in sources}
    pending = runner.pending(out, expected, list(by_src))
    pending = [p for p in pending if expected[p] > 0]
    if pending:
        # Pieces of the stage's batch size (rows per process() call) within each source shard.
        step = stage.batch_size or MAP_ROWS_PER_PIECE
        items = map_pieces({p: by_src[p] for p in pending}, expected, step)
        resources = map_resources(stage)
        if stage.uses_model:
            # An actor keeps its model between pieces, so a piece per call balances best.
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                _MapActor,
                fn_constructor_args=(stage, runner.output.fs, out),
                batch_size=1,
                batch_format="pyarrow",
                **resources,
            )
        else:
            per_task = pieces_per_task(items, cluster_cpus())
            ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task))
            ds = ds.map_batches(
                _map_task,
                fn_args=(stage, runner.output.fs, out),
                batch_size=None,  # a block of pieces per task, as from_items cut them
                batch_format="pyarrow",
                **resources,
            )
        runner.drain(ds, stage.name, sum(expected[p] for p in pending))
    rows = read_ledger(out).rows_by_src()
    bad = {s: (rows.get(s, 0), n) for s, n in expected.items() if rows.get(s, 0) != n}
    if bad:
        s, (got, n) = next(iter(bad.items()))
        raise PipelineError(
            f"{out.path.rstrip('/').rsplit('/', 1)[-1]}: rows in != kept + rejected for "
            f"{len(bad)} shards (e.g. {s}: {got} of {n})"
        )
    return sum(expected.values())
