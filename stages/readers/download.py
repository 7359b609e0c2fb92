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
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told
# not to: set before any import of img2dataset, here and (inherited) in every Ray worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from warren.stages.base import stable_hash
from warren.stages.readers.base import InputError, Reader, ReadUnit, positive_int_option
from warren.stages.readers.columns import (
    file_uri,
    list_input_files,
)
from warren.stages.readers.img2dataset import Img2DatasetReader
from warren.stages.readers.img2dataset_job import (
    DEFAULT_ROWS_PER_SHARD,
    DOWNLOADS,
    IMG2DATASET_DEFAULTS,
    IMG2DATASET_RESERVED,
    SHARD,
    URL_LIST,
    download_reasons,
    error_types,
    feather_bytes,
    img2dataset_params,
    run_img2dataset,
    shard_complete,
    url_list,
)
from warren.stages.readers.url_tables import (
    CAPTION_COLUMNS,
    TABLE_KINDS,
    URL_COLUMNS,
    is_url_table,
    iter_table,
    table_kind,
    table_schema,
)
from warren.stages.schema import content_id
from warren.stages.shards import Location


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
        self.params = img2dataset_params(self.format, options)
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
                shard = url_list(chunk, url_col, caption_col, extras)
                data = feather_bytes(shard)
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


# Re-exported: the readers' registry and the tests import these from here.
__all__ = [
    "TABLE_KINDS",
    "DownloadReader",
    "error_types",
    "is_url_table",
    "shard_complete",
]
