"""Record-level checks every reader's rows pass through (`stages.readers.columns.finish`).

- Text Arrow cannot hold: a lone UTF-16 surrogate, valid in JSON ("\\ud800") but not UTF-8
  (`first_bad_text`, `replace_bad_text`), and bytes that are not UTF-8 in a Parquet string
  column, which Parquet does not check (`reject_invalid_utf8`). A row with either is rejected
  with a reason naming the file and the record, and keeps its text with U+FFFD in place.
- The conversation rules of `stages.conversation` (`apply_conversation_rules`): turns normalised,
  each edit recorded in `edits`, an invalid conversation rejected.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from warren.stages import conversation
from warren.stages.schema import EDITS_COLUMN, REJECT_COLUMN, TURN_TYPE

TURNS_LIST_TYPE = pa.list_(TURN_TYPE)
EDITS_TYPE = pa.list_(pa.string())


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def first_bad_text(value: Any, where: str = "") -> str | None:
    """Where (`conversations[1].value`) the first string that cannot be UTF-8 sits, or None.

    JSON can spell a lone UTF-16 surrogate ("\\ud800"); Python keeps it in a str, and Arrow, whose
    strings are UTF-8, cannot hold it.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "text"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            found = first_bad_text(key, f"{where} key" if where else "key") or first_bad_text(
                item, name
            )
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = first_bad_text(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def replace_bad_text(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD (what a UTF-8 decoder shows)."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {replace_bad_text(k): replace_bad_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_bad_text(v) for v in value]
    return value


def describe_error(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError) and "surrogate" in str(exc):
        return "text is not valid UTF-8: lone surrogate"
    return f"{type(exc).__name__}: {exc}"


def _as_binary(t: pa.DataType) -> pa.DataType:
    """`t` with every string in it (top level, list items, struct fields) as binary: a cast that
    never checks UTF-8, so the bytes can be looked at."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.binary()
    if _is_list(t):
        return pa.list_(pa.field(t.value_field.name, _as_binary(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_binary(f.type)) for f in t])
    return t


def _is_utf8(value: Any, t: pa.DataType) -> bool:
    """Whether the text of `value` (read as `_as_binary(t)`) decodes; `t` says which bytes are
    text (an image's bytes are not)."""
    if value is None:
        return True
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    if _is_list(t):
        return all(_is_utf8(v, t.value_type) for v in value)
    if pa.types.is_struct(t):
        return all(_is_utf8(value.get(f.name), f.type) for f in t)
    return True


def _decode_replacing(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return value.decode("utf-8", "replace")
    if _is_list(t):
        return [_decode_replacing(v, t.value_type) for v in value]
    if pa.types.is_struct(t):
        return {f.name: _decode_replacing(value.get(f.name), f.type) for f in t}
    return value


def reject_invalid_utf8(table: pa.Table, reader: str, where: str, first_row: int = 0) -> pa.Table:
    """Reject rows whose text is not UTF-8 (`<reader>: bad record (FILE row N: caption is not
    valid UTF-8)`), anywhere in the row (a caption, a turn, an image path, a list of strings),
    their bad bytes replaced by U+FFFD so the row still shows what it held."""
    reasons: list[str | None] | None = None
    for name in table.column_names:
        field = table.schema.field(name)
        as_binary = _as_binary(field.type)
        if as_binary == field.type:  # no text in it
            continue
        try:
            table.column(name).validate(full=True)  # checks UTF-8, nested too; Arrow's own
            continue
        except pa.ArrowInvalid:
            pass
        values = table.column(name).cast(as_binary).to_pylist()
        if reasons is None:
            reasons = table.column(REJECT_COLUMN).to_pylist()
        for i, value in enumerate(values):
            if not _is_utf8(value, field.type):
                reasons[i] = reasons[i] or (
                    f"{reader}: bad record ({where} row {first_row + i + 1}: {name} is not "
                    "valid UTF-8)"
                )
        fixed = pa.array([_decode_replacing(v, field.type) for v in values], field.type)
        table = table.set_column(table.column_names.index(name), field, fixed)
    if reasons is None:
        return table
    i = table.column_names.index(REJECT_COLUMN)
    return table.set_column(i, table.schema.field(i), pa.array(reasons, pa.string()))


def apply_conversation_rules(table: pa.Table, reader: str) -> pa.Table:
    """Normalise every row's turns (`stages.conversation.normalize`), append the edits to `edits`
    and reject invalid conversations; `edits` and `_reject` end up the last two columns."""
    n = table.num_rows
    reasons = table.column(REJECT_COLUMN).to_pylist()
    if EDITS_COLUMN in table.column_names:
        edits: list[list[str] | None] = table.column(EDITS_COLUMN).to_pylist()
    else:
        edits = [None] * n
    conv = table.column("conversations")
    if conv.null_count < n:
        turns_per_row = conv.to_pylist()
        counts = (
            pc.fill_null(pc.list_value_length(table.column("images")), 0)
            .to_numpy(zero_copy_only=False)
            .tolist()
        )
        changed = False
        for row, turns in enumerate(turns_per_row):
            if not turns:
                continue
            normalised, made = conversation.normalize(turns, counts[row])
            if made:
                turns_per_row[row] = normalised
                edits[row] = [*(edits[row] or []), *made]
                changed = True
            if reasons[row] is None:
                why = conversation.problem(normalised, counts[row])
                if why is not None:
                    reasons[row] = f"{reader}: {why}"
        if changed:
            i = table.column_names.index("conversations")
            table = table.set_column(
                i, table.schema.field(i), pa.array(turns_per_row, TURNS_LIST_TYPE)
            )
    table = table.drop_columns(
        [c for c in (EDITS_COLUMN, REJECT_COLUMN) if c in table.column_names]
    )
    table = table.append_column(pa.field(EDITS_COLUMN, EDITS_TYPE), pa.array(edits, EDITS_TYPE))
    return table.append_column(pa.field(REJECT_COLUMN, pa.string()), pa.array(reasons, pa.string()))
