"""require: keep the rows whose boolean column is true.

The second half of a filter that marks first and rejects later: `image_based` with `reject=False`
marks `near_reference` on the whole pool, another filter ranks the whole pool, and `require`
rejects the unmarked rows afterwards, so that the result is the exact intersection of the two
filters, each computed on the full pool (DataComp's "CLIP score ∩ image-based").

A false value is rejected with `reason`; a null value, or a missing column, is an error in the
data, not a silent pass: null rows are rejected as `<reason> (null <column>)`, and a missing
column stops the stage with a message naming the column.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, param, reject


@dataclasses.dataclass(frozen=True)
class RequireParams:
    column: str = param("near_reference", "boolean column a row must have true")
    reason: str = param(
        "image_based: no reference image nearest", "rejection reason for rows where it is false"
    )


class Require(BatchStage):
    """Reject rows whose boolean column is false (or null)."""

    name = "require"
    version = "1"
    Params = RequireParams

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        if p.column not in batch.column_names:
            raise ValueError(
                f"{self.name}: input has no column {p.column!r}; run the stage that writes it first"
            )
        col = batch.column(p.column)
        if not pa.types.is_boolean(col.type):
            raise ValueError(f"{self.name}: column {p.column!r} has type {col.type}, expected bool")
        is_null = pc.is_null(col).to_numpy(zero_copy_only=False)
        false = ~pc.fill_null(col, True).to_numpy(zero_copy_only=False)
        out = reject(batch, np.asarray(is_null), f"{p.reason} (null {p.column})")
        return reject(out, np.asarray(false), p.reason)
