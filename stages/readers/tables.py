"""What every reader shares on the way out: content-derived ids, tables built from Python rows,
the input files a reader lists, and `finish`, which every reader's tables pass through (record
checks, conversation rules, the canonical schema).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from warren.stages.readers.base import InputError
from warren.stages.readers.records import (
    apply_conversation_rules,
    describe_error,
    first_bad_text,
    reject_invalid_utf8,
    replace_bad_text,
)
from warren.stages.schema import (
    CORE_FIELDS,
    REJECT_COLUMN,
    SchemaError,
    conform,
    content_id,
)
from warren.stages.shards import Location, list_files


def row_content_id(
    images: Sequence[Mapping[str, Any]] | None, caption: str | None, conversations: Any = None
) -> str:
    """The content-derived id of a row without one: `content_id(*image bytes, caption)`.

    An image without bytes contributes its path; conversations (when present) are appended as JSON,
    so text-only conversation rows do not all share one id.
    """
    parts: list[bytes | str | None] = []
    for image in images or []:
        data = image.get("bytes") if image else None
        parts.append(data if data is not None else (image or {}).get("path"))
    parts.append(caption)
    if conversations:
        turns = [[t.get("from"), t.get("value")] for t in conversations]
        parts.append(json.dumps(turns, ensure_ascii=False, separators=(",", ":")))
    return content_id(*parts)


def table_from_rows(
    rows: Sequence[Mapping[str, Any]],
    extra_fields: Sequence[pa.Field] = (),
    where: str | None = None,
    reader: str = "ingest",
) -> pa.Table:
    """A table with the core columns, `extra_fields` and `_reject`, in that order (per-row readers).

    A row whose values cannot take their column's type (text that is not UTF-8, a list where a
    string belongs) becomes a rejected row with its id and a reason naming it, `<reader>: bad
    record (<where> <its "_record" label, or "row N">: ...)`; the other rows are unaffected. Keys
    not in the table (such as `_record`) are ignored.
    """
    fields = [*CORE_FIELDS, *extra_fields, pa.field(REJECT_COLUMN, pa.string())]
    schema = pa.schema(fields)
    try:
        return _rows_table(rows, schema)
    except (pa.ArrowException, UnicodeError, TypeError, ValueError):
        pass
    safe = []
    for i, row in enumerate(rows):
        try:
            _rows_table([row], schema)
            safe.append(row)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError) as exc:
            label = row.get("_record") or f"row {i + 1}"
            label = f"{where} {label}" if where else label
            reason = f"{reader}: bad record ({label}: {describe_error(exc)})"
            # Keep what can be read: text with U+FFFD for a lone surrogate, when that is all.
            fixed = {k: replace_bad_text(v) for k, v in row.items()}
            fixed[REJECT_COLUMN] = row.get(REJECT_COLUMN) or reason
            try:
                _rows_table([fixed], schema)
            except (pa.ArrowException, UnicodeError, TypeError, ValueError):
                row_id = row.get("id")
                if not isinstance(row_id, str) or first_bad_text(row_id) is not None:
                    row_id = content_id(repr(sorted(row.items(), key=lambda kv: kv[0])))
                fixed = {"id": row_id, "images": [], REJECT_COLUMN: reason}
            safe.append(fixed)
    return _rows_table(safe, schema)


def _rows_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def finish(
    table: pa.Table,
    source: str,
    override_source: bool,
    where: str,
    reader: str = "ingest",
    first_row: int = 0,
) -> pa.Table:
    """Set `source`, apply the conversation rules, make sure `edits` and `_reject` exist (`_reject`
    last), and conform to the canonical schema.

    An existing non-null `source` value is kept unless the user gave the `source` option. The
    conversation rules (`stages.conversation`) normalise every row's turns, record each edit in
    `edits` and reject an invalid conversation with `<reader>: <reason>`. Text that is not valid
    UTF-8 (Parquet does not check it) rejects its row, naming `where` and the row (counted from
    1, `first_row` being the number of rows of the file before this table).
    """
    n = table.num_rows
    default = pa.array([source] * n, type=pa.string())
    if "source" in table.column_names:
        i = table.column_names.index("source")
        values = default
        if not override_source:
            values = pc.coalesce(table.column(i).cast(pa.string()), default)
        table = table.set_column(i, pa.field("source", pa.string()), values)
    else:
        table = table.append_column(pa.field("source", pa.string()), default)
    if REJECT_COLUMN in table.column_names:
        reasons = table.column(REJECT_COLUMN).cast(pa.string())
        table = table.drop_columns([REJECT_COLUMN])
    else:
        reasons = pa.nulls(n, pa.string())
    table = table.append_column(pa.field(REJECT_COLUMN, pa.string()), reasons)
    try:
        table = conform(table, where)
    except SchemaError as exc:
        raise InputError(str(exc)) from exc
    table = reject_invalid_utf8(table, reader, where, first_row)
    table = apply_conversation_rules(table, reader)
    # One schema for every reader and batch: `id` is declared non-null as in CORE_SCHEMA.
    i = table.schema.get_field_index("id")
    return table.cast(table.schema.set(i, pa.field("id", pa.string(), nullable=False)))


def fill_missing_ids(table: pa.Table) -> pa.Table:
    """Give rows without an id (no `id` column, or null ids) their content-derived id."""
    n = table.num_rows
    if "id" in table.column_names:
        ids = table.column("id").cast(pa.string())
        missing = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))
    else:
        ids = pa.nulls(n, pa.string())
        missing = np.arange(n)
    if len(missing):
        sub = table.take(pa.array(missing, type=pa.int64()))
        images = (
            sub.column("images").to_pylist()
            if "images" in sub.column_names
            else [None] * len(missing)
        )
        captions = (
            sub.column("caption").to_pylist()
            if "caption" in sub.column_names
            else [None] * len(missing)
        )
        convs = (
            sub.column("conversations").to_pylist()
            if "conversations" in sub.column_names
            else [None] * len(missing)
        )
        filled = ids.to_pylist()
        for j, i in enumerate(missing):
            filled[i] = row_content_id(images[j], captions[j], convs[j])
        ids = pa.array(filled, type=pa.string())
    if "id" in table.column_names:
        return table.set_column(table.column_names.index("id"), pa.field("id", pa.string()), ids)
    return table.append_column(pa.field("id", pa.string()), ids)


def file_uri(fs: pafs.FileSystem, path: str) -> str:
    return Location(fs, path).uri


def relative_key(root: Location, path: str) -> str:
    """A unit key stable across runs: the path relative to the input (the file name for a file)."""
    root_path = root.path.rstrip("/")
    if path.startswith(root_path + "/"):
        return path[len(root_path) + 1 :]
    return path.rsplit("/", 1)[-1]


def list_input_files(
    reader: str, location: Location, suffixes: tuple[str, ...] | None, what: str
) -> list[pafs.FileInfo]:
    """Files of the input (a file is itself, whatever its name); InputError if there are none."""
    try:
        files = list_files(location, suffixes)
    except FileNotFoundError as exc:
        raise InputError(f"{reader}: {location.uri}: no such file or directory") from exc
    except OSError as exc:
        raise InputError(f"{reader}: {location.uri}: cannot list ({exc})") from exc
    if not files:
        raise InputError(f"{reader}: {location.uri}: no {what} found")
    return files


def open_parquet_schema(reader: str, fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    """Read a Parquet footer: (Arrow schema, row count); InputError naming the file if unreadable."""
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputError(
            f"{reader}: {file_uri(fs, path)}: not a readable Parquet file ({exc})"
        ) from exc
