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

from stages import conversation
from stages.schema import EDITS_COLUMN, REJECT_COLUMN, TURN_TYPE

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


def _bytes_type(t: pa.DataType) -> pa.DataType:
    """`t` (string, or list<struct<string fields>>) with its strings as binary: a cast that never
    checks UTF-8, so the bytes can be looked at."""
    if _is_list(t):
        return pa.list_(pa.struct([(f.name, pa.binary()) for f in t.value_type]))
    return pa.binary()


def _is_utf8(value: Any) -> bool:
    """Whether a value of `_bytes_type` decodes (None and missing turn fields do)."""
    if value is None:
        return True
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    return all(_is_utf8(v) for turn in value for v in turn.values())


def reject_invalid_utf8(table: pa.Table, reader: str, where: str, first_row: int = 0) -> pa.Table:
    """Reject rows whose text is not UTF-8 (`<reader>: bad record (FILE row N: caption is not
    valid UTF-8)`), their bad bytes replaced by U+FFFD so the row still shows what it held."""
    reasons: list[str | None] | None = None
    for name in table.column_names:
        field = table.schema.field(name)
        if not (pa.types.is_string(field.type) or field.type == TURNS_LIST_TYPE):
            continue
        try:
            table.column(name).validate(full=True)  # checks UTF-8; fast, Arrow's own
            continue
        except pa.ArrowInvalid:
            pass
        values = table.column(name).cast(_bytes_type(field.type)).to_pylist()
        if reasons is None:
            reasons = table.column(REJECT_COLUMN).to_pylist()
        for i, value in enumerate(values):
            if not _is_utf8(value):
                reasons[i] = reasons[i] or (
                    f"{reader}: bad record ({where} row {first_row + i + 1}: {name} is not "
                    "valid UTF-8)"
                )
        fixed = pa.array([_decode_replacing(v) for v in values], field.type)
        table = table.set_column(table.column_names.index(name), field, fixed)
    if reasons is None:
        return table
    i = table.column_names.index(REJECT_COLUMN)
    return table.set_column(i, table.schema.field(i), pa.array(reasons, pa.string()))


def _decode_replacing(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [{k: _decode_replacing(v) for k, v in turn.items()} for turn in value]
    return value


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
