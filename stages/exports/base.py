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

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from warren.stages.run_layout import MANIFEST, LayoutError, open_stage
from warren.stages.shards import TMP_PREFIX, Location

# Canonical columns an export can carry; anything else (embeddings, scores) stays in the shards.
EXPORT_COLUMNS = ("id", "images", "conversations", "source", "caption", "url", "license")
BATCH_ROWS = 256


class ExportError(ValueError):
    """An export that cannot be made; the message names the folder, file or row and what to do."""


class SkipRow(Exception):
    """Raised by a format's item maker for a row the format cannot hold as a training example
    (no turns and no caption, ...): the row is counted under `reason`, never written half-made."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


EXAMPLE_IDS = 3  # ids shown per reason of rows not exported


class Skipped:
    """Rows not exported, counted by reason, with the first few ids of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, row_id: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLE_IDS:
            ids.append(row_id)

    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ids = ", ".join(repr(i) for i in self.examples[reason])
            more = ", ..." if n > len(self.examples[reason]) else ""
            out.append(f"{n:,} {reason} (e.g. {ids}{more})")
        return out

    def check_any_written(self, fmt: str, src: Location, written: int, given: int) -> None:
        """An export of no rows is a failure, never an empty success."""
        if written:
            return
        if not given:
            raise ExportError(
                f"{src.uri}: no kept rows to export as {fmt} (every row was rejected upstream; "
                "see the stages' rejected/ shards)"
            )
        raise ExportError(
            f"{src.uri}: exported 0 of {given:,} rows as {fmt}: " + "; ".join(self.lines())
        )


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
    given: int | None = None  # kept rows of the source (None: as many as `rows`)
    captions: int = 0  # caption rows written in LLaVA's pretraining form (see caption.py)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> rows
    skipped_lines: list[str] = dataclasses.field(default_factory=list)  # with example ids

    def summary(self) -> str:
        """What was written; when rows were not, how many and why, one line per reason."""
        extra = ""
        if self.images_shared or self.paths_changed:
            extra = f" ({self.images_shared:,} shared, {self.paths_changed:,} paths changed)"
        given = self.rows if self.given is None else self.given
        rows = f"{self.rows:,} rows" if given == self.rows else f"{self.rows:,} of {given:,} rows"
        captions = f" ({self.captions:,} from captions)" if self.captions else ""
        lines = [
            f"exported {rows}{captions} and {self.images:,} images{extra} as {self.format} to "
            f"{self.dest}: {self.files:,} files, {self.bytes:,} bytes"
        ]
        if given != self.rows:
            lines.append(f"not exported: {given - self.rows:,} rows:")
            lines += [f"  {line}" for line in self.skipped_lines]
        return "\n".join(lines)


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
        """A stage folder, or a run folder's final stage (stages.run_layout), every listed
        shard checked to exist with its manifest's size."""
        try:
            stage = open_stage(src)
        except LayoutError as exc:
            raise ExportError(str(exc)) from exc
        return cls(stage.loc, tuple(f.path for f in stage.kept), stage.rows)

    def columns(self) -> list[str]:
        """Export columns the shards have (the first shard's schema; shards of a stage agree)."""
        if not self.files:
            return list(EXPORT_COLUMNS)
        with self.location.fs.open_input_file(self.files[0]) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        return [c for c in EXPORT_COLUMNS if c in names]

    def has_values(self, column: str) -> bool:
        """Whether any row has a non-null top-level `column`, from the footers' statistics when
        they tell (no data read), else from that one column of the row group."""
        for path in self.files:
            with self.location.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                if column not in pf.schema_arrow.names:
                    continue
                meta = pf.metadata
                mapping = leaf_indices(pf.schema_arrow)
                # A type whose leaves we count wrong must never point at another column: then
                # the column is read instead.
                counted = sum(len(v) for v in mapping.values()) == meta.num_columns
                leaves = mapping[column]
                nested = pa.types.is_nested(pf.schema_arrow.field(column).type)
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    verdict = _stats_verdict(group, leaves, nested) if counted else None
                    if verdict is None:
                        table = pf.read_row_group(g, columns=[column])
                        verdict = table.column(0).null_count < group.num_rows
                    if verdict:
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


def leaf_indices(schema: pa.Schema) -> dict[str, list[int]]:
    """Top-level column name -> the indices of its Parquet leaf columns (the indices a row
    group's column chunks have). A nested column has several leaves (`images` is
    `images.list.element.bytes` and `images.list.element.path`), so a top-level field's position
    is not its leaf index. Leaves come depth first, field after field, so each field owns the
    next run of as many leaves as its type has (names are never parsed: they may hold dots)."""
    out: dict[str, list[int]] = {}
    start = 0
    for field in schema:
        n = _leaf_count(field.type)
        out[field.name] = list(range(start, start + n))
        start += n
    return out


def _leaf_count(t: pa.DataType) -> int:
    if isinstance(t, pa.ExtensionType):
        return _leaf_count(t.storage_type)
    if pa.types.is_struct(t):
        return sum(_leaf_count(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _leaf_count(t.key_type) + _leaf_count(t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaf_count(t.value_type)
    return 1


def _stats_verdict(group: pq.RowGroupMetaData, leaves: list[int], nested: bool) -> bool | None:
    """True/False when the footer's statistics decide whether a row of the group has a value,
    None when the column must be read. A flat column: null_count < rows. A nested one: a leaf
    with a value means its row's top-level value is not null, but leaves all null cannot tell an
    empty list or a struct of nulls (values) from a null (no value), so that is read."""
    stats = [group.column(i).statistics for i in leaves]
    if any(s is None or not s.has_null_count for s in stats):
        return None
    if not nested:
        return stats[0].null_count < group.num_rows
    if any(s.num_values > 0 for s in stats):
        return True
    return None


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
                _move_folder(self.dest.fs, self.path.path, self.dest.path)
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


def _move_folder(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Rename a folder; on an object store (s3://, gs://), which has no folders to rename and
    whose pyarrow filesystem refuses to move one, move its files one by one: the export then
    appears file by file instead of at once."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            target = dst + info.path[len(src) :]
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.move(info.path, target)


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
