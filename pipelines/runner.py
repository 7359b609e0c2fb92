"""The pipeline runner: ingest, then each stage in order, each materialised and cached.

For a pipeline run into OUTPUT:

- `OUTPUT/00-ingest/` holds the input as canonical rows; `OUTPUT/NN-<stage>/` each stage's kept
  rows as Parquet shards, `.../rejected/` its rejected rows with a `reason` column, and
  `.../_manifest.json` (name, version, parameters, fingerprints, counts, time, schema) once the
  stage completed.
- A stage's fingerprint hashes its name, version, parameters and the exact files of its input. A
  re-run skips every stage whose manifest carries the same fingerprint (and whose files are all
  there), so changing one parameter recomputes that stage and what follows it, nothing before.
- A map stage interrupted half way (a kill, a lost node) resumes source shard by source shard: see
  `stages.ledger`. Global stages restart from their input.
- Output is deterministic: the same input and parameters give the same shards, byte for byte,
  whatever the timing, the number of workers or the resume point. Units of work come from the
  input, never from Ray's blocks: a map stage processes each input shard in fixed ranges of its
  batch size (pieces named by shard and row offset); a global stage reads and writes fixed pieces
  of GLOBAL_ROWS_PER_PART rows in input order (see `_global_write_task`).
- Progress lines are printed while a stage runs; a funnel table at the end, saved as
  `OUTPUT/run.json`.
- Ids are unique per run: ingest rejects (or, on request, suffixes) a repeated id, first in input
  order; see `stages.unique_ids`.
- A run holds `OUTPUT/.lock` (`stages.shards.OutputLock`) and checks it before every manifest and
  `run.json` it writes.
- A failed stage is one line (`PipelineError`) naming its cause; the whole traceback, the Ray
  worker's included, is written to `OUTPUT/logs/<stage folder>.log`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from warren.stages import unique_ids
from warren.stages.base import (
    POSITION_COLUMN,
    BatchStage,
    GlobalContext,
    GlobalStage,
    Stage,
    stable_hash,
)
from warren.stages.ledger import (
    PROGRESS_DIR,
    REJECTED_DIR,
    commit_piece,
    complete_sources,
    mark_source_done,
    prune_incomplete,
    read_ledger,
)
from warren.stages.readers.base import Reader, ReadUnit
from warren.stages.schema import REJECT_COLUMN, conform
from warren.stages.shards import TMP_PREFIX, Location, LockError, OutputLock, write_table_atomic

MANIFEST = "_manifest.json"
LOGS_DIR = "logs"
ATTEMPT = "_attempt.json"
INGEST = "ingest"
# Rows per output piece of a global stage, and per piece of a map stage without a batch size.
GLOBAL_ROWS_PER_PART = 2048
MAP_ROWS_PER_PIECE = 4096
# Rows a map stage with a batch size reads and writes as one piece (a whole number of its batches):
# one read of the upstream rows instead of one per batch, one file instead of one per batch, and a
# worker's memory bounded by a piece. The size of a global stage's pieces, so those read once.
MAP_ROWS_PER_READ = GLOBAL_ROWS_PER_PART
# Where a global stage stages the fragments of pieces that its output spread over several blocks.
STAGING_DIR = "_staging"
# Read tasks ask for a quarter CPU: an actor pool sized to the machine then never leaves them
# without a slot (on one CPU, a whole-CPU read would wait forever behind a half-CPU actor).
READ_CPUS = 0.25


class PipelineError(RuntimeError):
    """A run cannot go on; the message says which stage and why."""


class StageFailed(Exception):
    """An error raised in a Ray worker, made compact there: `message` is the cause in one line
    (it names the flag or file to change where the stage's own error does), `details` the full
    traceback, which the driver writes to OUTPUT/logs/ instead of the console."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # Ray pickles worker errors; keep both fields
        return (StageFailed, (self.message, self.details))

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException) -> str:
    """The first line of an error, with its type unless it is one of ours."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, (PipelineError, StageFailed)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _compact_errors(fn):
    """Worker functions raise StageFailed: Ray then carries a one-line cause and a short stack
    back to the driver instead of the chain of every frame (printed once per retry)."""

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StageFailed:
                raise
            except Exception as exc:
                raise StageFailed(one_line(exc), traceback.format_exc()) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StageFailed:
            raise
        except Exception as exc:
            raise StageFailed(one_line(exc), traceback.format_exc()) from None

    return wrapper


@dataclasses.dataclass
class Pipeline:
    """An ordered list of stages with a name; the recipe scripts build one and call `main`."""

    name: str
    stages: list[Stage]
    description: str = ""
    # Stage parameters used only on the bundled demo pool, e.g. {"embed": {"model": DEMO_CLIP}}:
    # the recipe's own defaults stay the published ones for real data.
    demo_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        for stage_name, values in self.demo_params.items():
            if stage_name not in names:
                raise ValueError(f"pipeline {self.name}: demo_params names no stage {stage_name!r}")
            known = {
                f.name for f in dataclasses.fields(self.stages[names.index(stage_name)].params)
            }
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(
                    f"pipeline {self.name}: demo_params for {stage_name!r} name unknown "
                    f"parameters {unknown}"
                )
        if INGEST in names:
            raise ValueError(f"'{INGEST}' is reserved for the input stage")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"pipeline {self.name}: stage names {repeated} repeat; give each instance its own "
                "name with stage_name=..."
            )
        for s in self.stages:
            if not isinstance(s, (BatchStage, GlobalStage)):
                raise TypeError(f"{s!r} is neither a BatchStage nor a GlobalStage")

    def folders(self) -> list[str]:
        return [f"00-{INGEST}"] + [f"{i:02d}-{s.name}" for i, s in enumerate(self.stages, 1)]

    def describe(self) -> str:
        lines = [
            f"pipeline {self.name}: {self.description}".rstrip(": "),
            f"  00 {INGEST}: read the input into canonical rows",
        ]
        for i, s in enumerate(self.stages, 1):
            d = s.describe()
            lines.append(
                f"  {i:02d} {s.name} v{s.version} ({d['kind']}, cpus={s.num_cpus}, gpus={s.num_gpus}) {d['params']}"
            )
        return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------
# Ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a job runs on (RAY_ADDRESS), or start Ray in-process sized to the machine."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "configure_logging": True,
        "logging_level": "WARNING",
        "log_to_driver": True,
    }
    if not os.environ.get("RAY_ADDRESS"):
        # "local" always starts a fresh in-process Ray; a bare ray.init() would join whatever
        # cluster `ray start` left on this machine, with resources we did not ask for.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        kwargs["include_dashboard"] = False
        # Workers import warren as installed; a PYTHONPATH the driver was given (a user's own
        # stages) reaches them too.
        if os.environ.get("PYTHONPATH"):
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(**kwargs)


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _map_resources(stage: BatchStage) -> dict[str, Any]:
    """Resources for map_batches; actor pools are bounded so read tasks always have a CPU."""
    import ray

    cpus = _cluster_cpus()
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    num_gpus = stage.num_gpus if gpus >= stage.num_gpus else 0.0
    num_cpus = min(stage.num_cpus, max(cpus / 2, 0.25))
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    if stage.uses_model:
        if stage.concurrency is not None:
            lo, hi = stage.concurrency
        else:
            by_cpu = int((cpus - 1) // num_cpus) if cpus > 1 else 1
            by_gpu = int(gpus // num_gpus) if num_gpus else by_cpu
            hi = max(1, min(by_cpu, by_gpu))
            lo = 1
        args["compute"] = ray.data.ActorPoolStrategy(min_size=lo, max_size=max(lo, hi))
    return args


# --------------------------------------------------------------------------------------------
# Workers: they run in Ray, write their own output and return only a one-row summary per piece.


_SETUP_DONE: dict[tuple[str, str, str], Stage] = {}


def _summary(entries: list[dict]) -> pa.Table:
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


def _apply_stage(stage: BatchStage, batch: pa.Table) -> pa.Table:
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


def _normalise_src(path: str) -> str:
    return path.split("://", 1)[-1]


# Units of work come from the input, never from scheduling: a map stage processes each input shard
# in fixed row ranges (`_map_pieces`), and a piece is named by its shard and row offset, so the
# same input gives the same pieces, the same model batches and the same files whatever Ray does
# (how many workers, which block boundaries, which retries, where a resumed run starts). A piece
# holds up to MAP_ROWS_PER_READ rows, read once, and the stage sees it in batches of its
# `batch_size` cut from the piece's start: a small-batch stage neither re-reads a row group per
# batch nor writes a file per batch.


def _map_pieces(sources: dict[str, str], rows: dict[str, int], step: int) -> list[dict[str, Any]]:
    """One work item per piece of each source shard: {"src", "path", "offset", "rows", "step"};
    a piece is a whole number of batches of `step` rows (or the shard's rest)."""
    size = max(step, MAP_ROWS_PER_READ // step * step)
    return [
        {"src": src, "path": path, "offset": o, "rows": min(size, rows[src] - o), "step": step}
        for src, path in sources.items()
        for o in range(0, rows[src], size)
    ]


def _read_rows(fs: Any, path: str, offset: int, rows: int) -> pa.Table:
    """Rows [offset, offset + rows) of a Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, start, first = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if start < offset + rows and start + n > offset:
                groups.append(i)
                first = start if first is None else first
            start += n
        if first is None:
            return pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups)
    return table.slice(offset - first, rows)


def _piece_name(offset: int) -> str:
    return f"{offset:012d}"


def _map_pieces_of(
    stage: BatchStage, fs: Any, out: Location, items: pa.Table
) -> Iterator[pa.Table]:
    """Process and commit each piece, yielding a progress summary per batch as it is done: a slow
    model stage shows progress before its piece is written (the ledger, not these, counts)."""
    for item in items.to_pylist():
        table = _read_rows(fs, item["path"], item["offset"], item["rows"])
        if table.num_rows != item["rows"]:
            raise PipelineError(
                f"stage {stage.name}: {item['path']} has {table.num_rows} rows at offset "
                f"{item['offset']}, expected {item['rows']} (changed since its stage wrote it?)"
            )
        step = item["step"]
        parts = []
        for o in range(0, table.num_rows, step):
            parts.append(_apply_stage(stage, table.slice(o, step)))
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
    return _summary(
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
            _compact_errors(stage.setup)()
        except StageFailed as exc:
            self.failed = exc

    @_compact_errors
    def __call__(self, items: pa.Table) -> Iterator[pa.Table]:
        if self.failed is not None:
            raise self.failed
        yield from _map_pieces_of(self.stage, self.fs, self.out, items)


@_compact_errors
def _map_task(items: pa.Table, stage: BatchStage, fs: Any, out: Location) -> Iterator[pa.Table]:
    # Each task gets a fresh copy of the stage; set it up once per worker process and reuse it.
    key = (type(stage).__module__, type(stage).__qualname__, stage.params_hash)
    if key not in _SETUP_DONE:
        stage.setup()
        _SETUP_DONE[key] = stage
    yield from _map_pieces_of(_SETUP_DONE[key], fs, out, items)


@_compact_errors
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
    return _summary(entries)


# A global stage reads its input in fixed pieces of GLOBAL_ROWS_PER_PART rows (in the order of the
# upstream manifest's files), each row tagged with its input position (POSITION_COLUMN). Whatever
# the stage does to the rows (shuffles, groups), its output is written back in the same pieces:
# piece k holds the rows at positions [k * GLOBAL_ROWS_PER_PART, (k + 1) * GLOBAL_ROWS_PER_PART),
# sorted by position. A block that holds a whole piece (a row-wise stage keeps the read's blocks)
# is committed at once; the parts of a piece spread over several blocks (a grouping stage) are
# staged as fragments and merged by one task per piece. Memory: a block, or a piece.


def _global_pieces(files: list[tuple[str, int]], total: int) -> list[dict[str, Any]]:
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


@_compact_errors
def _global_read_task(items: pa.Table, fs: Any) -> pa.Table:
    import numpy as np

    tables = []
    for item in items.to_pylist():
        for path, offset, rows, pos in json.loads(item["segments"]):
            table = _read_rows(fs, path, offset, rows)
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


@_compact_errors
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
    return _summary(entries)


@_compact_errors
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
    return _summary(entries)


def _staged_fragments(staging: Location) -> dict[int, list[str]]:
    import pyarrow.fs as pafs

    by_part: dict[int, list[str]] = {}
    for fi in staging.fs.get_file_info(pafs.FileSelector(staging.path)):
        if fi.type == pafs.FileType.File and fi.base_name.endswith(".parquet"):
            if not fi.base_name.startswith(TMP_PREFIX):
                by_part.setdefault(int(fi.base_name.split("-", 1)[0]), []).append(fi.path)
    return {p: sorted(paths) for p, paths in sorted(by_part.items())}


@_compact_errors
def _unique_ids_task(batch: pa.Table, raw: Location, out: Location, mode: str) -> pa.Table:
    entries = []
    for row in batch.to_pylist():
        entries += unique_ids.apply_unit(
            raw, out, row["key"], row["unit"], json.loads(row["entries"]), mode
        )
    return _summary(entries)


# --------------------------------------------------------------------------------------------
# The runner


class _Progress:
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
            f"  [{self.label}] {done} rows, kept {self.kept:,}, rejected {self.rejected:,}, {rate:,.0f} rows/s",
            flush=True,
        )


class Runner:
    def __init__(
        self,
        pipeline: Pipeline,
        input_uri: str,
        output_uri: str,
        *,
        input_format: str | None = None,
        reader_options: dict[str, Any] | None = None,
        reader: Reader | None = None,
        force: bool = False,
        from_stage: str | None = None,
        only: str | None = None,
        progress: bool = True,
        num_cpus: int | None = None,
        break_lock: bool = False,
        on_duplicate_id: str = "reject",
        allow_demo_model: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.output = Location.of(output_uri)
        from warren.stages.readers import get_reader

        self.reader = reader or get_reader(input_format, input_uri, **(reader_options or {}))
        # A reader with a cache of its own (download) keeps it under the run's output.
        bind_output = getattr(self.reader, "bind_output", None)
        if bind_output is not None:
            bind_output(self.output)
        self.force = force
        self.progress = progress
        self.num_cpus = num_cpus
        self.break_lock = break_lock
        unique_ids.check_mode(on_duplicate_id)
        self.on_duplicate_id = on_duplicate_id
        self.allow_demo_model = allow_demo_model
        self._lock: OutputLock | None = None
        self.folders = pipeline.folders()
        self.from_index = self._stage_index(from_stage, "--from") if from_stage else None
        self.only_index = self._stage_index(only, "--only") if only else None

    def _stage_index(self, ref: str, flag: str) -> int:
        names = [INGEST] + [s.name for s in self.pipeline.stages]
        for i, (name, folder) in enumerate(zip(names, self.folders, strict=True)):
            if ref in (name, folder, str(i)):
                return i
        raise PipelineError(
            f"{flag} {ref!r}: no such stage in pipeline {self.pipeline.name} (stages: {', '.join(names)})"
        )

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    # ---- caching

    def _manifest(self, folder: str) -> dict | None:
        return _read_json_or_none(self.output.join(folder, MANIFEST))

    def _cached(self, folder: str, fingerprint: str) -> dict | None:
        """The manifest, if it matches the fingerprint and every file it lists is there."""
        m = self._manifest(folder)
        if not m or m.get("fingerprint") != fingerprint:
            return None
        base = self.output.join(folder)
        for f in m["files"]:
            info = base.fs.get_file_info(base.join(f["name"]).path)
            if info.size != f["bytes"]:
                self.log(f"  {folder}: {f['name']} is missing or changed; recomputing")
                return None
        return m

    def _must_run(self, index: int) -> bool:
        if self.only_index is not None:
            return index == self.only_index
        if self.force:
            return True
        return self.from_index is not None and index >= self.from_index

    # ---- running

    def run(self) -> list[StageReport]:
        self._check_demo_models()
        # The lock comes first: a second run into the same folder fails at once, before Ray starts.
        self.output.mkdir()
        self._lock = OutputLock(self.output, force=self.break_lock)
        try:
            note = self._lock.acquire()
        except LockError as exc:
            raise PipelineError(str(exc)) from None
        if note:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        try:
            return self._run()
        finally:
            self._lock.release()

    def _check_demo_models(self) -> None:
        """A demo model (its directory holds a demo marker) only runs on the data it was trained
        on, unless the user says otherwise: on anything else its scores would look real."""
        from warren.stages.models import demo_model_marker

        for stage in self.pipeline.stages:
            for f in dataclasses.fields(stage.params):
                value = getattr(stage.params, f.name)
                marker = demo_model_marker(value) if isinstance(value, str) and value else None
                if marker is None or _is_training_data(self.reader, marker.get("trained_on")):
                    continue
                trained_on = (marker.get("trained_on") or {}).get("file", "its demo data")
                text = (
                    f"stage {stage.name}: {f.name} {value} is a DEMO model trained only on "
                    f"{trained_on}; on other input ({self.reader.uri}) its outputs mean nothing"
                )
                if not self.allow_demo_model:
                    raise PipelineError(
                        f"{text}. Give a real model with --{stage.name}.{f.name}, or pass "
                        "--allow-demo-model to run it anyway"
                    )
                print(f"WARNING: {text} (running anyway: --allow-demo-model)", file=sys.stderr)

    def _check_lock(self) -> None:
        """Before replacing a manifest or run.json: this run must still own the folder."""
        if self._lock is not None:
            try:
                self._lock.check()
            except LockError as exc:
                raise PipelineError(str(exc)) from None

    def _run(self) -> list[StageReport]:
        ensure_ray(self.num_cpus)
        _quiet_ray_data(not self.progress)
        started = time.time()
        self.log(self.pipeline.describe())
        self.log(f"input: {self.reader.uri} ({self.reader.format}); output: {self.output.uri}")
        reports: list[StageReport] = []
        # A stage's fingerprint covers what it is (name, version, parameters) and what it reads: the
        # reader's view of the input files for ingest, the exact output files of the stage before
        # for every other stage. So a recomputed upstream stage always invalidates what follows.
        input_fp = self.reader.fingerprint()
        last = len(self.pipeline.stages) if self.only_index is None else self.only_index
        for index in range(0, last + 1):
            folder = self.folders[index]
            stage = None if index == 0 else self.pipeline.stages[index - 1]
            identity = (
                {"stage": INGEST, "ids": self.on_duplicate_id}
                if stage is None
                else {
                    "stage": stage.name,
                    "version": stage.version,
                    "params": stage.params_hash,
                }
            )
            fingerprint = stable_hash({**identity, "input": input_fp})
            cached = None if self._must_run(index) else self._cached(folder, fingerprint)
            if self.only_index is not None and index < self.only_index and cached is None:
                raise PipelineError(
                    f"--only {self.folders[self.only_index]} needs the output of {folder}, which is missing "
                    "or out of date; run without --only (or with --from) first"
                )
            if cached is not None:
                manifest = cached
                reports.append(self._report_from_manifest(index, folder, cached, "cached"))
                self.log(
                    f"[{folder}] cached: {cached['kept']:,} rows kept of {cached['rows_in']:,}"
                )
            else:
                manifest = self._run_stage(
                    index, folder, stage, fingerprint, input_fp, fresh=self._must_run(index)
                )
                reports.append(
                    self._report_from_manifest(index, folder, manifest, manifest["status"])
                )
            input_fp = manifest["output_fingerprint"]
        summary = self._write_run_json(reports, time.time() - started)
        if self.progress:
            print(format_funnel(summary), flush=True)
        return reports

    def _run_stage(
        self,
        index: int,
        folder: str,
        stage: Stage | None,
        fingerprint: str,
        input_fp: str,
        fresh: bool = False,
    ) -> dict:
        out = self.output.join(folder)
        started = time.time()
        attempt = out.join(ATTEMPT)
        resumable = stage is None or isinstance(stage, BatchStage)
        status = "computed"
        self._check_lock()
        if out.exists():
            previous = _read_json_or_none(attempt)
            if (
                resumable
                and not fresh
                and previous
                and previous.get("fingerprint") == fingerprint
                and not self._manifest(folder)
            ):
                status = "resumed"
            else:
                out.rmtree()
        out.mkdir()
        out.join(REJECTED_DIR).mkdir()
        out.join(PROGRESS_DIR).mkdir()
        if status == "computed":
            attempt.write_json_atomic({"fingerprint": fingerprint, "started": _now()})
        label = stage.name if stage else INGEST
        self._folder = folder
        self.log(f"[{folder}] {'resuming' if status == 'resumed' else 'running'} {label}")

        if stage is None:
            expected = None
            self._run_ingest(out, status == "resumed")
        else:
            # The upstream manifest lists exactly the files that stage committed, with row counts:
            # nothing else in its folder (a stray file, a leftover of a retried task) is read.
            in_folder = self.output.join(self.folders[index - 1])
            upstream = self._manifest(self.folders[index - 1])
            sources = [in_folder.join(f["name"]).path for f in upstream["files"]]
            expected = {
                _normalise_src(in_folder.join(f["name"]).path): f["rows"] for f in upstream["files"]
            }
            if isinstance(stage, BatchStage):
                self._run_map(stage, out, sources, expected)
            else:
                self._run_global(stage, out, sources, expected)

        state = read_ledger(out)
        if stage is None:
            complete = complete_sources(state, None)
            units = {u.key for u in self._units}
            if complete != units:
                raise PipelineError(f"{folder}: {len(units - complete)} input units did not finish")
        elif isinstance(stage, BatchStage):
            rows = state.rows_by_src()
            bad = {s: (rows.get(s, 0), n) for s, n in expected.items() if rows.get(s, 0) != n}
            if bad:
                s, (got, n) = next(iter(bad.items()))
                raise PipelineError(
                    f"{folder}: rows in != kept + rejected for {len(bad)} shards (e.g. {s}: {got} of {n})"
                )
        # Drop anything the ledger does not vouch for (a piece whose entry was never written).
        state = prune_incomplete(out, state, set(state.rows_by_src()) | set(state.done_markers))
        totals = state.totals()
        if stage is not None and totals["rows_in"] != sum(expected.values()):
            raise PipelineError(
                f"{folder}: stage {stage.name} accounted for {totals['rows_in']:,} rows "
                f"(kept {totals['kept']:,} + rejected {totals['rejected']:,}) but received {sum(expected.values()):,}"
            )
        seconds = time.time() - started
        manifest = {
            "stage": label,
            "folder": folder,
            "version": stage.version if stage else "1",
            "kind": "ingest"
            if stage is None
            else ("batch" if isinstance(stage, BatchStage) else "global"),
            "params": dataclasses.asdict(stage.params) if stage else self.reader.describe(),
            "params_hash": stage.params_hash if stage else stable_hash(self.reader.describe()),
            "input_fingerprint": input_fp,
            "fingerprint": fingerprint,
            "output_fingerprint": stable_hash(
                {"fingerprint": fingerprint, "files": totals["files"]}
            ),
            "rows_in": totals["rows_in"],
            "kept": totals["kept"],
            "rejected": totals["rejected"],
            "reasons": totals["reasons"],
            "files": totals["files"],
            "rejected_files": totals["rejected_files"],
            "seconds": round(seconds, 3),
            "status": status,
            "completed_at": _now(),
            "schema": _schema_of(out, totals["files"]),
            "sums": _sum_columns(
                out,
                [f["name"] for f in totals["files"]]
                + [f"{REJECTED_DIR}/{f['name']}" for f in totals["rejected_files"]],
                stage.summed_columns if stage else (),
            ),
        }
        self._check_lock()
        out.join(MANIFEST).write_json_atomic(manifest)
        self.log(
            f"[{folder}] done: {manifest['rows_in']:,} in, {manifest['kept']:,} kept, "
            f"{manifest['rejected']:,} rejected, {seconds:.1f} s"
        )
        return manifest

    def _pending(
        self, out: Location, expected: dict[str, int] | None, keys: Sequence[str]
    ) -> list[str]:
        state = read_ledger(out)
        complete = complete_sources(state, expected)
        prune_incomplete(out, state, complete)
        pending = [k for k in keys if k not in complete]
        if complete:
            self.log(f"  {len(complete)} of {len(keys)} sources already done; {len(pending)} to go")
        return pending

    def _run_ingest(self, out: Location, resumed: bool) -> None:
        """Read every unit under `_read/`, decide on repeated ids, then write the stage's rows.

        Each step resumes: read by unit, the id decisions once, the final rows by unit. The
        `_read/` and `_ids/` folders go once every unit is written.
        """
        import ray

        self._units = self.reader.plan()
        if len({u.key for u in self._units}) != len(self._units):
            raise PipelineError(f"{self.reader.format} reader planned duplicate unit keys")
        by_key = {u.key: u for u in self._units}
        keys = list(by_key)
        raw = out.join(unique_ids.RAW_DIR)
        if self._pending(out, None, keys):
            raw.mkdir()
            raw.join(REJECTED_DIR).mkdir()
            raw.join(PROGRESS_DIR).mkdir()
            pending = self._pending(raw, None, keys)
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
                    fn_args=(self.reader, raw),
                    num_cpus=1,
                )
                self._drain(ds, INGEST, None)
            self._unique_ids(out, raw, keys)
        raw.rmtree()
        out.join(unique_ids.IDS_DIR).rmtree()

    def _unique_ids(self, out: Location, raw: Location, keys: list[str]) -> None:
        import ray

        state = read_ledger(raw)
        if complete_sources(state, None) != set(keys):
            raise PipelineError(
                f"{INGEST}: {len(set(keys) - set(state.done_markers))} units unread"
            )
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
        repeated = unique_ids.decide(out, files, keys, self.on_duplicate_id, kept, _cluster_cpus())
        if repeated:
            verb = "renamed or rejected" if self.on_duplicate_id == "suffix" else "rejected"
            self.log(f"  {repeated:,} rows repeat an id seen before: {verb}")
        pending = self._pending(out, None, keys)
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
            fn_args=(raw, out, self.on_duplicate_id),
            num_cpus=READ_CPUS,
        )
        self._drain(ds, f"{INGEST}: unique ids", sum(state.done_markers.values()))

    def _run_map(
        self, stage: BatchStage, out: Location, sources: list[str], expected: dict[str, int]
    ) -> None:
        import ray

        by_src = {_normalise_src(p): p for p in sources}
        pending = self._pending(out, expected, list(by_src))
        pending = [p for p in pending if expected[p] > 0]
        if not pending:
            return
        # Pieces of the stage's batch size (rows per process() call) within each source shard.
        step = stage.batch_size or MAP_ROWS_PER_PIECE
        items = _map_pieces({p: by_src[p] for p in pending}, expected, step)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        resources = _map_resources(stage)
        if stage.uses_model:
            ds = ds.map_batches(
                _MapActor,
                fn_constructor_args=(stage, self.output.fs, out),
                batch_size=1,
                batch_format="pyarrow",
                **resources,
            )
        else:
            ds = ds.map_batches(
                _map_task,
                fn_args=(stage, self.output.fs, out),
                batch_size=1,
                batch_format="pyarrow",
                **resources,
            )
        self._drain(ds, stage.name, sum(expected[p] for p in pending))

    def _run_global(
        self, stage: GlobalStage, out: Location, sources: list[str], rows: dict[str, int]
    ) -> None:
        import ray

        total = sum(rows.values())
        if not sources or not total:
            return
        files = [(p, rows[_normalise_src(p)]) for p in sources]
        items = _global_pieces(files, total)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _global_read_task,
            fn_args=(self.output.fs,),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=READ_CPUS,
        )
        ds = stage.run(
            ds, GlobalContext(num_rows=total, num_shards=len(sources), num_cpus=_cluster_cpus())
        )
        staging = out.join(STAGING_DIR)
        staging.mkdir()
        ds = ds.map_batches(
            _global_write_task,
            fn_args=(out, staging, stage.name, total),
            batch_format="pyarrow",
            batch_size=None,
        )
        self._drain(ds, stage.name, total)
        fragments = _staged_fragments(staging)
        if fragments:
            merge = [{"part": p, "files": json.dumps(f)} for p, f in fragments.items()]
            ds = ray.data.from_items(merge, override_num_blocks=len(merge)).map_batches(
                _global_merge_task,
                fn_args=(out, stage.name, total),
                batch_size=1,
                batch_format="pyarrow",
            )
            self._drain(ds, f"{stage.name} (merge)", None)
        staging.rmtree()

    def _drain(self, ds, label: str, total: int | None) -> None:
        progress = _Progress(label, total, self.progress)
        try:
            for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.add(summary)
        except Exception as exc:  # Ray wraps worker errors; show the user the cause, not the stack
            raise self._failure(label, exc) from exc
        if self.progress and progress.printed_rows != progress.rows:
            progress.print()

    def _failure(self, label: str, exc: BaseException) -> PipelineError:
        """The one-line error for the console; the full story goes to OUTPUT/logs/<folder>.log."""
        cause = _root_cause(exc)
        details = cause.details if isinstance(cause, StageFailed) else ""
        text = "".join(traceback.format_exception(exc))
        if details:
            text += "\nIn the Ray worker:\n" + details
        log = self.output.join(LOGS_DIR, f"{getattr(self, '_folder', label)}.log")
        where = ""
        try:
            log.mkdir_parent()
            log.write_bytes_atomic(text.encode())
            where = f" (traceback: {log.uri})"
        except OSError:
            pass
        return PipelineError(f"stage {label} failed: {one_line(cause)}{where}")

    # ---- reporting

    def _report_from_manifest(self, index: int, folder: str, m: dict, status: str) -> StageReport:
        return StageReport(
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

    def _write_run_json(self, reports: list[StageReport], seconds: float) -> dict:
        summary = {
            "pipeline": self.pipeline.name,
            "input": self.reader.describe(),
            "output": self.output.uri,
            "finished_at": _now(),
            "seconds": round(seconds, 3),
            "stages": [
                dict(dataclasses.asdict(r), kept_share=round(r.kept_share, 6)) for r in reports
            ],
            "final": {"folder": reports[-1].folder, "rows": reports[-1].kept} if reports else None,
        }
        self._check_lock()
        self.output.join("run.json").write_json_atomic(summary)
        return summary


def format_funnel(summary: dict, top_reasons: int = 3) -> str:
    """The funnel table: rows in, kept, rejected, kept share, top rejection reasons and seconds."""
    head = f"{'stage':<24} {'status':<9} {'rows in':>10} {'kept':>10} {'rejected':>10} {'kept %':>7} {'sec':>7}  top rejection reasons"
    lines = [f"funnel for {summary['pipeline']} -> {summary['output']}", head, "-" * len(head)]
    for s in summary["stages"]:
        reasons = sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:top_reasons]
        rtext = "; ".join(f"{k} x{v:,}" for k, v in reasons)
        lines.append(
            f"{s['folder']:<24} {s['status']:<9} {s['rows_in']:>10,} {s['kept']:>10,} {s['rejected']:>10,} "
            f"{100 * s['kept_share']:>6.1f}% {s['seconds']:>7.1f}  {rtext}"
        )
    for s in summary["stages"]:
        if s.get("sums"):
            totals = "; ".join(f"{k} {v:,.0f}" for k, v in s["sums"].items())
            lines.append(f"{s['folder']}: {totals}")
    if summary.get("final"):
        lines.append(
            f"final: {summary['final']['rows']:,} rows in {summary['final']['folder']} ({summary['seconds']:.1f} s)"
        )
    return "\n".join(lines)


def _sum_columns(out: Location, files: list[str], columns: Sequence[str]) -> dict[str, float]:
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


def _schema_of(out: Location, files: list[dict]) -> str | None:
    import pyarrow.parquet as pq

    if not files:
        return None
    with out.fs.open_input_file(out.join(files[0]["name"]).path) as f:
        return str(pq.read_schema(f))


def _root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException, ...)."""
    e, seen = exc, set()
    found = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not type(e).__module__.startswith("ray."):
            found = e
        nxt = getattr(e, "cause", None) or e.__cause__
        e = nxt if isinstance(nxt, BaseException) else None
    return found or exc


def _quiet_ray_data(quiet: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our own progress lines are shorter than Ray's bars and survive `ray job logs`.
    ctx.enable_progress_bars = False
    # Ray 2.60's datasource v2 Parquet read ignores num_cpus for its list/read tasks, and an actor
    # pool on a small machine then starves them forever; the v1 read honours READ_CPUS.
    ctx.use_datasource_v2 = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray warns that its bars are off; that is our choice, not the user's problem.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # A worker's error reaches the driver as itself (StageFailed: one line and the traceback for
    # OUTPUT/logs/), not wrapped in UserCodeException, and Ray Data's own announcements of it are
    # not printed: the runner reports every failed stage once.
    ctx.raise_original_map_exception = True
    for name in _RAY_FAILURE_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _ReportedByRunner) for f in log.filters):
            log.addFilter(_ReportedByRunner())


_RAY_FAILURE_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data.exceptions",
)


class _ReportedByRunner(logging.Filter):
    """Drops Ray Data's console report of a failed task (its notice and the stack, which Ray
    Data prints in full for any error that is not its own UserCodeException wrapper): the runner
    prints the cause once and writes the whole stack to OUTPUT/logs/<stage>.log."""

    PREFIXES = (
        "An exception was raised from a task of operator",
        "Exception occurred in user code",
        "Exception occurred in Ray Data or Ray Core internal code",
        "Full stack trace:",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _is_training_data(reader: Reader, trained_on: dict | None) -> bool:
    """True when the reader's input is one file with the size and SHA-256 a demo marker names
    (the bundled file, wherever it was copied); large inputs are never hashed."""
    import hashlib

    from warren.stages.shards import list_files

    if not trained_on:
        return False
    try:
        files = list_files(reader.location)
    except (OSError, FileNotFoundError):
        return False
    if len(files) != 1 or files[0].size != trained_on.get("bytes"):
        return False
    digest = hashlib.sha256()
    with reader.location.fs.open_input_stream(files[0].path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == trained_on.get("sha256")


def _read_json_or_none(loc: Location) -> dict | None:
    """A JSON file, or None when it is missing or unreadable (a write cut short by a crash)."""
    try:
        return loc.read_json() if loc.exists() else None
    except (ValueError, OSError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_pipeline(
    pipeline: Pipeline, input_uri: str, output_uri: str, **kwargs: Any
) -> list[StageReport]:
    """Python API: the same as the recipe's command line."""
    return Runner(pipeline, input_uri, output_uri, **kwargs).run()


__all__ = [
    "Pipeline",
    "PipelineError",
    "Runner",
    "StageReport",
    "run_pipeline",
    "format_funnel",
    "ensure_ray",
]
