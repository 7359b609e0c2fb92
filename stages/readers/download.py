"""Reader `download`: a URL + caption table (LAION, DataComp, CC3M, COYO) fetched with img2dataset.

The download is the ingest: any recipe takes a URL table and continues in the same run,

    python pipelines/bunny_pretrain.py --input laion_part.parquet \\
        --input-option url_col='"URL"' --input-option caption_col='"TEXT"' --input-option image_size=384

Input: Parquet, CSV, TSV or JSON-lines files (`.parquet`, `.csv`, `.tsv`, `.jsonl`, `.json` with one
object per line), one file or a folder of them.

Units. `plan()` (on the driver) cuts every input file into chunks of `rows_per_shard` rows and writes
each chunk, once, as img2dataset's own shard input (`urls.feather`) in a unit folder of the
downloads cache. `read(unit)` (one Ray task per unit, through the runner's ingest) runs one
img2dataset shard job for the chunk in the task's process: img2dataset's `Downloader` with its
`Resizer` and `ParquetSampleWriter`, `thread_count` threads, which writes `00000.parquet` (image
bytes and metadata, failed samples included) and `00000_stats.json`; then the rows are converted
with `Img2DatasetReader`'s Parquet conversion. We bypass img2dataset's `download()` entry point
and its multiprocessing/pyspark/ray distributors on purpose: `download()` spawns a logger process
and a process pool per call, each re-importing img2dataset (3.5 s on a small machine, and nested
pools inside Ray workers), while warren's ingest already gives one task per unit, resume unit by
unit and the rejected-row ledger. img2dataset still does every fetch, resize, filter and write.

Resume. A unit folder is complete when img2dataset's `00000_stats.json` (its own incremental-mode
marker, written last) and `00000.parquet` are both there; a complete unit is converted without a
single request, an incomplete one is cleared and fetched again. Unit folders are named by the
chunk's content hash under a folder named by the hash of the img2dataset options, so a changed
input or a changed `image_size` never reuses stale images. The cache lives outside the ingest
folder and survives it being recomputed (`--from ingest` re-converts from the cache, fetching only
what is missing).

Rows. Rows in = URLs asked for. Each downloaded image is a kept row (`images` = the encoded image,
`url`, `caption`, `width`/`height` after resizing, `original_width`/`original_height`, `sha256`
of the downloaded bytes, and every extra column). Each failed URL is a rejected row with reason
`download: <error type> (<url>: <img2dataset's error message>)`; the funnel groups reasons by the
text before " (", so it shows the top error types, and the ingest line's kept share is the
download success rate. Error types: `http <code>`, `timeout`, `connection error`, `ssl error`,
`bad url`, `opt-out header` (X-Robots-Tag), `decode error` (a body OpenCV cannot decode: HTML, a
truncated JPEG; img2dataset does not keep the body, so the two cannot be told apart), `too small`,
`too large`, `aspect ratio`, `hash mismatch`, `other`.

Ids: the `id_col` column when given (e.g. DataComp's `uid`), else a url-derived content id,
`content_id(url, caption)`: stable across re-runs, shard layouts and `rows_per_shard`, and the same
sample in two pools gets the same id. (img2dataset's own key is shard + index, which repeats across
units and changes with `rows_per_shard`.)

Options (img2dataset's name and default unless said otherwise):

- `url_col`: URL column (default: `url`, else `URL`);
- `caption_col`: caption column (default: the first of `caption`, `TEXT`, `text` present; none ->
  null captions); `id_col`: id column, also kept under its own name (default: `id` if present,
  else url-derived ids);
- `save_additional_columns`: extra columns kept on the rows (default: every other column, except
  the names img2dataset reserves for itself: key, status, error_message, width, height,
  original_width, original_height, exif, md5, sha256, sha512);
- `image_size` (256), `resize_mode` (`border`; `no`, `keep_ratio`, `keep_ratio_largest`,
  `center_crop`), `resize_only_if_bigger` (false), `upscale_interpolation` (`lanczos`),
  `downscale_interpolation` (`area`), `min_image_size` (0), `max_image_area` (null = no limit,
  img2dataset's inf), `max_aspect_ratio` (null = no limit), `encode_format` (`jpg`; `png`,
  `webp`), `encode_quality` (95), `skip_reencode` (false), `disable_all_reencoding` (false);
- `retries` (0), `timeout` (10 s), `thread_count` (warren: 64 per unit; img2dataset: 256 per
  process), `user_agent_token` (null), `disallowed_header_directives` (img2dataset's: noai,
  noimageai, noindex, noimageindex; `[]` fetches opted-out images too), `compute_hash` (`sha256`);
- `rows_per_shard` (warren: 10,000; img2dataset's `number_sample_per_shard`): URLs per unit;
- `downloads`: the cache folder (default: `OUTPUT/_downloads` when the runner binds its output
  with `bind_output`, else `_downloads` next to the input file, or inside the input folder, where
  the readers' listing skips it);
- `source` (default: the input file or folder name), `batch_size` (rows per yielded table, 256).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told
# not to: set before any import of img2dataset, here and (inherited) in every Ray worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from warren.stages.base import stable_hash
from warren.stages.readers.base import InputError, Reader, ReadUnit, positive_int_option
from warren.stages.readers.columns import (
    file_uri,
    is_binary_like,
    list_input_files,
    looks_like_images,
)
from warren.stages.readers.img2dataset import Img2DatasetReader
from warren.stages.schema import content_id
from warren.stages.shards import Location

TABLE_KINDS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")
# Columns that make a table a dataset of its own (canonical rows, LLaVA JSON), not a URL table.
_CONVERSATION_KEYS = ("conversations", "messages", "image", "images")
# Names img2dataset writes itself (its arguments_validator refuses them as additional columns).
IMG2DATASET_RESERVED = (
    "key",
    "caption",
    "url",
    "width",
    "height",
    "original_width",
    "original_height",
    "status",
    "error_message",
    "exif",
    "md5",
    "sha256",
    "sha512",
)
URL_LIST = "urls.feather"
JOB_INPUT = "_job_input.feather"
SHARD = "00000"  # a unit is exactly one img2dataset shard (shard id 0, oom_shard_count 5)
DOWNLOADS = "_downloads"

# img2dataset's parameters exposed as options, with its defaults (thread_count: see the docstring).
IMG2DATASET_DEFAULTS: dict[str, Any] = {
    "image_size": 256,
    "resize_mode": "border",
    "resize_only_if_bigger": False,
    "upscale_interpolation": "lanczos",
    "downscale_interpolation": "area",
    "min_image_size": 0,
    "max_image_area": None,
    "max_aspect_ratio": None,
    "encode_format": "jpg",
    "encode_quality": 95,
    "skip_reencode": False,
    "disable_all_reencoding": False,
    "retries": 0,
    "timeout": 10,
    "thread_count": 64,
    "user_agent_token": None,
    "disallowed_header_directives": ["noai", "noimageai", "noindex", "noimageindex"],
    "compute_hash": "sha256",
}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
DEFAULT_ROWS_PER_SHARD = 10_000

# img2dataset error message -> error type, first match wins (vectorised with Arrow regexes).
ERROR_TYPES: tuple[tuple[str, str], ...] = (
    (r"X-Robots-Tag", "opt-out header"),
    (r"(?i)timed? ?out", "timeout"),
    (r"(?i)\bssl\b|certificate", "ssl error"),
    (r"(?i)unknown url type|no host given|invalid url|url can't contain", "bad url"),
    (
        r"(?i)connection|errno|name or service|nodename|remote end closed|"
        r"incompleteread|network is unreachable|no route to host|temporary failure",
        "connection error",
    ),
    (r"Image decoding error|cannot identify image", "decode error"),
    (r"image too small", "too small"),
    (r"image area too large", "too large"),
    (r"aspect ratio too large", "aspect ratio"),
    (r"hash mismatch", "hash mismatch"),
)
_HTTP_CODE = r"HTTP Error (?P<code>\d{3})"


def error_types(messages: pa.Array) -> pa.Array:
    """A short, normalised category per img2dataset error message (null stays null)."""
    messages = pc.cast(messages, pa.string())
    out = pa.nulls(len(messages), pa.string())
    code = pc.struct_field(pc.extract_regex(messages, _HTTP_CODE), "code")
    out = pc.if_else(pc.is_valid(code), pc.binary_join_element_wise("http ", code, ""), out)
    for pattern, category in ERROR_TYPES:
        hit = pc.fill_null(pc.match_substring_regex(messages, pattern), False)
        out = pc.if_else(pc.and_(hit, pc.is_null(out)), category, out)
    return pc.if_else(pc.is_valid(messages), pc.fill_null(out, "other"), out)


def download_reasons(status: pa.Array, error_message: pa.Array | None, url: pa.Array) -> pa.Array:
    """`download: <error type> (<url>: <error message>)` where status != "success", else null."""
    status = pc.cast(status, pa.string())
    message = status if error_message is None else pc.coalesce(error_message, status)
    message = pc.fill_null(pc.cast(message, pa.string()), "unknown error")
    kinds = error_types(message)
    url = pc.fill_null(pc.cast(url, pa.string()), "")
    reasons = pc.binary_join_element_wise("download: ", kinds, " (", url, ": ", message, ")", "")
    failed = pc.fill_null(pc.not_equal(status, "success"), True)
    return pc.if_else(failed, reasons, pa.scalar(None, pa.string()))


# ------------------------------------------------------------------------------------------------
# URL tables: kind, header, batches


def table_kind(fs: pafs.FileSystem, path: str) -> str | None:
    """parquet, csv, tsv or jsonl by suffix; a `.json` file counts when it is JSON lines."""
    name = path.lower()
    for suffix, kind in TABLE_KINDS.items():
        if name.endswith(suffix):
            return kind
    if name.endswith(".json") and _first_json_line(fs, path) is not None:
        return "jsonl"
    return None


def _first_json_line(fs: pafs.FileSystem, path: str) -> dict | None:
    """The first line of a file as a JSON object, or None (a JSON array file, an empty file)."""
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 20)
    except OSError:
        return None
    line = head.split(b"\n", 1)[0].strip()
    if not line.startswith(b"{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def table_schema(fs: pafs.FileSystem, path: str, kind: str) -> pa.Schema:
    """The columns of a URL table, from the footer or the first block."""
    if kind == "parquet":
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow
    if kind == "jsonl":
        first = _first_json_line(fs, path)
        if first is None:
            raise ValueError("the first line is not a JSON object")
        return pa.schema([pa.field(k, pa.string()) for k in first])
    with fs.open_input_stream(path) as f:
        return pacsv.open_csv(f, parse_options=_csv_parse(kind)).schema


def _csv_parse(kind: str) -> pacsv.ParseOptions:
    # As img2dataset reads them: a header line, double-quote quoting.
    return pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")


def iter_table(
    fs: pafs.FileSystem, path: str, kind: str, strings: tuple[str, ...]
) -> Iterator[pa.Table]:
    """The file as tables, streamed (Parquet batches, CSV blocks, JSON-lines blocks)."""
    if kind == "parquet":
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                yield pa.Table.from_batches([batch])
        return
    with fs.open_input_stream(path) as f:
        if kind == "jsonl":
            reader = pajson.open_json(f)
        else:
            # URL and caption are text even when a block looks numeric (a caption "1984").
            convert = pacsv.ConvertOptions(column_types=dict.fromkeys(strings, pa.string()))
            reader = pacsv.open_csv(f, parse_options=_csv_parse(kind), convert_options=convert)
        for batch in reader:
            yield pa.Table.from_batches([batch])


def is_url_table(fs: pafs.FileSystem, path: str) -> bool:
    """A table file with a url column (`url`/`URL`), no image column and no img2dataset status:
    what `detect_format` hands to the download reader."""
    kind = table_kind(fs, path)
    if kind is None:
        return False
    try:
        schema = table_schema(fs, path, kind)
    except (OSError, ValueError, pa.ArrowException):
        return False
    names = schema.names
    if not any(c in names for c in URL_COLUMNS):
        return False
    if "key" in names and "status" in names:  # img2dataset's own output
        return False
    if any(c in names for c in _CONVERSATION_KEYS):  # rows that already have their data
        return False
    return not any(is_binary_like(f.type) or looks_like_images(f.type) for f in schema)


# ------------------------------------------------------------------------------------------------
# The reader


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "input"


class DownloadReader(Reader):
    """URL + caption tables, downloaded with img2dataset (one img2dataset shard job per unit)."""

    format = "download"
    OPTIONS = (
        "source",
        "batch_size",
        "url_col",
        "caption_col",
        "id_col",
        "save_additional_columns",
        "rows_per_shard",
        "downloads",
        *IMG2DATASET_DEFAULTS,
    )
    DEFAULT_BATCH_SIZE = 256

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        if "source" not in options:
            name = self.location.path.rstrip("/").rsplit("/", 1)[-1]
            stem, ext = posixpath.splitext(name)
            self.source = stem if ext.lower() in (*TABLE_KINDS, ".json") else name
        self.rows_per_shard = positive_int_option(
            self.format, options, "rows_per_shard", DEFAULT_ROWS_PER_SHARD
        )
        self.params = _img2dataset_params(self.format, options)
        for name in ("url_col", "caption_col", "id_col", "downloads"):
            value = options.get(name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"{self.format}: option {name} must be a string, got {value!r}")
        extras = options.get("save_additional_columns")
        if extras is not None and (
            not isinstance(extras, list) or not all(isinstance(c, str) for c in extras)
        ):
            raise InputError(
                f"{self.format}: option save_additional_columns must be a list of column names"
            )
        self._output: Location | None = None

    def bind_output(self, output: Location) -> None:
        """Put the default downloads cache under the run's output (`OUTPUT/_downloads`)."""
        self._output = output

    @property
    def downloads(self) -> Location:
        if self.options.get("downloads"):
            return Location.of(self.options["downloads"])
        if self._output is not None:
            return self._output.join(DOWNLOADS)
        info = self.location.fs.get_file_info(self.location.path)
        if info.type == pafs.FileType.Directory:
            return self.location.join(DOWNLOADS)
        return Location(self.location.fs, posixpath.dirname(self.location.path)).join(DOWNLOADS)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "img2dataset": self.params}

    # ---------------------------------------------------------------- plan

    def plan(self) -> list[ReadUnit]:
        fs = self.location.fs
        files = [
            f
            for f in list_input_files(
                self.format,
                self.location,
                (*TABLE_KINDS, ".json"),
                ".parquet, .csv, .tsv or .jsonl URL tables",
            )
            if table_kind(fs, f.path) is not None
        ]
        if not files:
            raise InputError(f"{self.format}: {self.location.uri}: no URL table files found")
        # img2dataset's options name the cache folder: other options never reuse these images.
        root = self.downloads.join(stable_hash(self.params)[:12])
        units = []
        for info in files:
            units.extend(self._plan_file(info.path, root))
        return units

    def _columns(self, schema: pa.Schema, where: str) -> tuple[str, str | None, str | None, list]:
        names = schema.names
        url_col = self.options.get("url_col") or next((c for c in URL_COLUMNS if c in names), None)
        if url_col is None or url_col not in names:
            raise InputError(
                f"{self.format}: {where}: no URL column "
                f"({url_col or ' or '.join(URL_COLUMNS)}); columns are {names}; "
                "name it with --input-option url_col=..."
            )
        caption_col = self.options.get("caption_col")
        if caption_col is None:
            caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        elif caption_col not in names:
            raise InputError(
                f"{self.format}: {where}: caption column '{caption_col}' not found; columns are {names}"
            )
        id_col = self.options.get("id_col")
        if id_col is None:
            id_col = "id" if "id" in names else None
        elif id_col not in names:
            raise InputError(
                f"{self.format}: {where}: id column '{id_col}' not found; columns are {names}"
            )
        used = {url_col, caption_col, id_col}
        extras = self.options.get("save_additional_columns")
        if extras is None:
            extras = [c for c in names if c not in used and c not in IMG2DATASET_RESERVED]
        else:
            missing = [c for c in extras if c not in names]
            reserved = [c for c in extras if c in IMG2DATASET_RESERVED]
            if missing or reserved:
                raise InputError(
                    f"{self.format}: {where}: save_additional_columns: "
                    + (f"{missing} not found (columns are {names})" if missing else "")
                    + (f"{reserved} are img2dataset's own columns" if reserved else "")
                )
            extras = [c for c in extras if c not in used]
        if id_col is not None:
            extras = [*extras, id_col]
        return url_col, caption_col, id_col, extras

    def _plan_file(self, path: str, root: Location) -> list[ReadUnit]:
        fs = self.location.fs
        where = file_uri(fs, path)
        kind = table_kind(fs, path) or "parquet"
        try:
            schema = table_schema(fs, path, kind)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InputError(
                f"{self.format}: {where}: not a readable {kind} table ({exc})"
            ) from exc
        url_col, caption_col, id_col, extras = self._columns(schema, where)
        rel = path[len(self.location.path) :].lstrip("/") or path.rsplit("/", 1)[-1]
        stem = _safe_name(posixpath.splitext(rel)[0])
        units = []
        strings = tuple(c for c in (url_col, caption_col, id_col) if c)
        try:
            for index, chunk in enumerate(self._chunks(fs, path, kind, strings)):
                shard = _url_list(chunk, url_col, caption_col, extras)
                data = _feather_bytes(shard)
                folder = root.join(f"{stem}-{index:05d}-{hashlib.sha1(data).hexdigest()[:12]}")
                if not folder.join(URL_LIST).exists():
                    folder.mkdir()
                    folder.join(URL_LIST).write_bytes_atomic(data)
                units.append(
                    ReadUnit(
                        key=f"{rel}#{index:05d}",
                        path=folder.path,
                        options={
                            "rows": shard.num_rows,
                            "caption": caption_col is not None,
                            "id_col": id_col,
                            "columns": shard.column_names,
                        },
                    )
                )
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self.format}: {where}: cannot read ({exc})") from exc
        return units

    def _chunks(
        self, fs: pafs.FileSystem, path: str, kind: str, strings: tuple[str, ...]
    ) -> Iterator[pa.Table]:
        """The file in tables of exactly `rows_per_shard` rows (the last one shorter)."""
        pending: list[pa.Table] = []
        count = 0
        for table in iter_table(fs, path, kind, strings):
            pending.append(table)
            count += table.num_rows
            while count >= self.rows_per_shard:
                joined = pa.concat_tables(pending, promote_options="permissive")
                yield joined.slice(0, self.rows_per_shard)
                rest = joined.slice(self.rows_per_shard)
                pending, count = [rest], rest.num_rows
        if count:
            yield pa.concat_tables(pending, promote_options="permissive")

    # ---------------------------------------------------------------- read

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        folder = Location(self.downloads.fs, unit.path)
        if not shard_complete(folder):
            run_img2dataset(folder, self.params, unit.options, self.rows_per_shard)
        yield from self.convert(unit)

    def convert(self, unit: ReadUnit) -> Iterator[pa.Table]:
        """The unit's downloaded img2dataset shard as canonical rows (no network)."""
        folder = Location(self.downloads.fs, unit.path)
        # Only the user's `source` option overrides a `source` column of the table; the default
        # (the input's name) fills the rows without one.
        given = {"source": self.source} if "source" in self.options else {}
        converter = _ShardConverter(
            folder.uri, unit.options.get("id_col"), batch_size=self.batch_size, **given
        )
        converter.source = self.source
        yield from converter._read_parquet(folder.join(f"{SHARD}.parquet").path)


