"""Arrow conversions into canonical columns, shared by the readers.

Images from binary columns, Hugging Face `Image` structs or lists of them; conversations from LLaVA
turns or role/content messages; content-derived ids; column mappings ({canonical: source}) checked
against a file's schema before any row is read; and `finish`, which every reader's tables pass
through on their way out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
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
    EMBEDDING_COLUMNS,
    IMAGE_MARKER,
    IMAGE_TYPE,
    KNOWN_TYPES,
    REJECT_COLUMN,
    TURN_TYPE,
    SchemaError,
    conform,
    content_id,
)
from warren.stages.shards import Location, list_files

IMAGES_LIST_TYPE = pa.list_(IMAGE_TYPE)
TURNS_LIST_TYPE = pa.list_(TURN_TYPE)
# role/content chat roles (TRL, OpenAI) to LLaVA `from` values: a translation between formats,
# not an edit; any other spelling is normalised (and recorded) by `stages.conversation`.
ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


# --------------------------------------------------------------------------------------------
# Options, source, ids, tables: shared by every reader
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Arrow conversions (vectorised; no per-row Python)
# --------------------------------------------------------------------------------------------


def _unwrap(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_string_like(t: pa.DataType) -> bool:
    t = _unwrap(t)
    return (
        pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
    )


def is_binary_like(t: pa.DataType) -> bool:
    t = _unwrap(t)
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _struct_names(t: pa.DataType) -> set[str]:
    return {t.field(i).name for i in range(t.num_fields)} if pa.types.is_struct(t) else set()


def is_image_struct(t: pa.DataType) -> bool:
    """A Hugging Face `Image` value: struct with a binary `bytes` field (and optionally `path`)."""
    names = _struct_names(t)
    if "bytes" not in names or not names <= {"bytes", "path"}:
        return False
    if not is_binary_like(t.field("bytes").type):
        return False
    return "path" not in names or is_string_like(t.field("path").type)


def is_image_list(t: pa.DataType) -> bool:
    return _is_list(t) and (is_image_struct(t.value_type) or is_binary_like(t.value_type))


def looks_like_images(t: pa.DataType) -> bool:
    """Auto-detection of an image column: an HF `Image` struct or a list of them (not bare binary)."""
    t = _unwrap(t)
    return is_image_struct(t) or (_is_list(t) and is_image_struct(t.value_type))


def is_turns_list(t: pa.DataType) -> bool:
    if not _is_list(t):
        return False
    v = t.value_type
    return _struct_names(v) >= {"from", "value"} and all(
        is_string_like(v.field(n).type) for n in ("from", "value")
    )


def _is_content_parts(t: pa.DataType) -> bool:
    """TRL multimodal content: list<struct<type: string, text: string, ...>>."""
    return (
        _is_list(t)
        and _struct_names(t.value_type) >= {"type", "text"}
        and is_string_like(t.value_type.field("type").type)
        and is_string_like(t.value_type.field("text").type)
    )


def is_messages_list(t: pa.DataType) -> bool:
    if not _is_list(t):
        return False
    v = t.value_type
    if not _struct_names(v) >= {"role", "content"} or not is_string_like(v.field("role").type):
        return False
    content = v.field("content").type
    return is_string_like(content) or _is_content_parts(content)


def _as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _to_string(arr: pa.Array) -> pa.Array:
    arr = _as_array(arr)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def _to_binary(arr: pa.Array) -> pa.Array:
    arr = _as_array(arr)
    return arr if arr.type == pa.binary() else arr.cast(pa.binary())


def _lists(
    lengths: np.ndarray,
    values: pa.Array,
    list_type: pa.DataType,
    null_mask: np.ndarray | None = None,
) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = (
        pa.array(null_mask, type=pa.bool_()) if null_mask is not None and null_mask.any() else None
    )
    return pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), values, type=list_type, mask=mask
    )


def _image_structs(data: pa.Array, paths: pa.Array | None) -> pa.StructArray:
    data = _to_binary(data)
    paths = pa.nulls(len(data), pa.string()) if paths is None else _to_string(paths)
    return pa.StructArray.from_arrays([data, paths], fields=list(IMAGE_TYPE))


def _valid(arr: pa.Array) -> np.ndarray:
    return arr.is_valid().to_numpy(zero_copy_only=False)


def empty_images(n: int) -> pa.Array:
    """`n` empty `images` lists (text-only rows, rejected rows without images)."""
    return _lists(
        np.zeros(n, dtype=np.int32),
        _image_structs(pa.array([], pa.binary()), None),
        IMAGES_LIST_TYPE,
    )


def images_from_binary(data: pa.Array, paths: pa.Array | None = None) -> pa.Array:
    """Binary image bytes -> one-element `images` lists ({bytes, path}); a null becomes []."""
    data = _as_array(data)
    valid = _valid(data)
    mask = pa.array(valid, type=pa.bool_())
    values = _image_structs(
        data.filter(mask), None if paths is None else _as_array(paths).filter(mask)
    )
    return _lists(valid.astype(np.int32), values, IMAGES_LIST_TYPE)


def images_from_struct(arr: pa.Array) -> pa.Array:
    """A Hugging Face `Image` struct column -> one-element `images` lists; null (or empty) -> []."""
    arr = _as_array(arr)
    data = pc.struct_field(arr, "bytes")
    paths = pc.struct_field(arr, "path") if "path" in _struct_names(arr.type) else None
    keep = _valid(data)
    if paths is not None:
        keep |= _valid(paths)
    mask = pa.array(keep, type=pa.bool_())
    values = _image_structs(data.filter(mask), None if paths is None else paths.filter(mask))
    return _lists(keep.astype(np.int32), values, IMAGES_LIST_TYPE)


def images_from_list(arr: pa.Array) -> pa.Array:
    """list<struct{bytes, path}> or list<binary> -> canonical `images`; a null list becomes []."""
    arr = _as_array(arr)
    lengths = (
        pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    )
    values = arr.flatten()
    if pa.types.is_struct(values.type):
        paths = pc.struct_field(values, "path") if "path" in _struct_names(values.type) else None
        structs = _image_structs(pc.struct_field(values, "bytes"), paths)
    else:
        structs = _image_structs(values, None)
    return _lists(lengths, structs, IMAGES_LIST_TYPE)


def _turn_lists(arr: pa.Array, froms: pa.Array, values: pa.Array) -> pa.Array:
    lengths = (
        pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    )
    turns = pa.StructArray.from_arrays(
        [_to_string(froms), _to_string(values)], fields=list(TURN_TYPE)
    )
    return _lists(lengths, turns, TURNS_LIST_TYPE, null_mask=~_valid(arr))


def conversations_from_turns(arr: pa.Array) -> pa.Array:
    """list<struct{from, value, ...}> -> canonical `conversations` (null stays null)."""
    arr = _as_array(arr)
    flat = arr.flatten()
    return _turn_lists(arr, pc.struct_field(flat, "from"), pc.struct_field(flat, "value"))


def roles_to_from(roles: pa.Array) -> pa.Array:
    """user -> human, assistant -> gpt, system -> system; other roles are kept as they are."""
    out = _to_string(roles)
    for role, name in ROLE_TO_FROM.items():
        out = pc.if_else(pc.equal(out, role), name, out)
    return out


def _join_content_parts(content: pa.Array) -> pa.Array:
    """TRL content parts -> one string: an image part becomes exactly `<image>`, and the parts are
    concatenated as they are (no separator), which inverts warren's hf export exactly: it splits a
    turn's text at its markers and keeps every character of the text parts, newlines included."""
    lengths = (
        pc.fill_null(pc.list_value_length(content), 0)
        .to_numpy(zero_copy_only=False)
        .astype(np.int32)
    )
    parts = content.flatten()
    kind = _to_string(pc.struct_field(parts, "type"))
    text = pc.fill_null(_to_string(pc.struct_field(parts, "text")), "")
    strings = pc.if_else(pc.equal(kind, "image"), IMAGE_MARKER, text)
    strings = pc.fill_null(strings, "")
    joined = pc.binary_join(
        _lists(lengths, strings, pa.list_(pa.string()), null_mask=~_valid(content)), ""
    )
    return _to_string(joined)


