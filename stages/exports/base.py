"""What every exporter shares: the warren folder it reads, the folder it writes, the report.

- `StageFolder.open(src)`: a stage folder (its `_manifest.json` lists the kept Parquet files, in
  order, with their row counts) or a pipeline output folder (its `run.json` names the final stage
  folder). Exactly the listed files are read, batch by batch, never the whole dataset at once, and
  the rows read must add up to the manifest's count.
- `StagedFolder`: the export is written into a temporary sibling folder of `dest`
  (`.tmp-export-<uuid>-<name>`) and renamed into place only once complete, so `dest` never holds
  half an export; a failed export leaves `dest` as it was. A non-empty `dest` is refused unless
  `overwrite=True`, and a `dest` that is or holds the source is always refused.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stages.shards import TMP_PREFIX, Location

# The runner's file names (pipelines.runner); stages do not import pipelines.
MANIFEST = "_manifest.json"
RUN_JSON = "run.json"
# Canonical columns an export can carry; anything else (embeddings, scores) stays in the shards.
EXPORT_COLUMNS = ("id", "images", "conversations", "source", "caption", "url", "license")
BATCH_ROWS = 256


class ExportError(ValueError):
    """An export that cannot be made; the message names the folder, file or row and what to do."""


@dataclasses.dataclass
class ExportReport:
    """What an export wrote."""

    format: str
    dest: str
    rows: int
    images: int  # image files written (llava, sharegpt) or images embedded (hf)
    bytes: int  # size of everything under dest
    files: int  # files under dest
    images_shared: int = 0  # images that reuse a file already written (same path, same bytes)
    paths_changed: int = 0  # images written at another path than their own (see image_tree)

    def summary(self) -> str:
        extra = ""
        if self.images_shared or self.paths_changed:
            extra = f" ({self.images_shared:,} shared, {self.paths_changed:,} paths changed)"
        return (
            f"exported {self.rows:,} rows and {self.images:,} images{extra} as {self.format} to "
            f"{self.dest}: {self.files:,} files, {self.bytes:,} bytes"
        )


def check_options(fmt: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ExportError(
            f"export {fmt}: unknown option(s) {', '.join(unknown)}; known options: {known}"
        )


@dataclasses.dataclass(frozen=True)
class StageFolder:
    """The kept shards of one warren stage folder, as its manifest lists them."""

    location: Location
    files: tuple[str, ...]  # paths, in manifest order
    rows: int  # kept rows, per the manifest

    @classmethod
    def open(cls, src: str) -> StageFolder:
        loc = Location.of(src)
        if not loc.is_dir():
            raise ExportError(f"{loc.uri}: not a folder (expected a warren stage or output folder)")
        if not loc.join(MANIFEST).exists() and loc.join(RUN_JSON).exists():
            run = _read_json(loc.join(RUN_JSON))
            final = run.get("final") if isinstance(run, dict) else None
            if not isinstance(final, dict) or not isinstance(final.get("folder"), str):
                raise ExportError(f"{loc.join(RUN_JSON).uri}: names no final stage folder")
            loc = loc.join(final["folder"])
        manifest_loc = loc.join(MANIFEST)
        if not manifest_loc.exists():
            raise ExportError(
                f"{loc.uri}: no {MANIFEST} (not a completed stage folder) and no {RUN_JSON} "
                "(not a pipeline output folder); export a stage folder such as OUTPUT/03-export_check "
                "or the output folder of a finished run"
            )
        manifest = _read_json(manifest_loc)
        try:
            listed = [(f["name"], int(f["rows"]), f.get("bytes")) for f in manifest["files"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{manifest_loc.uri}: malformed file list ({exc})") from exc
        paths = []
        for name, _, size in listed:
            info = loc.fs.get_file_info(loc.join(name).path)
            if info.type != pafs.FileType.File:
                raise ExportError(f"{loc.join(name).uri}: listed in {MANIFEST} but missing")
            if size is not None and info.size != size:
                raise ExportError(
                    f"{loc.join(name).uri}: {info.size} bytes, the manifest says {size}; the file "
                    "changed after the stage wrote it (re-run the stage)"
                )
            paths.append(info.path)
        return cls(loc, tuple(paths), sum(rows for _, rows, _ in listed))

    def columns(self) -> list[str]:
        """Export columns the shards have (the first shard's schema; shards of a stage agree)."""
        if not self.files:
            return list(EXPORT_COLUMNS)
        with self.location.fs.open_input_file(self.files[0]) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        return [c for c in EXPORT_COLUMNS if c in names]

    def has_values(self, column: str) -> bool:
        """Whether any row has a non-null `column`, from the footers' statistics when they have
        them (no data read), else from that one column."""
        for path in self.files:
            with self.location.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                if column not in pf.schema_arrow.names:
                    continue
                index = pf.schema_arrow.names.index(column)
                meta = pf.metadata
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    stats = group.column(index).statistics
                    if stats is None or not stats.has_null_count:
                        if pf.read_row_group(g, columns=[column]).column(0).null_count < (
                            group.num_rows
                        ):
                            return True
                    elif stats.null_count < group.num_rows:
                        return True
        return False

    def batches(self) -> Iterator[list[dict]]:
        """Rows as dicts, a Parquet batch at a time, in manifest order; ExportError if the rows
        read do not add up to the manifest's count (a file changed under us)."""
        columns = self.columns()
        seen = 0
        for path in self.files:
            with self.location.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    seen += batch.num_rows
                    yield batch.to_pylist()
        if seen != self.rows:
            raise ExportError(
                f"{self.location.uri}: read {seen:,} rows, {MANIFEST} lists {self.rows:,}"
            )


def _read_json(loc: Location) -> Any:
    try:
        return loc.read_json()
    except (ValueError, OSError) as exc:
        raise ExportError(f"{loc.uri}: unreadable ({exc})") from exc


class StagedFolder:
    """`with StagedFolder(dest, ...) as staged:` write under `staged.path`; on success the folder
    is renamed to `dest` (replacing it when `overwrite`), on failure it is deleted."""

    def __init__(self, dest: str, overwrite: bool, source: Location) -> None:
        self.dest = Location.of(dest)
        info = self.dest.fs.get_file_info(self.dest.path)
        if info.type == pafs.FileType.File:
            raise ExportError(f"{self.dest.uri}: is a file; give a folder to export into")
        src, dst = source.path.rstrip("/") + "/", self.dest.path.rstrip("/") + "/"
        if src.startswith(dst):
            raise ExportError(
                f"{self.dest.uri}: is or holds the source folder {source.uri}; export elsewhere"
            )
        if info.type == pafs.FileType.Directory and not overwrite:
            if self.dest.fs.get_file_info(pafs.FileSelector(self.dest.path)):
                raise ExportError(
                    f"{self.dest.uri}: not empty; pass overwrite=True (--overwrite) to replace it"
                )
        parent, name = self.dest.path.rstrip("/").rsplit("/", 1)
        tag = f"{TMP_PREFIX}export-{uuid.uuid4().hex[:12]}-{name}"
        self.path = Location(self.dest.fs, f"{parent}/{tag}")
        # Scratch space next to the export (the hf exporter's generator cache), never moved.
        self.scratch = Location(self.dest.fs, f"{parent}/{tag}-scratch")

    def __enter__(self) -> StagedFolder:
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.dest.exists():
                    self.dest.rmtree()
                self.dest.fs.move(self.path.path, self.dest.path)
        finally:
            for loc in (self.path, self.scratch):
                try:
                    loc.rmtree()
                except OSError:
                    pass

    def totals(self) -> tuple[int, int]:
        """(files, bytes) under the staged folder."""
        infos = self.path.fs.get_file_info(pafs.FileSelector(self.path.path, recursive=True))
        files = [i for i in infos if i.type == pafs.FileType.File]
        return len(files), sum(i.size or 0 for i in files)


class JsonListWriter:
    """A JSON list written item by item (one item a line), so no export is held in memory."""

    def __init__(self, loc: Location) -> None:
        self.stream = loc.fs.open_output_stream(loc.path, buffer_size=1 << 20)
        self.count = 0
        self.stream.write(b"[")

    def add(self, item: dict) -> None:
        sep = b"\n" if self.count == 0 else b",\n"
        self.stream.write(sep + json.dumps(item, ensure_ascii=False).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        self.stream.write(b"\n]\n")
        self.stream.close()


def write_json(loc: Location, obj: Any) -> None:
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
