"""exact_dedup: rows whose image bytes (and, optionally, caption) are identical keep one copy.

A global stage: the rows are partitioned by a content key (`stages.shuffle.map_groups`), so each
duplicate group meets in one task and memory is bounded by a group, not by the dataset. The row
with the smallest id in a group is kept (a stable rule: the same row survives every re-run); the
others are rejected as `exact_dedup: duplicate (of <id>)`.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa

from stages.base import GlobalContext, GlobalStage, param, reject
from stages.shuffle import map_groups

KEY_COLUMN = "_exact_key"


@dataclasses.dataclass(frozen=True)
class ExactDedupParams:
    key: str = param("image", "what must match: 'image' (image bytes) or 'image+caption'")


def content_key(table: pa.Table, key: str) -> pa.Table:
    """Append the content hash used to group duplicates; rows without images hash their caption."""
    images = table.column("images").to_pylist()
    captions = (
        table.column("caption").to_pylist() if key == "image+caption" else [None] * table.num_rows
    )
    keys = []
    for imgs, cap in zip(images, captions, strict=True):
        h = hashlib.sha256()
        for img in imgs or []:
            # An image stored only by path is identified by its path, never by "no bytes".
            data = img.get("bytes")
            data = b"\x00bytes" + data if data else b"\x00path" + (img.get("path") or "").encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        if not imgs or key == "image+caption":
            h.update(b"\x1ecaption\x1e" + (cap or "").encode())
        keys.append(h.hexdigest())
    return table.append_column(KEY_COLUMN, pa.array(keys, pa.string()))


def resolve_group(group: pa.Table) -> pa.Table:
    """Keep one row of a duplicate group (the first with the smallest id), reject the others."""
    ids = group.column("id").to_pylist()
    keep_at = min(range(len(ids)), key=lambda i: (ids[i], i))
    mask = [i != keep_at for i in range(len(ids))]
    out = reject(group, mask, f"exact_dedup: duplicate (of {ids[keep_at]})")
    return out.drop_columns([KEY_COLUMN])


class ExactDedup(GlobalStage):
    """Exact duplicates by content hash; one row per group survives."""

    name = "exact_dedup"
    version = "1"
    Params = ExactDedupParams

    def check_params(self) -> None:
        if self.params.key not in ("image", "image+caption"):
            raise ValueError(
                f"exact_dedup: key must be 'image' or 'image+caption', got {self.params.key!r}"
            )

    def run(self, ds, ctx: GlobalContext):
        keyed = ds.map_batches(content_key, fn_args=(self.params.key,), batch_format="pyarrow")
        return map_groups(
            keyed,
            KEY_COLUMN,
            resolve_group,
            num_partitions=ctx.partitions(),
            num_rows=ctx.num_rows,
            num_cpus=ctx.num_cpus,
        )


__all__ = ["ExactDedup", "ExactDedupParams", "content_key", "resolve_group"]