def conversations_from_messages(arr: pa.Array) -> pa.Array:
    """list<struct{role, content}> (content a string or TRL parts) -> canonical `conversations`."""
    arr = _as_array(arr)
    flat = arr.flatten()
    content = _as_array(pc.struct_field(flat, "content"))
    if not is_string_like(content.type):
        content = _join_content_parts(content)
    return _turn_lists(arr, roles_to_from(pc.struct_field(flat, "role")), content)


# --------------------------------------------------------------------------------------------
# Column mapping: {canonical: source}, resolved against a schema, applied to batches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conversion:
    target: str
    source: str
    kind: str  # string | id_int | images_* | turns | messages | cast | embedding | passthrough
    # how the column was chosen: "name" (canonical), "option" (the columns option), "image"
    # (shaped like a Hugging Face image), "messages", or "alias" (ALIASES)
    how: str = "name"


# Common names of canonical columns in other tools' files (img2dataset: jpg/png/txt/key/URL, LAION:
# TEXT/URL, WebDataset: __key__, Hugging Face datasets: image/text), compared in lower case. A
# column is read under its alias only when the canonical column is absent, its type fits, and no
# other alias competes; each use is reported (`Conversion.how == "alias"`).
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("key", "__key__", "uid", "sample_id"),
    "images": ("image", "img", "jpg", "jpeg", "png", "webp"),
    "caption": ("text", "txt", "alt", "alt_text", "alttext", "caption"),
    "url": ("url", "image_url", "img_url"),
    "license": ("license",),
}
CONTENT_COLUMNS = ("images", "caption", "conversations")


