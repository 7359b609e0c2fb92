"""The provenance of a removed duplicate, as columns: which kept row it was removed in favour of
(`duplicate_of`) and how alike the two are (`similarity`, float32). The dedup stages (`semdedup`,
`exact_dedup`, `phash_dedup`) write both on every row: null on kept rows and on rows rejected for
another reason, so the report and `warren explain` read them instead of parsing reason text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from warren.stages.base import put_columns

DUPLICATE_OF = "duplicate_of"
SIMILARITY = "similarity"
PROVENANCE_COLUMNS = (DUPLICATE_OF, SIMILARITY)


def put_duplicates(
    table: pa.Table,
    rows: Sequence[int] | np.ndarray,
    kept_ids: Sequence[str],
    similarity: Sequence[float] | np.ndarray,
) -> pa.Table:
    """`table` with `duplicate_of` and `similarity` set at `rows` (positions of the removed
    duplicates, aligned with the kept row's id and the similarity) and null elsewhere."""
    n = table.num_rows
    rows = np.asarray(rows, dtype=np.int64)
    kept: list[str | None] = [None] * n
    for i, kid in zip(rows.tolist(), kept_ids, strict=True):
        kept[i] = kid
    sim = np.zeros(n, dtype=np.float32)
    sim[rows] = np.asarray(similarity, dtype=np.float32)
    has = np.zeros(n, dtype=bool)
    has[rows] = True
    return put_columns(
        table,
        {
            DUPLICATE_OF: pa.array(kept, pa.string()),
            SIMILARITY: pa.array(sim, pa.float32(), mask=~has),
        },
    )
