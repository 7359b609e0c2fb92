"""The pipeline runner: each stage of the plan in order, each materialised and cached.

A run's plan is the reader stage (ingest, `stages.readers.stage.ReaderStage`) followed by the
pipeline's stages (`pipelines.plan`); the runner treats them alike. For a run into OUTPUT (the
layout is `stages.run_layout`'s):

- `OUTPUT/00-ingest/` holds the input as canonical rows; `OUTPUT/NN-<stage>/` each stage's kept
  rows as Parquet shards, `.../rejected/` its rejected rows with a `reason` column, and
  `.../_manifest.json` (name, version, parameters, resources, columns, thresholds, fingerprints,
  counts, time, schema, and for a map stage the CPUs, GPUs and actors its workers ran with) once
  the stage completed.
- Before any work (before the lock, before Ray) the plan's columns are checked
  (`pipelines.plan.check_columns`): a stage requiring a column nothing before it adds fails then.
- A stage's fingerprint hashes its name, version, parameters (never its resources) and the exact
  files of its input. A re-run skips every stage whose manifest carries the same fingerprint (and
  whose files are all there), so changing one parameter recomputes that stage and what follows
  it, nothing before.
- A map stage interrupted half way (a kill, a lost node) resumes source shard by source shard
  (`stages.ledger`, `pipelines.run_map`); ingest resumes unit by unit (`pipelines.run_ingest`);
  a global stage resumes from its prepared pieces, finished partitions, decisions and written
  pieces (`pipelines.run_global`).
- Output is deterministic: the same input and parameters give the same shards, byte for byte,
  whatever the timing, the number of workers or the resume point.
- Progress lines are printed while a stage runs; a funnel table at the end, saved as
  `OUTPUT/run.json` (`pipelines.funnel`).
- A run holds `OUTPUT/.lock` (`stages.shards.OutputLock`) and checks it before every manifest and
  `run.json` it writes.
- A failed stage is one line (`PipelineError`) naming its cause; the whole traceback, the Ray
  worker's included, is written to `OUTPUT/logs/<stage folder>.log` (`pipelines.run_errors`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from warren.pipelines.describe import describe_pipeline
from warren.pipelines.funnel import (
    Progress,
    StageReport,
    format_funnel,
    now,
    run_summary,
    schema_of,
    sum_columns,
)
from warren.pipelines.plan import Pipeline, check_columns, fingerprint
from warren.pipelines.ray_session import ensure_ray, layout_of, quiet_ray_data
from warren.pipelines.run_errors import PipelineError, failure_text, one_line, root_cause
from warren.pipelines.run_global import run_global
from warren.pipelines.run_ingest import run_ingest
from warren.pipelines.run_map import GLOBAL_ROWS_PER_PART, MAP_ROWS_PER_READ, run_map
from warren.stages import unique_ids
from warren.stages.base import BatchStage, GlobalStage, Stage, stable_hash
from warren.stages.ledger import PROGRESS_DIR, complete_sources, prune_incomplete, read_ledger
from warren.stages.readers.base import Reader
from warren.stages.readers.stage import ReaderStage
from warren.stages.run_layout import (
    ATTEMPT,
    LOGS_DIR,
    REJECTED_DIR,
    LayoutError,
    StageFolder,
    read_manifest,
    stage_folder,
    write_manifest,
    write_run_json,
)
from warren.stages.shards import Location, LockError, OutputLock

#: How each kind of stage runs: (runner, stage, its folder, the stage folder before it) -> the
#: rows it received (None when its input is not rows, as the reader stage's).
Executor = Callable[[Any, Any, Location, StageFolder | None], int | None]
EXECUTORS: dict[type[Stage], Executor] = {
    ReaderStage: run_ingest,
    BatchStage: run_map,
    GlobalStage: run_global,
}
#: Kinds of stage that resume from their finished pieces after an interruption.
RESUMABLE = (ReaderStage, BatchStage, GlobalStage)


def _executor(stage: Stage) -> Executor:
    for kind, run in EXECUTORS.items():
        if isinstance(stage, kind):
            return run
    raise TypeError(f"{stage!r} is not a reader, batch or global stage")


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
        # The plan: the reader stage, then the pipeline's stages; folder NN-name each.
        self.stages: list[Stage] = pipeline.plan(ReaderStage(self.reader, on_duplicate_id))
        self.folders = [stage_folder(i, s.name) for i, s in enumerate(self.stages)]
        self.from_index = self._stage_index(from_stage, "--from") if from_stage else None
        self.only_index = self._stage_index(only, "--only") if only else None

    def _stage_index(self, ref: str, flag: str) -> int:
        names = [s.name for s in self.stages]
        for i, (name, folder) in enumerate(zip(names, self.folders, strict=True)):
            if ref in (name, folder, str(i)):
                return i
        raise PipelineError(
            f"{flag} {ref!r}: no such stage in pipeline {self.pipeline.name} "
            f"(stages: {', '.join(names)})"
        )

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    # ---- caching

    def _manifest(self, folder: str) -> dict | None:
        """A folder's manifest, or None when missing or unreadable (a write cut short)."""
        try:
            return read_manifest(self.output.join(folder))
        except LayoutError:
            return None

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

    def check(self) -> None:
        """What can be known before any work: demo models on their own data, and every column
        a stage requires added before it (`pipelines.plan.check_columns`)."""
        self._check_demo_models()
        check_columns(self.stages)

    def run(self) -> list[StageReport]:
        self.check()
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
        quiet_ray_data(not self.progress)
        started = time.time()
        self.log(describe_pipeline(self.pipeline, self.stages[0]))
        self.log(f"input: {self.reader.uri} ({self.reader.format}); output: {self.output.uri}")
        reports: list[StageReport] = []
        # A stage's fingerprint covers what it is (name, version, parameters) and what it reads:
        # the reader's view of the input files for the reader stage, the exact output files of
        # the stage before for every other stage. So a recomputed upstream stage always
        # invalidates what follows.
        input_fp = self.stages[0].input_fingerprint()
        last = len(self.stages) - 1 if self.only_index is None else self.only_index
        for index in range(0, last + 1):
            folder = self.folders[index]
            stage = self.stages[index]
            fp = fingerprint(stage, input_fp)
            cached = None if self._must_run(index) else self._cached(folder, fp)
            if self.only_index is not None and index < self.only_index and cached is None:
                raise PipelineError(
                    f"--only {self.folders[self.only_index]} needs the output of {folder}, which "
                    "is missing or out of date; run without --only (or with --from) first"
                )
            if cached is not None:
                manifest = cached
                reports.append(StageReport.from_manifest(index, folder, cached, "cached"))
                self.log(
                    f"[{folder}] cached: {cached['kept']:,} rows kept of {cached['rows_in']:,}"
                )
            else:
                manifest = self._run_stage(
                    index, folder, stage, fp, input_fp, fresh=self._must_run(index)
                )
                reports.append(
                    StageReport.from_manifest(index, folder, manifest, manifest["status"])
                )
            input_fp = manifest["output_fingerprint"]
        summary = run_summary(
            self.pipeline.name,
            self.reader.describe(),
            self.output.uri,
            reports,
            time.time() - started,
        )
        self._check_lock()
        write_run_json(self.output, summary)
        if self.progress:
            print(format_funnel(summary), flush=True)
        return reports

    def _run_stage(
        self,
        index: int,
        folder: str,
        stage: Stage,
        fingerprint: str,
        input_fp: str,
        fresh: bool = False,
    ) -> dict:
        out = self.output.join(folder)
        started = time.time()
        attempt = out.join(ATTEMPT)
        status = "computed"
        self._check_lock()
        if out.exists():
            previous = _read_json_or_none(attempt)
            if (
                isinstance(stage, RESUMABLE)
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
            attempt.write_json_atomic({"fingerprint": fingerprint, "started": now()})
        self._folder = folder
        self.log(f"[{folder}] {'resuming' if status == 'resumed' else 'running'} {stage.name}")
        # The stage before gives this one its input: exactly the files its manifest lists.
        upstream = None
        if index > 0:
            upstream = StageFolder.load(self.output.join(self.folders[index - 1]), index - 1)
        expected = _executor(stage)(self, stage, out, upstream)

        # Drop anything the ledger does not vouch for (a piece whose entry was never written).
        state = read_ledger(out)
        state = prune_incomplete(out, state, set(state.rows_by_src()) | set(state.done_markers))
        totals = state.totals()
        if expected is not None and totals["rows_in"] != expected:
            raise PipelineError(
                f"{folder}: stage {stage.name} accounted for {totals['rows_in']:,} rows "
                f"(kept {totals['kept']:,} + rejected {totals['rejected']:,}) but received "
                f"{expected:,}"
            )
        seconds = time.time() - started
        described = stage.describe()
        manifest = {
            "stage": stage.name,
            "folder": folder,
            "version": stage.version,
            "kind": described["kind"],
            "params": described["params"],
            "params_hash": stage.params_hash,
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
            "completed_at": now(),
            "schema": schema_of(out, totals["files"]),
            "sums": sum_columns(
                out,
                [f["name"] for f in totals["files"]]
                + [f"{REJECTED_DIR}/{f['name']}" for f in totals["rejected_files"]],
                stage.summed_columns,
            ),
            # The stage contract as it ran: what it asked Ray for (never in the fingerprint),
            # the columns it read and added, and the thresholds the report draws.
            **{k: described[k] for k in _CONTRACT_KEYS if k in described},
        }
        if isinstance(stage, BatchStage):
            # What its workers got, where the runner chose it (model actors sized to the CPUs).
            manifest["ran_with"] = layout_of(stage)
        self._check_lock()
        write_manifest(out, manifest)
        self.log(
            f"[{folder}] done: {manifest['rows_in']:,} in, {manifest['kept']:,} kept, "
            f"{manifest['rejected']:,} rejected, {seconds:.1f} s"
        )
        return manifest

    def pending(
        self, out: Location, expected: dict[str, int] | None, keys: Sequence[str]
    ) -> list[str]:
        """The sources of `keys` whose pieces are not all committed in `out`'s ledger."""
        state = read_ledger(out)
        complete = complete_sources(state, expected)
        prune_incomplete(out, state, complete)
        pending = [k for k in keys if k not in complete]
        if complete:
            self.log(f"  {len(complete)} of {len(keys)} sources already done; {len(pending)} to go")
        return pending

    def drain(self, ds, label: str, total: int | None) -> None:
        """Run a Ray Data plan whose workers write their own output, printing progress."""
        progress = Progress(label, total, self.progress)
        try:
            for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.add(summary)
        except Exception as exc:  # Ray wraps worker errors; show the user the cause, not the stack
            raise self._failure(label, exc) from exc
        if self.progress and progress.printed_rows != progress.rows:
            progress.print()

    def _failure(self, label: str, exc: BaseException) -> PipelineError:
        """The one-line error for the console; the full story goes to OUTPUT/logs/<folder>.log."""
        log = self.output.join(LOGS_DIR, f"{getattr(self, '_folder', label)}.log")
        where = ""
        try:
            log.mkdir_parent()
            log.write_bytes_atomic(failure_text(exc).encode())
            where = f" (traceback: {log.uri})"
        except OSError:
            pass
        return PipelineError(f"stage {label} failed: {one_line(root_cause(exc))}{where}")


_CONTRACT_KEYS = ("resources", "requires", "adds", "adds_unknown", "thresholds")


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


def run_pipeline(
    pipeline: Pipeline, input_uri: str, output_uri: str, **kwargs: Any
) -> list[StageReport]:
    """Python API: the same as the recipe's command line."""
    return Runner(pipeline, input_uri, output_uri, **kwargs).run()


__all__ = [
    "GLOBAL_ROWS_PER_PART",
    "LOGS_DIR",
    "MAP_ROWS_PER_READ",
    "Pipeline",
    "PipelineError",
    "Runner",
    "StageReport",
    "check_columns",
    "ensure_ray",
    "format_funnel",
    "one_line",
    "run_pipeline",
]
