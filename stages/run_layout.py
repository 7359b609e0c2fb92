"""The on-disk layout of a run: one module owns it.

    OUTPUT/
      .lock                       the lock of the run that writes here (stages.shards.OutputLock)
      run.json                    the funnel and the final stage, written when a run ends
      logs/NN-name.log            tracebacks of failed work
      NN-name/                    one folder per stage, NN its position in the pipeline
        _manifest.json            written once the stage completes: name, version, params,
                                  resources, columns, thresholds, fingerprints, counts, the
                                  kept and rejected files with their rows
        _attempt.json             the fingerprint of the attempt in progress (resume)
        part-*.parquet            kept rows
        rejected/part-*.parquet   rejected rows, with a `reason` column

A folder's manifest is the only truth about what it holds: files it does not list (leftovers of
a killed task) are never read. The runner writes this layout; the report, explain, exports,
mixtures and the trainers read it through `open_run` and `open_stage`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import pyarrow.fs as pafs

from warren.stages.shards import Location

MANIFEST = "_manifest.json"
RUN_JSON = "run.json"
REJECTED_DIR = "rejected"
LOGS_DIR = "logs"
#: Written when a stage starts computing (its fingerprint): a later run with the same fingerprint
#: resumes the stage's folder instead of clearing it, until the manifest says it completed.
ATTEMPT = "_attempt.json"
_FOLDER = re.compile(r"^(\d\d)-(.+)$")


class LayoutError(FileNotFoundError):
    """A folder is not what the caller needs (not a run, not a completed stage, a manifest that
    does not match the files); the message names the folder and what to give instead."""


def stage_folder(index: int, name: str) -> str:
    """The folder name of the stage at `index` of a pipeline: `NN-name`."""
    return f"{index:02d}-{name}"


def read_json(loc: Location) -> Any:
    """A JSON file of the layout; LayoutError naming it when unreadable."""
    try:
        return loc.read_json()
    except (ValueError, OSError) as exc:
        raise LayoutError(f"{loc.uri}: unreadable ({exc})") from exc


def read_manifest(folder: Location) -> dict | None:
    """The manifest of a stage folder, or None when the stage has not completed there."""
    loc = folder.join(MANIFEST)
    if not loc.exists():
        return None
    manifest = read_json(loc)
    if not isinstance(manifest, dict):
        raise LayoutError(f"{loc.uri}: not a manifest (expected a JSON object)")
    return manifest


def write_manifest(folder: Location, manifest: dict) -> None:
    """Written last, atomically: its presence means the stage completed."""
    folder.join(MANIFEST).write_json_atomic(manifest)


def read_run_json(output: Location) -> dict | None:
    loc = output.join(RUN_JSON)
    return read_json(loc) if loc.exists() else None


def write_run_json(output: Location, summary: dict) -> None:
    output.join(RUN_JSON).write_json_atomic(summary)


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """One shard a manifest lists."""

    path: str  # on the folder's filesystem
    rows: int
    bytes: int | None = None


@dataclasses.dataclass
class StageFolder:
    """A completed stage folder: its manifest and the shards it lists, in the manifest's order."""

    index: int
    folder: str
    loc: Location
    manifest: dict
    kept: list[ShardFile]
    rejected: list[ShardFile]

    @property
    def name(self) -> str:
        return self.manifest.get("stage") or self.folder.split("-", 1)[-1]

    @property
    def params(self) -> dict:
        return self.manifest.get("params") or {}

    @property
    def rows(self) -> int:
        """Kept rows, per the manifest."""
        return sum(f.rows for f in self.kept)

    def uris(self) -> list[str]:
        """The kept shards as URIs (the trainers and readers open them by URI)."""
        return [Location(self.loc.fs, f.path).uri for f in self.kept]

    def verify(self) -> StageFolder:
        """LayoutError unless every kept shard exists with the size its manifest gives: a file
        that changed after the stage wrote it is never read as if it were the stage's."""
        for f in self.kept:
            info = self.loc.fs.get_file_info(f.path)
            uri = Location(self.loc.fs, f.path).uri
            if info.type != pafs.FileType.File:
                raise LayoutError(f"{uri}: listed in {MANIFEST} but missing")
            if f.bytes is not None and info.size != f.bytes:
                raise LayoutError(
                    f"{uri}: {info.size} bytes, the manifest says {f.bytes}; the file changed "
                    "after the stage wrote it (re-run the stage)"
                )
        return self

    @classmethod
    def load(cls, loc: Location, index: int | None = None) -> StageFolder | None:
        """The stage folder at `loc`, or None when it has no manifest (not completed)."""
        manifest = read_manifest(loc)
        if manifest is None:
            return None
        name = os.path.basename(loc.path.rstrip("/"))
        if index is None:
            m = _FOLDER.match(name)
            index = int(m.group(1)) if m else 0
        try:
            kept = [_shard(loc, f) for f in manifest.get("files", [])]
            rejected = [
                _shard(loc.join(REJECTED_DIR), f) for f in manifest.get("rejected_files", [])
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"{loc.join(MANIFEST).uri}: malformed file list ({exc})") from exc
        return cls(index, name, loc, manifest, kept, rejected)


