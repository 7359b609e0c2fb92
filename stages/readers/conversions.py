"""Arrow conversions into canonical columns, vectorised (no per-row Python): images from binary
columns, Hugging Face `Image` structs or lists of them; conversations from LLaVA turns or
role/content messages; and the type tests that tell which conversion a source column needs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.schema import (
    IMAGE_MARKER,
    IMAGE_TYPE,
    TURN_TYPE,
)

IMAGES_LIST_TYPE = pa.list_(IMAGE_TYPE)
TURNS_LIST_TYPE = pa.list_(TURN_TYPE)
# role/content chat roles (TRL, OpenAI) to LLaVA `from` values: a translation between formats,
# not an edit; any other spelling is normalised (and recorded) by `stages.conversation`.
ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def unwrap_dictionary(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_string_like(t: pa.DataType) -> bool:
    t = unwrap_dictionary(t)
    return (
        pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
    )


def is_binary_like(t: pa.DataType) -> bool:
    t = unwrap_dictionary(t)
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def is_list(t: pa.DataType) -> bool:
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
    return is_list(t) and (is_image_struct(t.value_type) or is_binary_like(t.value_type))


def looks_like_images(t: pa.DataType) -> bool:
    """Auto-detection of an image column: an HF `Image` struct or a list of them (not bare binary)."""
    t = unwrap_dictionary(t)
    return is_image_struct(t) or (is_list(t) and is_image_struct(t.value_type))


def is_turns_list(t: pa.DataType) -> bool:
    if not is_list(t):
        return False
    v = t.value_type
    return _struct_names(v) >= {"from", "value"} and all(
        is_string_like(v.field(n).type) for n in ("from", "value")
    )


def _is_content_parts(t: pa.DataType) -> bool:
    """TRL multimodal content: list<struct<type: string, text: string, ...>>."""
    return (
        is_list(t)
        and _struct_names(t.value_type) >= {"type", "text"}
        and is_string_like(t.value_type.field("type").type)
        and is_string_like(t.value_type.field("text").type)
    )


def is_messages_list(t: pa.DataType) -> bool:
    if not is_list(t):
        return False
    v = t.value_type
    if not _struct_names(v) >= {"role", "content"} or not is_string_like(v.field("role").type):
        return False
    content = v.field("content").type
    return is_string_like(content) or _is_content_parts(content)


def as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def to_string(arr: pa.Array) -> pa.Array:
    arr = as_array(arr)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def _to_binary(arr: pa.Array) -> pa.Array:
    arr = as_array(arr)
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
    paths = pa.nulls(len(data), pa.string()) if paths is None else to_string(paths)
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
    data = as_array(data)
    valid = _valid(data)
    mask = pa.array(valid, type=pa.bool_())
    values = _image_structs(
        data.filter(mask), None if paths is None else as_array(paths).filter(mask)
    )
    return _lists(valid.astype(np.int32), values, IMAGES_LIST_TYPE)


def images_from_struct(arr: pa.Array) -> pa.Array:
    """A Hugging Face `Image` struct column -> one-element `images` lists; null (or empty) -> []."""
    arr = as_array(arr)
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
    arr = as_array(arr)
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
        [to_string(froms), to_string(values)], fields=list(TURN_TYPE)
    )
    return _lists(lengths, turns, TURNS_LIST_TYPE, null_mask=~_valid(arr))


def conversations_from_turns(arr: pa.Array) -> pa.Array:
    """list<struct{from, value, ...}> -> canonical `conversations` (null stays null)."""
    arr = as_array(arr)
    flat = arr.flatten()
    return _turn_lists(arr, pc.struct_field(flat, "from"), pc.struct_field(flat, "value"))


def roles_to_from(roles: pa.Array) -> pa.Array:
    """user -> human, assistant -> gpt, system -> system; other roles are kept as they are."""
    out = to_string(roles)
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
    kind = to_string(pc.struct_field(parts, "type"))
    text = pc.fill_null(to_string(pc.struct_field(parts, "text")), "")
    strings = pc.if_else(pc.equal(kind, "image"), IMAGE_MARKER, text)
    strings = pc.fill_null(strings, "")
    joined = pc.binary_join(
        _lists(lengths, strings, pa.list_(pa.string()), null_mask=~_valid(content)), ""
    )
    return to_string(joined)


def conversations_from_messages(arr: pa.Array) -> pa.Array:
    """list<struct{role, content}> (content a string or TRL parts) -> canonical `conversations`."""
    arr = as_array(arr)
    flat = arr.flatten()
    content = as_array(pc.struct_field(flat, "content"))
    if not is_string_like(content.type):
        content = _join_content_parts(content)
    return _turn_lists(arr, roles_to_from(pc.struct_field(flat, "role")), content)