_STRING_TARGETS = {name for name, t in KNOWN_TYPES.items() if t == pa.string()}


def _expected(target: str) -> str:
    if target == "id":
        return "string or integer"
    if target == "images":
        return "binary, struct<bytes: binary, path: string> or a list of them"
    if target == "conversations":
        return "list<struct<from: string, value: string>> or list<struct<role: string, content: string>>"
    if target in EMBEDDING_COLUMNS:
        return "fixed_size_list<float>[dim]"
    return str(KNOWN_TYPES[target])


def _kind_for(target: str, t: pa.DataType) -> str | None:
    """How a source column of type `t` becomes canonical column `target`; None if it cannot."""
    u = _unwrap(t)
    if target == "id":
        if is_string_like(u):
            return "string"
        return "id_int" if pa.types.is_integer(u) else None
    if target == "images":
        if is_binary_like(u):
            return "images_binary"
        if is_image_struct(u):
            return "images_struct"
        return "images_list" if is_image_list(u) else None
    if target == "conversations":
        if is_turns_list(u):
            return "turns"
        return "messages" if is_messages_list(u) else None
    if target in EMBEDDING_COLUMNS:
        ok = pa.types.is_fixed_size_list(u) and pa.types.is_floating(u.value_type)
        return "embedding" if ok else None
    expected = KNOWN_TYPES.get(target)
    if expected is None:
        return "passthrough"
    if target in _STRING_TARGETS:
        return "string" if is_string_like(u) else None
    if pa.types.is_null(u) or (pa.types.is_integer(u) and pa.types.is_integer(expected)):
        return "cast"
    if pa.types.is_floating(expected) and (pa.types.is_integer(u) or pa.types.is_floating(u)):
        return "cast"
    # list<string> (`edits`): Parquet names the item field `element`, Arrow `item`
    if _is_list(u) and _is_list(expected) and u.value_type.equals(expected.value_type):
        return "cast"
    return None