class _ShardConverter(Img2DatasetReader):
    """Img2DatasetReader's Parquet conversion with url-derived ids and typed failure reasons."""

    def __init__(self, uri: str, id_col: str | None, **options: Any) -> None:
        super().__init__(uri, **options)
        self.id_col = id_col

    def _prepare(self, raw: pa.Table) -> pa.Table:
        urls = raw.column("url").to_pylist()
        captions = (
            raw.column("caption").to_pylist()
            if "caption" in raw.column_names
            else [None] * raw.num_rows
        )
        ids = pa.array([content_id(u, c) for u, c in zip(urls, captions, strict=True)], pa.string())
        if self.id_col is not None and self.id_col in raw.column_names:
            given = pc.cast(raw.column(self.id_col), pa.string())
            ids = pc.coalesce(given, ids)
        return raw.set_column(raw.column_names.index("key"), "key", ids)

    def _failure_reasons(self, raw: pa.Table) -> pa.Array:
        message = (
            raw.column("error_message").combine_chunks()
            if "error_message" in raw.column_names
            else None
        )
        return download_reasons(
            raw.column("status").combine_chunks(), message, raw.column("url").combine_chunks()
        )


def _url_list(
    chunk: pa.Table, url_col: str, caption_col: str | None, extras: list[str]
) -> pa.Table:
    """img2dataset's shard input: the extra columns, then `caption`, then `url` (its column_list)."""
    columns = {c: chunk.column(c) for c in extras}
    if caption_col is not None:
        columns["caption"] = pc.cast(chunk.column(caption_col), pa.string())
    columns["url"] = pc.cast(chunk.column(url_col), pa.string())
    return pa.table(columns).combine_chunks()