def _shard(folder: Location, entry: dict) -> ShardFile:
    size = entry.get("bytes")
    return ShardFile(folder.join(entry["name"]).path, int(entry["rows"]), size and int(size))


@dataclasses.dataclass
class Run:
    """A run's output folder: run.json (None for a run that has not finished once) and its
    completed stages in pipeline order."""

    loc: Location
    summary: dict | None
    stages: list[StageFolder]

    def final(self) -> StageFolder:
        """The stage whose kept rows are the run's result (run.json's `final`)."""
        final = (self.summary or {}).get("final")
        if not isinstance(final, dict) or not isinstance(final.get("folder"), str):
            raise LayoutError(
                f"{self.loc.join(RUN_JSON).uri}: names no final stage folder (an unfinished "
                "run?); give one stage folder instead, e.g. OUTPUT/03-export_check"
            )
        for stage in self.stages:
            if stage.folder == final["folder"]:
                return stage
        raise LayoutError(
            f"{self.loc.uri}: the final stage {final['folder']} has no {MANIFEST} (not completed)"
        )


def is_run(loc: Location) -> bool:
    return loc.join(RUN_JSON).exists() and not loc.join(MANIFEST).exists()


def open_run(output: str | os.PathLike | Location) -> Run:
    """A run's output folder. The stage folders come from run.json when there is one (the
    runner's order); without it (a run that never finished), every `NN-name` folder. Folders
    without a manifest (stages that did not complete) are left out."""
    out = output if isinstance(output, Location) else Location.of(output)
    if not out.is_dir():
        raise LayoutError(f"{out.uri}: no such folder")
    summary = read_run_json(out)
    if summary is not None:
        folders = [s["folder"] for s in summary.get("stages", [])]
    else:
        infos = out.fs.get_file_info(pafs.FileSelector(out.path))
        folders = sorted(
            fi.base_name
            for fi in infos
            if fi.type == pafs.FileType.Directory and _FOLDER.match(fi.base_name)
        )
    stages = []
    for i, folder in enumerate(folders):
        stage = StageFolder.load(out.join(folder), i)
        if stage is not None:
            stages.append(stage)
    if not stages:
        raise LayoutError(f"{out.uri}: no stage folder with a {MANIFEST}; not a run output")
    return Run(out, summary, stages)


def open_stage(src: str | os.PathLike | Location, verify: bool = True) -> StageFolder:
    """A completed stage folder, or a run folder's final stage: what `--data OUTPUT`, an export
    or a mixture source means by a warren output. `verify` checks every listed shard exists with
    its manifest's size."""
    loc = src if isinstance(src, Location) else Location.of(src)
    if not loc.is_dir():
        raise LayoutError(f"{loc.uri}: not a folder (expected a warren stage or output folder)")
    if is_run(loc):
        stage = open_run(loc).final()
    else:
        stage = StageFolder.load(loc)
        if stage is None:
            raise LayoutError(
                f"{loc.uri}: no {MANIFEST} (not a completed stage folder) and no {RUN_JSON} (not a "
                "run's output folder); give a stage folder such as OUTPUT/03-export_check or the "
                "output folder of a finished run"
            )
    return stage.verify() if verify else stage


def is_warren_output(loc: Location) -> bool:
    """Whether `loc` is a run folder, a completed stage folder, or a stage folder the runner
    started and did not complete (its `_attempt.json`): `open_stage` then refuses it, since its
    files are a partial stage, never to be read as a folder of shards."""
    return any(loc.join(name).exists() for name in (RUN_JSON, MANIFEST, ATTEMPT))
