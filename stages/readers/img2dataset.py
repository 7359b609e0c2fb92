"""Reader for img2dataset output folders.

img2dataset writes, per shard `NNNNN`:

- `output_format=webdataset`: `NNNNN.tar` holding `<key>.jpg|png|webp`, `<key>.txt` (caption) and
  `<key>.json` (url, caption, width, height, original_width, original_height, status, ...) for the
  samples that downloaded, plus `NNNNN.parquet` with one metadata row per input sample, failed
  ones included (`status`, `error_message`);
- `output_format=parquet`: `NNNNN.parquet` holding the metadata columns and the image bytes
  (`jpg`/`png`/`webp`, null for failed samples).

With tars present the tars are read (a unit is one tar, streamed; a table per `batch_size` samples)
and the sibling `NNNNN.parquet` contributes its failed samples as rejected rows
`"download: failed (<error_message>)"`, so rows in = samples img2dataset was asked for. Without
tars the image-bearing Parquet files are read with Arrow compute (a unit is one file).

A sample that cannot be a row is a rejected row naming it: `img2dataset: bad metadata
(<key>.json: ...)`, `img2dataset: caption not UTF-8 (<key>.txt)`, `img2dataset: missing image
(<key>)`, `img2dataset: bad record (NNNNN.tar sample <key>: text is not valid UTF-8: lone
surrogate)`. A tar cut short keeps the samples before the break and ends with one rejected row,
`img2dataset: unreadable tar (NNNNN.tar after N samples: ...)`.

The id is the img2dataset key; `url`, `caption`, `width`, `height` and the original sizes are kept.
Options: `source` (default: the folder name), `batch_size` (default 256).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.columns import (
    ColumnMapping,
    empty_images,
    file_uri,
    fill_missing_ids,
    finish,
    list_input_files,
    open_parquet_schema,
    relative_key,
    table_from_rows,
)
from warren.stages.schema import REJECT_COLUMN, content_id

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "tif")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")
METADATA_COLUMNS = ("key", "status")
# Columns of a tar unit's rows besides the core ones, in order (failed rows from the sibling
# Parquet get the same ones, so every table of a unit has one schema).
SIZE_FIELDS = [
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
]
TAR_METADATA = (
    "key",
    "url",
    "caption",
    "license",
    "status",
    "error_message",
    *(f.name for f in SIZE_FIELDS),
)
# Columns of the Parquet metadata that are encoded elsewhere (id, images, _reject) and not kept.
DROPPED_COLUMNS = ("key", "status", "error_message", "txt", *PARQUET_IMAGE_COLUMNS)
_TAR_MAGIC_OFFSET = 257


def _is_tar_header(head: bytes) -> bool:
    return len(head) >= 512 and head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def failure_reasons(status: pa.Array, error_message: pa.Array | None) -> pa.Array:
    """`"download: failed (<error_message>)"` where status != "success", else null."""
    status = pc.cast(status, pa.string())
    detail = (
        status
        if error_message is None
        else pc.coalesce(pc.cast(error_message, pa.string()), status)
    )
    detail = pc.fill_null(detail, "unknown error")
    reasons = pc.binary_join_element_wise("download: failed (", detail, ")", "")
    failed = pc.fill_null(pc.not_equal(status, "success"), True)
    return pc.if_else(failed, reasons, pa.scalar(None, pa.string()))


class Img2DatasetReader(Reader):
    """img2dataset output: WebDataset tars (+ metadata Parquet) or Parquet with image bytes."""

    format = "img2dataset"
    OPTIONS = ("source", "batch_size")
    DEFAULT_BATCH_SIZE = 256

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)

    # ---------------------------------------------------------------- plan

    def plan(self) -> list[ReadUnit]:
        files = list_input_files(
            self.format, self.location, (".tar", ".parquet"), ".tar or .parquet files"
        )
        tars = [f.path for f in files if f.path.endswith(".tar")]
        parquets = [f.path for f in files if f.path.endswith(".parquet")]
        units = []
        if tars:
            for path in tars:
                self._check_tar(path)
                meta = path[: -len(".tar")] + ".parquet"
                if meta in parquets:
                    self._check_metadata(meta, need_image=False)
                else:
                    meta = None
                units.append(
                    ReadUnit(
                        relative_key(self.location, path), path, {"mode": "tar", "metadata": meta}
                    )
                )
            # A metadata file whose tar is missing still accounts for its samples (as rejected rows).
            tar_stems = {p[: -len(".tar")] for p in tars}
            for path in parquets:
                if path[: -len(".parquet")] not in tar_stems:
                    self._check_metadata(path, need_image=False)
                    units.append(
                        ReadUnit(relative_key(self.location, path), path, {"mode": "metadata"})
                    )
        else:
            for path in parquets:
                self._check_metadata(path, need_image=True)
                units.append(ReadUnit(relative_key(self.location, path), path, {"mode": "parquet"}))
        return units

    def _check_tar(self, path: str) -> None:
        fs = self.location.fs
        try:
            with fs.open_input_stream(path) as f:
                head = f.read(512)
        except OSError as exc:
            raise InputError(f"{self.format}: {file_uri(fs, path)}: cannot read ({exc})") from exc
        if not _is_tar_header(head):
            raise InputError(f"{self.format}: {file_uri(fs, path)}: not a tar file")

    def _check_metadata(self, path: str, need_image: bool) -> pa.Schema:
        fs = self.location.fs
        where = file_uri(fs, path)
        schema, _ = open_parquet_schema(self.format, fs, path)
        missing = [c for c in METADATA_COLUMNS if c not in schema.names]
        if missing:
            raise InputError(
                f"{self.format}: {where}: not img2dataset metadata (missing column {', '.join(missing)}; "
                f"columns are {schema.names})"
            )
        if need_image and _image_column(schema) is None:
            raise InputError(
                f"{self.format}: {where}: no image column ({'/'.join(PARQUET_IMAGE_COLUMNS)}) and no .tar "
                "shards in the folder; was img2dataset run with output_format webdataset or parquet?"
            )
        _mapping(_image_column(schema)).resolve(schema, where)
        return schema

    # ---------------------------------------------------------------- read

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        if unit.options.get("mode") == "tar":
            yield from self._read_tar(unit.path)
            if unit.options.get("metadata"):
                yield from self._read_metadata(unit.options["metadata"], tar_missing=False)
        elif unit.options.get("mode") == "metadata":
            yield from self._read_metadata(unit.path, tar_missing=True)
        else:
            yield from self._read_parquet(unit.path)

    # Hooks for readers that run img2dataset themselves (stages.readers.download): they give ids
    # of their own and finer rejection reasons, and share the rest of the conversion.

    def _prepare(self, raw: pa.Table) -> pa.Table:
        """A raw metadata batch before conversion; `key` becomes the id."""
        return raw

    def _failure_reasons(self, raw: pa.Table) -> pa.Array:
        """The rejection reason of each row of a raw batch; null for a downloaded sample."""
        return failure_reasons(raw.column("status").combine_chunks(), _column(raw, "error_message"))

    def _finish(self, table: pa.Table, path: str, first_row: int = 0) -> pa.Table:
        return finish(
            table,
            self.source,
            "source" in self.options,
            file_uri(self.location.fs, path),
            self.format,
            first_row,
        )

    def _read_parquet(self, path: str) -> Iterator[pa.Table]:
        fs = self.location.fs
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            image_col = _image_column(schema)
            mapping = _mapping(image_col)
            conversions = mapping.resolve(schema, file_uri(fs, path))
            offset = 0  # rows of the file before this batch: reasons name the file's row
            for batch in pf.iter_batches(batch_size=self.batch_size):
                raw = self._prepare(pa.Table.from_batches([batch]))
                keys = pc.cast(raw.column("key"), pa.string())
                paths = None
                if image_col is not None:
                    paths = pc.binary_join_element_wise(keys, f".{image_col}", "")
                table = mapping.apply(raw, conversions, image_paths=paths)
                reasons = self._failure_reasons(raw)
                no_image = pc.equal(pc.list_value_length(table.column("images")), 0)
                missing = pc.binary_join_element_wise("img2dataset: missing image (", keys, ")", "")
                reasons = pc.if_else(pc.and_(pc.is_null(reasons), no_image), missing, reasons)
                yield self._finish(table.append_column(REJECT_COLUMN, reasons), path, offset)
                offset += batch.num_rows

    def _read_metadata(self, path: str, tar_missing: bool) -> Iterator[pa.Table]:
        """Rejected rows from a metadata Parquet, with the columns of a tar unit's rows.

        Next to its tar: the samples whose status is not success. Without its tar (an interrupted
        img2dataset run): every sample, successes rejected as `img2dataset: missing image`.
        """
        fs = self.location.fs
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in TAR_METADATA if c in pf.schema_arrow.names]
            meta = pf.read(columns=present)
        reasons = failure_reasons(
            meta.column("status").combine_chunks(), _column(meta, "error_message")
        )
        if tar_missing:
            tar_name = path.rsplit("/", 1)[-1][: -len(".parquet")] + ".tar"
            reasons = pc.fill_null(reasons, f"img2dataset: missing image ({tar_name} not found)")
        failed = pc.is_valid(reasons)
        meta = meta.filter(failed)
        if not meta.num_rows:
            return
        n = meta.num_rows
        ids = pc.cast(meta.column("key"), pa.string())
        columns = {"id": ids, "images": empty_images(n)}
        for name in ("caption", "url", "license"):
            columns[name] = (
                pc.cast(meta.column(name), pa.string())
                if name in meta.column_names
                else pa.nulls(n, pa.string())
            )
        for field in SIZE_FIELDS:
            col = (
                meta.column(field.name)
                if field.name in meta.column_names
                else pa.nulls(n, field.type)
            )
            columns[field.name] = pc.cast(col, field.type)
        columns[REJECT_COLUMN] = reasons.filter(failed)
        table = fill_missing_ids(pa.table(columns))
        for start in range(0, table.num_rows, self.batch_size):
            yield self._finish(table.slice(start, self.batch_size), path)

    def _read_tar(self, path: str) -> Iterator[pa.Table]:
        fs = self.location.fs
        rows: list[dict] = []
        with fs.open_input_stream(path) as raw:
            try:
                archive = tarfile.open(fileobj=raw, mode="r|*")
            except tarfile.TarError as exc:
                raise InputError(
                    f"{self.format}: {file_uri(fs, path)}: not a tar file ({exc})"
                ) from exc
            read = 0
            with archive:
                try:
                    for key, files in _samples(archive):
                        rows.append(_tar_row(key, files))
                        read += 1
                        if len(rows) >= self.batch_size:
                            yield self._tar_table(rows, path)
                            rows = []
                except (tarfile.TarError, OSError, EOFError) as exc:
                    # A tar cut short (an interrupted download or copy): the samples before the
                    # break are rows, the break one rejected row; the sample being read when it
                    # broke is part of that row, never a half-read kept row.
                    name = path.rsplit("/", 1)[-1]
                    rows.append(
                        {
                            "id": content_id(path, "unreadable", str(read)),
                            "images": [],
                            REJECT_COLUMN: (
                                f"{self.format}: unreadable tar ({name} after {read} samples: "
                                f"{exc}; the samples after it are not read)"
                            ),
                        }
                    )
        if rows:
            yield self._tar_table(rows, path)

    def _tar_table(self, rows: list[dict], path: str) -> pa.Table:
        table = table_from_rows(rows, SIZE_FIELDS, path.rsplit("/", 1)[-1], self.format)
        return self._finish(table, path)


def _column(table: pa.Table, name: str) -> pa.Array | None:
    return table.column(name).combine_chunks() if name in table.column_names else None


def _mapping(image_col: str | None) -> ColumnMapping:
    columns = {"id": "key"} if image_col is None else {"id": "key", "images": image_col}
    return ColumnMapping(Img2DatasetReader.format, columns, drop=DROPPED_COLUMNS, auto_images=False)


def _image_column(schema: pa.Schema) -> str | None:
    return next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)


def _samples(archive: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset grouping: consecutive members sharing the name up to the first dot of the file name."""
    key: str | None = None
    files: dict[str, bytes] = {}
    for member in archive:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        member_key = f"{folder}/{stem}" if folder else stem
        # a sample is complete when the next one starts: hand it out before reading on, so a tar
        # cut short loses only the sample it broke in
        if member_key != key:
            if key is not None:
                yield key, files
            key, files = member_key, {}
        handle = archive.extractfile(member)
        files[ext.lower()] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, files


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tar_row(key: str, files: dict[str, bytes]) -> dict:
    """One sample of a tar as a row; a missing image or unreadable text becomes a rejection."""
    row: dict[str, Any] = {"id": key, "images": [], "_record": f"sample {key}"}
    reject = None
    meta: dict = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            meta = {}
            reject = f"img2dataset: bad metadata ({key}.json: {exc})"
    for name in ("url", "caption", "license"):
        if isinstance(meta.get(name), str):
            row[name] = meta[name]
    for name in ("width", "height", "original_width", "original_height"):
        row[name] = _int(meta.get(name))
    if "txt" in files:
        try:
            row["caption"] = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            reject = reject or f"img2dataset: caption not UTF-8 ({key}.txt)"
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        reject = reject or f"img2dataset: missing image ({key})"
    else:
        row["images"] = [{"bytes": files[ext], "path": f"{key}.{ext}"}]
    row[REJECT_COLUMN] = reject
    return row
