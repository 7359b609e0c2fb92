"""Column mappings ({canonical: source}): checked against a file's schema before any row is read,
then applied to each batch with the conversions of `stages.readers.conversions`.

The readers' shared helpers used to live here too; `tables` and `conversions` now hold them, and
their public names are still importable from this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa

from warren.stages.readers.base import InputError
from warren.stages.readers.conversions import (
    IMAGES_LIST_TYPE,
    ROLE_TO_FROM,
    TURNS_LIST_TYPE,
    as_array,
    conversations_from_messages,
    conversations_from_turns,
    empty_images,
    images_from_binary,
    images_from_list,
    images_from_struct,
    is_binary_like,
    is_image_list,
    is_image_struct,
    is_list,
    is_messages_list,
    is_string_like,
    is_turns_list,
    looks_like_images,
    roles_to_from,
    to_string,
    unwrap_dictionary,
)
from warren.stages.readers.tables import (
    file_uri,
    fill_missing_ids,
    finish,
    list_input_files,
    open_parquet_schema,
    relative_key,
    row_content_id,
    table_from_rows,
)
from warren.stages.schema import (
    EMBEDDING_COLUMNS,
    KNOWN_TYPES,
)


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
    u = unwrap_dictionary(t)
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
    if is_list(u) and is_list(expected) and u.value_type.equals(expected.value_type):
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
                arr = to_string(col)
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
                arr = as_array(col)
                arr = arr.cast(pa.list_(pa.float16(), arr.type.list_size))
            else:  # cast
                arr = as_array(col).cast(KNOWN_TYPES[conv.target])
            names.append(conv.target)
            arrays.append(arr)
        n = table.num_rows
        if "images" not in names:
            names.append("images")
            arrays.append(empty_images(n))
        out = pa.Table.from_arrays(arrays, names=names)
        return fill_missing_ids(out)


# Re-exported: the readers and exports import these from here.
__all__ = [
    "ALIASES",
    "CONTENT_COLUMNS",
    "ColumnMapping",
    "Conversion",
    "IMAGES_LIST_TYPE",
    "ROLE_TO_FROM",
    "TURNS_LIST_TYPE",
    "conversations_from_messages",
    "conversations_from_turns",
    "empty_images",
    "file_uri",
    "fill_missing_ids",
    "finish",
    "images_from_binary",
    "images_from_list",
    "images_from_struct",
    "is_binary_like",
    "is_image_list",
    "is_image_struct",
    "is_messages_list",
    "is_string_like",
    "is_turns_list",
    "list_input_files",
    "looks_like_images",
    "open_parquet_schema",
    "relative_key",
    "roles_to_from",
    "row_content_id",
    "table_from_rows",
]