class ColumnMapping:
    """The `columns` option: which source column becomes which canonical column.

    `resolve(schema, where)` checks a file's schema and returns the conversions (InputError naming
    the file, the column, the type found and the type expected); `apply(table, conversions)` runs
    them on a batch with Arrow compute. Columns not mapped are passed through under their name,
    except those in `drop`.
    """

    def __init__(
        self,
        reader: str,
        columns: Mapping[str, str] | None = None,
        drop: Iterable[str] = (),
        auto_images: bool = True,
        auto_messages: bool = True,
        aliases: bool = False,
    ) -> None:
        columns = dict(columns or {})
        for target, src in columns.items():
            if not isinstance(target, str) or not isinstance(src, str):
                raise InputError(
                    f"{reader}: option columns must map canonical names to source column names, got {target!r}: {src!r}"
                )
        if len(set(columns.values())) != len(columns):
            raise InputError(
                f"{reader}: option columns maps one source column to several names: {columns}"
            )
        self.reader = reader
        self.columns = columns
        self.drop = set(drop)
        self.auto_images = auto_images
        self.auto_messages = auto_messages
        # With aliases: common names are recognised (ALIASES), and a file that gives no content
        # column, or holds bytes no column option placed, is refused instead of read as rows
        # that later look empty.
        self.aliases = aliases

    def resolve(
        self, schema: pa.Schema, where: str, image_hints: Sequence[str] = ()
    ) -> list[Conversion]:
        names = schema.names
        prefix = f"{self.reader}: {where}"
        mapping = dict(self.columns)
        for target, src in self.columns.items():
            if src not in names:
                # Files of one input may differ: one that has the canonical column needs no map.
                if target in names and target not in self.columns.values():
                    mapping[target] = target
                    continue
                raise InputError(
                    f"{prefix}: column '{src}' (for '{target}') not found; columns are {names}"
                )
        used = set(mapping.values())
        for name in names:
            if name in used or name in self.drop:
                continue
            if name in mapping:
                raise InputError(
                    f"{prefix}: column '{name}' exists and column '{mapping[name]}' is also mapped to it; "
                    f"rename one of them in the columns option"
                )
            if name in KNOWN_TYPES or name in EMBEDDING_COLUMNS:
                mapping[name] = name
                used.add(name)
        how = {t: "option" for t, src in self.columns.items() if mapping.get(t) == src != t}
        free = [n for n in names if n not in used and n not in self.drop]
        if self.auto_images and "images" not in mapping:
            candidates = [n for n in image_hints if n in free]
            candidates += [n for n in free if looks_like_images(schema.field(n).type)]
            if candidates:
                mapping["images"] = candidates[0]
                used.add(candidates[0])
                how["images"] = "image"
        if (
            self.auto_messages
            and "conversations" not in mapping
            and "messages" in names
            and "messages" not in used
        ):
            if is_messages_list(schema.field("messages").type):
                mapping["conversations"] = "messages"
                used.add("messages")
                how["conversations"] = "messages"
        if self.aliases:
            self._resolve_aliases(schema, prefix, mapping, used, how)
        conversions = []
        for target, src in mapping.items():
            found = schema.field(src).type
            kind = _kind_for(target, found)
            if kind is None:
                via = f" (mapped to '{target}')" if src != target else ""
                raise InputError(
                    f"{prefix}: column '{src}'{via} has type {found}, expected {_expected(target)}"
                )
            conversions.append(Conversion(target, src, kind, how.get(target, "name")))
        for name in names:
            if name not in used and name not in self.drop:
                conversions.append(Conversion(name, name, "passthrough"))
        return conversions

    def _resolve_aliases(
        self,
        schema: pa.Schema,
        prefix: str,
        mapping: dict[str, str],
        used: set[str],
        how: dict[str, str],
    ) -> None:
        """Map absent canonical columns from their aliases; refuse what would be a guess."""
        listing = ", ".join(f"{f.name} ({f.type})" for f in schema)
        hint = "give the reader's columns option (--input-option columns='{...}')"
        for target, names in ALIASES.items():
            if target in mapping:
                continue
            found = [
                n
                for n in schema.names
                if n not in used
                and n not in self.drop
                and n.lower() in names
                and _kind_for(target, schema.field(n).type) is not None
            ]
            if len(found) > 1:
                raise InputError(
                    f"{prefix}: columns {found} could each be '{target}'; {hint}, e.g. "
                    f"columns={{'{target}': '{found[0]}'}}; columns are {listing}"
                )
            if found:
                mapping[target] = found[0]
                used.add(found[0])
                how[target] = "alias"
        if not any(t in mapping for t in CONTENT_COLUMNS):
            raise InputError(
                f"{prefix}: no column maps to images, caption or conversations; columns are "
                f"{listing}; {hint}, e.g. columns={{'images': '<image column>', "
                "'caption': '<text column>'}"
            )
        if "images" not in mapping:
            stray = [
                n
                for n in schema.names
                if n not in used
                and n not in self.drop
                and (is_binary_like(schema.field(n).type) or is_image_list(schema.field(n).type))
            ]
            if stray:
                raise InputError(
                    f"{prefix}: column '{stray[0]}' ({schema.field(stray[0]).type}) holds bytes "
                    f"but no column maps to images, so every row would look image-less; {hint}, "
                    f"e.g. columns={{'images': '{stray[0]}'}}, or drop_columns=['{stray[0]}'] if "
                    f"it is not an image; columns are {listing}"
                )

    def apply(
        self,
        table: pa.Table,
        conversions: Sequence[Conversion],
        image_paths: pa.Array | None = None,
    ) -> pa.Table:
        """Canonical columns from a batch (no `source`, no `_reject`); missing ids are content ids."""
        names, arrays = [], []
        for conv in conversions:
            col = table.column(conv.source)
            if conv.kind == "passthrough":
                arr = col
            elif conv.kind in ("string", "id_int"):
                arr = _to_string(col)
            elif conv.kind == "images_binary":
                arr = images_from_binary(col, image_paths)
            elif conv.kind == "images_struct":
                arr = images_from_struct(col)
            elif conv.kind == "images_list":
                arr = images_from_list(col)
            elif conv.kind == "turns":
                arr = conversations_from_turns(col)
            elif conv.kind == "messages":
                arr = conversations_from_messages(col)
            elif conv.kind == "embedding":
                arr = _as_array(col)
                arr = arr.cast(pa.list_(pa.float16(), arr.type.list_size))
            else:  # cast
                arr = _as_array(col).cast(KNOWN_TYPES[conv.target])
            names.append(conv.target)
            arrays.append(arr)
        n = table.num_rows
        if "images" not in names:
            names.append("images")
            arrays.append(empty_images(n))
        out = pa.Table.from_arrays(arrays, names=names)
        return fill_missing_ids(out)


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------
