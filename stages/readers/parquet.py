"""Reader for Parquet input (one file or a folder of shards).

Options of `ParquetReader`:

- `columns`: mapping {canonical_name: source_column}, e.g.
  `{"caption": "TEXT", "url": "URL", "images": "jpg"}`. Columns already named canonically need no
  entry. A source image column may hold binary bytes (wrapped into a one-element `images` list),
  a Hugging Face `Image` struct {bytes, path}, or a list of either; without a mapping the first
  column shaped like a Hugging Face image (or list of images) becomes `images`, and a role/content
  `messages` column becomes `conversations`.
- Aliases: without a mapping, a canonical column that a file lacks is read from a common alias
  (case-insensitive; `stages.readers.columns.ALIASES`): `image`/`img`/`jpg`/`jpeg`/`png`/`webp`
  -> `images`, `text`/`txt`/`alt`/`alt_text`/`TEXT` -> `caption`, `URL`/`image_url` -> `url`,
  `key`/`__key__`/`uid`/`sample_id` -> `id` (img2dataset, LAION, WebDataset and Hugging Face
  names). Each use is logged (`parquet: FILE: reading column 'image' as 'images' (alias)`) and
  listed by `describe()`. Refused, with a message naming the file, its columns and types and the
  option to give: two aliases for one column (`txt` and `text`), a file where nothing maps to
  `images`, `caption` or `conversations`, and a file with a bytes column that nothing maps to
  `images` (rows would look image-less when they are not).
- `drop_columns`: source columns not to read (e.g. a binary column that is not an image).
- `skip_bad_files` (default false): a file whose footer cannot be read, or a row group that
  cannot be decoded, is an `InputError` naming the file and this option, before any work for a
  footer, at that row group otherwise. With `skip_bad_files=true` (`--input-option
  skip_bad_files=true`) a bad file becomes one rejected row (`parquet: unreadable file (FILE:
  ...)`, its id a hash of the file's path) and a bad row group one rejected row per row the
  footer says it holds (`parquet: unreadable row group (FILE row group 2 of 5: ...)`), and the
  other files and row groups are read.
- `source`: the value of the `source` column (default: the file or folder name).
- `batch_size`: rows per yielded table (default 512).

Each file is resolved against its own columns (files of one folder may name their columns
differently); their canonical tables are read into one schema, the union of every file's (a
column missing from a file is null there). Integer ids become strings; without an id column (or
for null ids) the id is derived from the row's content (`row_content_id`). Unmapped extra columns
are kept as they are. Null captions stay null (a later stage rejects them). A unit is one file;
`plan()` reads every footer and fails with an `InputError` naming the file for an unreadable file
(see `skip_bad_files`), a missing mapped column, a column whose type cannot become its canonical
type, or columns that do not map (above).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.columns import (
    ColumnMapping,
    file_uri,
    finish,
    list_input_files,
    open_parquet_schema,
    relative_key,
)
from warren.stages.schema import EDITS_COLUMN, REJECT_COLUMN, content_id

log = logging.getLogger(__name__)


class ParquetReader(Reader):
    """Parquet file or folder of Parquet shards; options `columns`, `drop_columns`,
    `skip_bad_files`, `source`, `batch_size`."""

    format = "parquet"
    OPTIONS = ("columns", "drop_columns", "skip_bad_files", "source", "batch_size")

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        drop = options.get("drop_columns") or []
        if isinstance(drop, str) or not all(isinstance(c, str) for c in drop):
            raise InputError(f"{self.format}: option drop_columns must be a list of column names")
        skip = options.get("skip_bad_files", False)
        if not isinstance(skip, bool):
            raise InputError(f"{self.format}: option skip_bad_files must be true or false")
        self.skip_bad_files = skip
        self.mapping = ColumnMapping(self.format, options.get("columns"), drop=drop, aliases=True)
        self.aliases_used: dict[str, dict[str, str]] = {}

    def _bad(self, where: str, what: str) -> InputError:
        return InputError(
            f"{self.format}: {where}: {what}; pass skip_bad_files=true (--input-option "
            "skip_bad_files=true) to read the other files and row groups and record this one "
            "as rejected rows"
        )

    def plan(self) -> list[ReadUnit]:
        files = list_input_files(self.format, self.location, (".parquet",), "Parquet files")
        fs = self.location.fs
        units = []
        schemas: list[tuple[str, pa.Schema]] = []
        seen_columns: set[str] = set()
        for info in files:
            where = file_uri(fs, info.path)
            key = relative_key(self.location, info.path)
            try:
                schema, rows = open_parquet_schema(self.format, fs, info.path)
            except InputError as exc:
                if not self.skip_bad_files:
                    what = str(exc).removeprefix(f"{self.format}: {where}: ")
                    raise self._bad(where, what) from exc
                log.warning("%s; skipped (skip_bad_files)", exc)
                units.append(ReadUnit(key, info.path, {"bad": str(exc)}))
                continue
            conversions = self.mapping.resolve(_plain_schema(schema), where)
            aliases = {c.source: c.target for c in conversions if c.how == "alias"}
            for src, target in aliases.items():
                log.warning(
                    "%s: %s: reading column '%s' as '%s' (alias; the columns option chooses "
                    "otherwise)",
                    self.format,
                    where,
                    src,
                    target,
                )
            if aliases:
                self.aliases_used[key] = aliases
            schemas.append((where, _output_schema(self.mapping, schema, conversions, where)))
            units.append(ReadUnit(key=key, path=info.path, options={"rows": rows}))
            seen_columns.update(schema.names)
        # A file without a mapped column may read the canonical one instead (files of one input
        # differ), but a mapped column that no file has is a typo, not a difference: refuse it
        # rather than read every file's canonical column without a word.
        missing = {t: s for t, s in self.mapping.columns.items() if s not in seen_columns}
        if missing and schemas:
            raise InputError(
                f"{self.format}: option columns names {', '.join(map(repr, missing.values()))} "
                f"(for {', '.join(map(repr, missing))}), which no input file has; the files' "
                f"columns are {sorted(seen_columns)}"
            )
        # Every shard of the output must have one schema, even when the input files disagree
        # (a column missing from some files, int32 here and int64 there): each file's canonical
        # table is cast to the union of them. The reader is pickled to the tasks with it.
        self.unified_schema = _unify(self.format, schemas)
        return units

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        fs = self.location.fs
        where = file_uri(fs, unit.path)
        unified = getattr(self, "unified_schema", None)
        if "bad" in unit.options:
            reason = unit.options["bad"].removeprefix(f"{self.format}: ")
            yield self._rejected(
                unified, [content_id(unit.key)], f"{self.format}: unreadable file ({reason})", where
            )
            return
        with fs.open_input_file(unit.path) as f:
            pf = pq.ParquetFile(f)
            conversions = self.mapping.resolve(_plain_schema(pf.schema_arrow), where)
            groups = pf.metadata.num_row_groups
            offset = 0  # rows of the file before this row group, to name a bad row
            for group in range(groups):
                before = offset
                offset += pf.metadata.row_group(group).num_rows
                try:
                    data = pf.read_row_group(group)
                except (OSError, pa.ArrowException, ValueError) as err:
                    exc = " ".join(str(err).split())  # Arrow's messages span lines
                    what = f"row group {group + 1} of {groups}"
                    if not self.skip_bad_files:
                        raise self._bad(where, f"{what} cannot be read ({exc})") from err
                    n = pf.metadata.row_group(group).num_rows
                    ids = [content_id(unit.key, str(group), str(i)) for i in range(n)]
                    reason = f"{self.format}: unreadable row group ({where} {what}: {exc})"
                    yield self._rejected(unified, ids, reason, where)
                    continue
                for start in range(0, data.num_rows, self.batch_size):
                    table = _plain_table(data.slice(start, self.batch_size))
                    table = self.mapping.apply(table, conversions)
                    table = finish(
                        table,
                        self.source,
                        "source" in self.options,
                        where,
                        self.format,
                        first_row=before + start,
                    )
                    yield table if unified is None else _to_schema(table, unified, where)

    def _rejected(
        self, schema: pa.Schema | None, ids: list[str], reason: str, where: str
    ) -> pa.Table:
        """Rows for records that could not be read: their ids and the reason, nothing else."""
        table = pa.table({"id": pa.array(ids, pa.string()), REJECT_COLUMN: [reason] * len(ids)})
        table = finish(table, self.source, "source" in self.options, where, self.format)
        return table if schema is None else _to_schema(table, schema, where)

    KNOWS_COLUMNS = True

    def known_columns(self) -> dict[str, pa.DataType] | None:
        """Every file's canonical columns together, from their footers (`plan` unifies them)."""
        unified = getattr(self, "unified_schema", None)
        return None if unified is None else {f.name: f.type for f in unified}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.aliases_used:
            out["aliases"] = self.aliases_used
        return out


