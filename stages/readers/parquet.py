"""Reader for Parquet input (one file or a folder of shards).

Options of `ParquetReader`:

- `columns`: mapping {canonical_name: source_column}, e.g.
  `{"caption": "TEXT", "url": "URL", "images": "jpg"}`. Columns already named canonically need no
  entry. A source image column may hold binary bytes (wrapped into a one-element `images` list),
  a Hugging Face `Image` struct {bytes, path}, or a list of either; without a mapping the first
  column shaped like a Hugging Face image (or list of images) becomes `images`, and a role/content
  `messages` column becomes `conversations`.
- `source`: the value of the `source` column (default: the file or folder name).
- `batch_size`: rows per yielded table (default 512).

Integer ids become strings; without an id column (or for null ids) the id is derived from the row's
content (`row_content_id`). Unmapped extra columns are kept as they are. Null captions stay null
(a later stage rejects them). A unit is one file; `plan()` reads every footer and fails with an
`InputError` naming the file for an unreadable file, a missing mapped column, or a column whose type
cannot become its canonical type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.readers.base import InputError, Reader, ReadUnit
from stages.readers.columns import (
    ColumnMapping,
    file_uri,
    finish,
    list_input_files,
    open_parquet_schema,
    relative_key,
)


class ParquetReader(Reader):
    """Parquet file or folder of Parquet shards; options `columns`, `source`, `batch_size`."""

    format = "parquet"
    OPTIONS = ("columns", "source", "batch_size")

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.mapping = ColumnMapping(self.format, options.get("columns"))

    def plan(self) -> list[ReadUnit]:
        files = list_input_files(self.format, self.location, (".parquet",), "Parquet files")
        units = []
        schemas: list[tuple[str, pa.Schema]] = []
        for info in files:
            schema, rows = open_parquet_schema(self.format, self.location.fs, info.path)
            self.mapping.resolve(schema, file_uri(self.location.fs, info.path))
            schemas.append((file_uri(self.location.fs, info.path), _plain_schema(schema)))
            units.append(
                ReadUnit(
                    key=relative_key(self.location, info.path),
                    path=info.path,
                    options={"rows": rows},
                )
            )
        # Every shard of the output must have one schema, even when the input files disagree
        # (a column missing from some files, int32 here and int64 there): read every file into
        # the union of their schemas. The reader is pickled to the tasks with this attribute.
        self.unified_schema = _unify(self.format, schemas)
        return units

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        fs = self.location.fs
        where = file_uri(fs, unit.path)
        unified = getattr(self, "unified_schema", None)
        with fs.open_input_file(unit.path) as f:
            pf = pq.ParquetFile(f)
            schema = unified if unified is not None else pf.schema_arrow
            conversions = self.mapping.resolve(schema, where)
            for batch in pf.iter_batches(batch_size=self.batch_size):
                table = pa.Table.from_batches([batch])
                if unified is not None:
                    table = _to_schema(table, unified, where)
                table = self.mapping.apply(table, conversions)
                yield finish(table, self.source, "source" in self.options, where, self.format)


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
    return unified


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
