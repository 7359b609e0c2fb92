"""URL tables, the input of the `download` reader: which files are URL tables (Parquet, CSV, TSV,
JSON lines with a URL column and no image or conversation data), their schema, and their rows in
batches."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from warren.stages.readers.columns import (
    is_binary_like,
    looks_like_images,
)

TABLE_KINDS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")
# Columns that make a table a dataset of its own (canonical rows, LLaVA JSON), not a URL table.
_CONVERSATION_KEYS = ("conversations", "messages", "image", "images")


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
        return pacsv.open_csv(f, parse_options=csv_parse(kind)).schema


def csv_parse(kind: str) -> pacsv.ParseOptions:
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
            reader = pacsv.open_csv(f, parse_options=csv_parse(kind), convert_options=convert)
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
