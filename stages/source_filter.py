"""source_filter: keep the rows of a source that satisfy its condition, a SQL expression.

A mixture often takes part of a source: Bunny-695K keeps SVIT-mix-665K without its ShareGPT-40K
text-only conversations (`n_images > 0`), a recipe may keep one task or drop long answers.
`filters` maps a source name (or `*`, every source without its own entry) to a condition
written as a SQL expression over the row's columns (Polars SQL, `polars.sql_expr`), e.g.

    {"svit_mix_665k": "n_images > 0", "*": "task <> 'caption' AND LENGTH(caption) < 500"}

Besides the row's scalar columns the expression may use `n_images` (images in the row) and
`n_turns` (turns in its conversation), both 0 when the list is null. A row is kept when the
condition is true; false or NULL (SQL's unknown, e.g. a comparison with a null column) rejects
it: `source_filter: condition not met (source svit_mix_665k: n_images > 0)`. A condition that
names a column the input lacks, or does not parse, is an error before any row is read.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, param, reject
from warren.stages.schema import CORE_FIELDS

ALL_SOURCES = "*"
VIRTUAL = {"n_images": "images", "n_turns": "conversations"}
CORE_NAMES = frozenset(f.name for f in CORE_FIELDS)


def parse_condition(expression: str, where: str) -> pl.Expr:
    try:
        return pl.sql_expr(expression)
    except Exception as exc:  # polars raises its own SQL error types
        raise ValueError(f"{where}: cannot parse condition {expression!r} ({exc})") from exc


def condition_mask(batch: pa.Table, expression: str, where: str) -> np.ndarray:
    """True where `expression` holds for the row (NULL counts as false)."""
    expr = parse_condition(expression, where)
    columns: dict[str, pa.Array] = {}
    for name in expr.meta.root_names():
        if name in VIRTUAL:
            lists = VIRTUAL[name]
            if lists in batch.column_names:
                values = pc.fill_null(pc.list_value_length(batch.column(lists)), 0)
            else:
                values = pa.array(np.zeros(batch.num_rows, np.int32))
            columns[name] = values
        elif name in batch.column_names:
            columns[name] = batch.column(name)
        else:
            raise ValueError(
                f"{where}: condition {expression!r} names column {name!r}, which the rows do not "
                f"have (columns: {', '.join(batch.column_names)}, n_images, n_turns)"
            )
    if not columns:  # a constant condition: give polars a frame of the right height
        columns["__rows"] = pa.nulls(batch.num_rows, pa.int8())
    frame = pl.from_arrow(pa.table(columns), rechunk=False)
    try:
        result = frame.select(expr.alias("__keep")).to_series()
    except Exception as exc:
        raise ValueError(f"{where}: condition {expression!r} failed ({exc})") from exc
    if result.dtype != pl.Boolean:
        raise ValueError(
            f"{where}: condition {expression!r} is not true/false (it is {result.dtype})"
        )
    if len(result) == 1 and batch.num_rows != 1:
        result = pl.Series([result[0]] * batch.num_rows, dtype=pl.Boolean)
    return result.fill_null(False).to_numpy().astype(bool)


@dataclasses.dataclass(frozen=True)
class SourceFilterParams:
    filters: dict = param(
        {}, "source name (or '*' for every other source) -> SQL condition its rows must meet"
    )
    source_column: str = param("source", "column naming each row's source")


class SourceFilter(BatchStage):
    """Keep the rows of each source that satisfy its SQL condition; reject the others."""

    name = "source_filter"
    version = "1"
    Params = SourceFilterParams

    def check_params(self) -> None:
        if not isinstance(self.params.filters, dict) or not self.params.filters:
            raise ValueError(f"{self.name}: filters must map source names to conditions")
        for source, expression in self.params.filters.items():
            if not isinstance(expression, str) or not expression.strip():
                raise ValueError(f"{self.name}: the condition of {source!r} must be a string")
            parse_condition(expression, f"{self.name}: source {source}")

    def required_columns(self) -> tuple[str, ...]:
        """The columns the conditions name (their virtual counts and core columns aside)."""
        names = [self.params.source_column]
        for source, expression in self.params.filters.items():
            expr = parse_condition(expression, f"{self.name}: source {source}")
            names += expr.meta.root_names()
        return tuple(n for n in dict.fromkeys(names) if n not in VIRTUAL and n not in CORE_NAMES)

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        out = reject(batch, np.zeros(n, bool), "")
        if p.source_column in batch.column_names:
            sources = batch.column(p.source_column).cast(pa.string()).to_numpy(zero_copy_only=False)
        else:
            sources = np.full(n, None, object)
        named = {s for s in p.filters if s != ALL_SOURCES}
        groups = [(s, sources == s) for s in sorted(named)]
        if ALL_SOURCES in p.filters:
            groups.append((ALL_SOURCES, ~np.isin(sources, sorted(named))))
        for source, rows in groups:
            if not rows.any():
                continue
            expression = p.filters[source]
            keep = condition_mask(batch, expression, f"{self.name}: source {source}")
            bad = rows & ~keep
            if bad.any():
                labels = sources if source == ALL_SOURCES else np.full(n, source, object)
                reasons = [
                    f"{self.name}: condition not met (source {labels[i]}: {expression})"
                    if bad[i]
                    else None
                    for i in range(n)
                ]
                out = reject(out, bad, reasons)
        return out


__all__ = ["SourceFilter", "SourceFilterParams", "condition_mask"]