def _feather_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def shard_complete(folder: Location) -> bool:
    """img2dataset wrote the shard's stats last (its incremental mode's marker) and the shard."""
    return folder.join(f"{SHARD}_stats.json").exists() and folder.join(f"{SHARD}.parquet").exists()


def run_img2dataset(
    folder: Location, params: Mapping[str, Any], unit: Mapping[str, Any], rows_per_shard: int
) -> None:
    """One img2dataset shard job in this process: fetch, resize, filter and write the unit."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    for name in (f"{SHARD}.parquet", f"{SHARD}_stats.json"):
        target = folder.join(name)
        if target.exists():
            folder.fs.delete_file(target.path)
    inf = float("inf")
    resizer = Resizer(
        image_size=params["image_size"],
        resize_mode=params["resize_mode"],
        resize_only_if_bigger=params["resize_only_if_bigger"],
        upscale_interpolation=params["upscale_interpolation"],
        downscale_interpolation=params["downscale_interpolation"],
        encode_quality=params["encode_quality"],
        encode_format=params["encode_format"],
        skip_reencode=params["skip_reencode"],
        disable_all_reencoding=params["disable_all_reencoding"],
        min_image_size=params["min_image_size"],
        max_image_area=inf if params["max_image_area"] is None else params["max_image_area"],
        max_aspect_ratio=inf if params["max_aspect_ratio"] is None else params["max_aspect_ratio"],
        blurrer=None,
    )
    directives = params["disallowed_header_directives"]
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=params["thread_count"],
        save_caption=bool(unit.get("caption")),
        # EXIF JSON would ride on every downstream shard, and no stage reads it.
        extract_exif=False,
        output_folder=folder.uri,
        column_list=list(unit["columns"]),
        timeout=params["timeout"],
        number_sample_per_shard=rows_per_shard,
        oom_shard_count=5,
        compute_hash=params["compute_hash"],
        verify_hash_type=None,
        encode_format=params["encode_format"],
        retries=params["retries"],
        user_agent_token=params["user_agent_token"],
        disallowed_header_directives=directives or None,
    )
    # img2dataset deletes its shard input when the shard is done (it is a temporary file in its
    # own runs); give it a copy, so the unit can be fetched again after its output is deleted.
    job_input = folder.join(JOB_INPUT)
    job_input.write_bytes_atomic(folder.join(URL_LIST).read_bytes())
    # download_shard, not __call__: __call__ prints and swallows the error; we want the task to
    # fail with it (the ingest then resumes at this unit).
    downloader.download_shard((0, job_input.uri))


def _img2dataset_params(reader: str, options: Mapping[str, Any]) -> dict[str, Any]:
    params = {k: options.get(k, v) for k, v in IMG2DATASET_DEFAULTS.items()}
    for name in ("image_size", "thread_count", "timeout"):
        params[name] = positive_int_option(reader, options, name, IMG2DATASET_DEFAULTS[name])
    for name in ("min_image_size", "retries", "encode_quality"):
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{reader}: option {name} must be an integer >= 0, got {value!r}")
    for name in ("max_image_area", "max_aspect_ratio"):
        value = params[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{reader}: option {name} must be a number or null, got {value!r}")
    for name in ("resize_only_if_bigger", "skip_reencode", "disable_all_reencoding"):
        if not isinstance(params[name], bool):
            raise InputError(f"{reader}: option {name} must be true or false")
    if params["resize_mode"] not in RESIZE_MODES:
        raise InputError(f"{reader}: option resize_mode must be one of {', '.join(RESIZE_MODES)}")
    if params["encode_format"] not in ENCODE_FORMATS:
        raise InputError(
            f"{reader}: option encode_format must be one of {', '.join(ENCODE_FORMATS)}"
        )
    if params["compute_hash"] not in (None, "md5", "sha256", "sha512"):
        raise InputError(f"{reader}: option compute_hash must be md5, sha256, sha512 or null")
    directives = params["disallowed_header_directives"]
    if not isinstance(directives, list) or not all(isinstance(d, str) for d in directives):
        raise InputError(f"{reader}: option disallowed_header_directives must be a list of strings")
    return params