def _output_schema(
    mapping: ColumnMapping, schema: pa.Schema, conversions: list, where: str
) -> pa.Schema:
    """The schema of a file's canonical tables: its conversions run on no rows."""
    empty = _plain_table(schema.empty_table())
    return finish(mapping.apply(empty, conversions), "", False, where).schema


def _plain_table(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns decoded (files differ in whether they encode)."""
    if not any(pa.types.is_dictionary(f.type) for f in table.schema):
        return table
    return table.cast(_plain_schema(table.schema))


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """Dictionary-encoded columns as their value type (files differ in whether they encode)."""
    fields = [
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema
    ]
    return pa.schema(fields)


def _unify(fmt: str, schemas: list[tuple[str, pa.Schema]]) -> pa.Schema | None:
    if not schemas:
        return None
    unified = schemas[0][1]
    for where, schema in schemas[1:]:
        try:
            unified = pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            first = schemas[0][0]
            raise InputError(
                f"{fmt}: {where}: its columns do not agree with the files before it "
                f"(e.g. {first}): {exc}"
            ) from exc
    # `edits` and `_reject` last, as `finish` leaves them, whatever columns later files add
    last = [n for n in (EDITS_COLUMN, REJECT_COLUMN) if n in unified.names]
    return pa.schema([f for f in unified if f.name not in last] + [unified.field(n) for n in last])


def _to_schema(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                columns.append(col.cast(field.type) if not col.type.equals(field.type) else col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(
                    f"{where}: column '{field.name}' of type {col.type} cannot be read as "
                    f"{field.type}, the type other input files give it ({exc})"
                ) from exc
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
