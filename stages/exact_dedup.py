"""exact_dedup: rows whose content is identical keep one copy.

What "identical" means is the `key` parameter, one or more of these parts joined by `+`:

- `image`: the image FILE bytes. Written to `image_sha256` (string, 64 hex digits): for a row with
  one image that has bytes, the plain SHA-256 of those bytes (the same as `sha256sum` of the
  file); for several images, or images stored only by `path`, the SHA-256 of every image's record
  in order (a tag, its length, then its bytes, or its path when it has no bytes, so a path-only
  image is identified by its path and never by "no bytes").
- `pixels`: the DECODED pixels, so a PNG and its lossless WebP/BMP/TIFF re-encode are duplicates
  while their bytes differ. Each image is decoded by `stages.images.decode_image`, the way every
  stage and trainer sees it: first frame, EXIF orientation applied, transparency composited on
  white, every mode as RGB, full resolution. The hash is of that picture (mode, width, height
  and the raw RGB bytes), written to `pixel_hash` (string, 64 hex digits; SHA-256 of that
  record, or of every image's record in order for several images). Compositing first is the
  point: two files that show the same picture are duplicates for a trainer, which sees exactly
  that picture, even when the colours hidden under their transparent pixels differ; while two
  different shapes drawn on one transparent canvas (the same hidden RGB) show different pictures
  and stay distinct, which hashing the RGB channels without alpha would have merged. A
  photograph stored rotated with an EXIF orientation and the same photograph stored upright are
  one picture too. An image that cannot be decoded (or is over `decode_image`'s size limits)
  falls back to its file bytes, tagged so that it can never equal a pixel record: this stage
  decides sameness, not usability (`image_check` rejects broken images), and byte-identical
  broken files are still the same file. Pixel hashes of lossy formats are comparable within one
  decoder build (JPEG decoders may differ in the last bit between libjpeg versions), so compare
  `pixel_hash` columns written by the same environment.
- `caption`: the caption text, normalised by `caption_norm` and written to `caption_hash` (string,
  SHA-256 hex of the normalised UTF-8 text). The default, `casefold`, applies Unicode NFKC, case
  folding, and collapses runs of whitespace to one space with the ends stripped: alt-text
  boilerplate ("Stock Photo", "stock  photo ") repeats with incidental case and spacing
  differences, which carry no meaning for training, while punctuation and digits are kept because
  they can ("2 dogs" vs "3 dogs"). `whitespace` does the same without case folding; `exact`
  compares the string as stored (version 1's behaviour for `image+caption`). A missing caption
  counts as the empty one inside a combined key; with `key="caption"` alone, rows whose
  caption is null, empty or blank are never duplicates of each other (caption_check rejects
  them) and get a null `caption_hash`.

Accepted keys: `image` (the default), `pixels`, `caption`, `image+caption`, `pixels+caption`.
Rows without any image use their caption as their identity under the image and pixel keys (as in
version 1), so text-only rows are deduplicated by their caption.

A global stage: the rows are partitioned by the combined key (`stages.shuffle.map_groups`), so each
duplicate group meets in one task and memory is bounded by a group, not by the dataset. The row
with the smallest id in a group is kept (a stable rule: the same row survives every re-run); the
others are rejected as `exact_dedup: duplicate (<key> of <kept id>)`, e.g.
`exact_dedup: duplicate (pixels of r-0001)`; the default key keeps version 1's wording,
`exact_dedup: duplicate (of <kept id>)`. A rejected copy also gets the kept row's id in
`duplicate_of` and 1.0 in `similarity` (both null on the other rows).

Version 3 hashes the composited, oriented picture (version 2 hashed RGBA for images with
transparency, orientation not applied). Version 2 writes the hash columns of the parts the key uses (`image_sha256`, `pixel_hash`,
`caption_hash`) on every row, kept or rejected, and adds the `pixels` and `caption` parts and
`caption_norm`; with `caption_norm="exact"` the groups of the version 1 keys are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import GlobalContext, GlobalStage, param, put_column, reject
from warren.stages.duplicates import PROVENANCE_COLUMNS, put_duplicates
from warren.stages.images import decode_image
from warren.stages.schema import column_type
from warren.stages.shuffle import map_groups

KEY_COLUMN = "_exact_key"
IMAGE_HASH_COLUMN = "image_sha256"
PIXEL_HASH_COLUMN = "pixel_hash"
CAPTION_HASH_COLUMN = "caption_hash"
#: Hash column written for each part of a key.
PART_COLUMNS = {
    "image": IMAGE_HASH_COLUMN,
    "pixels": PIXEL_HASH_COLUMN,
    "caption": CAPTION_HASH_COLUMN,
}
KEYS = ("image", "pixels", "caption", "image+caption", "pixels+caption")
CAPTION_NORMS = ("casefold", "whitespace", "exact")
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class ExactDedupParams:
    key: str = param(
        "image",
        "what must match: 'image' (image file bytes), 'pixels' (decoded pixels: lossless "
        "re-encodes match), 'caption' (normalised caption), or 'image+caption', 'pixels+caption'",
    )
    caption_norm: str = param(
        "casefold",
        "caption normalisation before hashing: 'casefold' (NFKC, case folded, whitespace "
        "collapsed), 'whitespace' (NFKC, whitespace collapsed) or 'exact' (as stored)",
    )


def key_parts(key: str) -> tuple[str, ...]:
    return tuple(key.split("+"))


def normalise_caption(text: str | None, norm: str = "casefold") -> str:
    """The caption as compared under `norm` (see the module docstring); None becomes ""."""
    if text is None:
        return ""
    if norm == "exact":
        return text
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    return text.casefold() if norm == "casefold" else text


def caption_hash(text: str | None, norm: str = "casefold") -> str:
    return hashlib.sha256(normalise_caption(text, norm).encode()).hexdigest()


def _record(tag: bytes, payload: bytes) -> bytes:
    # Length-prefixed so that no concatenation of records can be mistaken for another.
    return tag + len(payload).to_bytes(8, "little") + payload


def _file_record(img: dict) -> bytes:
    data = img.get("bytes")
    if data:
        return _record(b"\x00bytes", data)
    return _record(b"\x00path", (img.get("path") or "").encode())


def image_sha256(images: list[dict]) -> str:
    """`image_sha256` of a row's images (see the module docstring)."""
    if len(images) == 1 and images[0].get("bytes"):
        return hashlib.sha256(images[0]["bytes"]).hexdigest()
    h = hashlib.sha256()
    for img in images:
        h.update(_file_record(img))
    return h.hexdigest()


def pixel_record(data: bytes | None) -> bytes | None:
    """Mode, size and RGB bytes of an image as `decode_image` shows it; None when it cannot be
    decoded."""
    if not data:
        return None
    try:
        pixels = decode_image(data)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - untrusted bytes: any decoder failure means "not decodable"
        return None
    head = b"RGB" + pixels.width.to_bytes(4, "little") + pixels.height.to_bytes(4, "little")
    return head + pixels.tobytes()


def pixel_hash(images: list[dict]) -> str:
    """`pixel_hash` of a row's images (see the module docstring)."""
    records = []
    for img in images:
        pixels = pixel_record(img.get("bytes"))
        records.append(_record(b"\x00pixels", pixels) if pixels is not None else _file_record(img))
    if len(records) == 1:
        return hashlib.sha256(records[0]).hexdigest()
    h = hashlib.sha256()
    for r in records:
        h.update(hashlib.sha256(r).digest())
    return h.hexdigest()


def content_key(table: pa.Table, key: str, caption_norm: str = "casefold") -> pa.Table:
    """Append the hash column of each part of `key` and the combined grouping key (KEY_COLUMN).

    The grouping key is null for rows that are no one's duplicate (key `caption` alone, empty
    caption); `resolve_group` keeps such rows.
    """
    parts = key_parts(key)
    n = table.num_rows
    images = table.column("images").to_pylist() if key != "caption" else [None] * n
    captions = table.column("caption").to_pylist()
    columns: dict[str, list[str | None]] = {PART_COLUMNS[p]: [] for p in parts}
    keys: list[str | None] = []
    for imgs, cap in zip(images, captions, strict=True):
        combined = hashlib.sha256()
        for part in parts:
            if part == "caption":
                if key == "caption" and not normalise_caption(cap, caption_norm).strip():
                    value = None
                else:
                    value = caption_hash(cap, caption_norm)
            elif not imgs:
                value = None
            else:
                value = image_sha256(imgs) if part == "image" else pixel_hash(imgs)
            columns[PART_COLUMNS[part]].append(value)
            combined.update(f"\x1e{part}:{value}".encode())
        if "caption" not in parts and not imgs:
            # A row without images is identified by its caption, as in version 1.
            combined.update(b"\x1ecaption:" + caption_hash(cap, caption_norm).encode())
        no_identity = key == "caption" and columns[CAPTION_HASH_COLUMN][-1] is None
        keys.append(None if no_identity else combined.hexdigest())
    for name, values in columns.items():
        table = put_column(table, name, pa.array(values, pa.string()))
    return put_column(table, KEY_COLUMN, pa.array(keys, pa.string()))


def resolve_group(group: pa.Table, key: str = "image") -> pa.Table:
    """Keep one row of a duplicate group (the first with the smallest id), reject the others.

    Rows with a null grouping key arrive as one group of their own and are all kept.
    """
    return resolve_partition(group, [(0, group.num_rows)], key)


def resolve_partition(
    table: pa.Table, bounds: list[tuple[int, int]], key: str = "image"
) -> pa.Table:
    """`resolve_group` for every group of a key-sorted partition at once: groups of one row (most
    of them) cost nothing, and the rejections are marked in one `reject` call."""
    n = table.num_rows
    mask = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    kept_ids: list[str] = []
    if n:
        ids = table.column("id").to_pylist()
        valid = pc.is_valid(table.column(KEY_COLUMN)).to_numpy(zero_copy_only=False)
        what = "" if key == "image" else f"{key} "
        for a, b in bounds:
            if b - a < 2 or not valid[a]:
                continue
            keep_at = min(range(a, b), key=lambda i: (ids[i], i))
            reason = f"exact_dedup: duplicate ({what}of {ids[keep_at]})"
            for i in range(a, b):
                if i != keep_at:
                    mask[i], reasons[i] = True, reason
                    kept_ids.append(ids[keep_at])
    # exact copies: similarity 1.0 (np.flatnonzero lists the rows in the order marked above)
    rows = np.flatnonzero(mask)
    out = put_duplicates(table, rows, kept_ids, np.ones(len(rows), np.float32))
    return reject(out, mask, reasons).drop_columns([KEY_COLUMN])


class ExactDedup(GlobalStage):
    """Exact duplicates by content hash (file bytes, decoded pixels, caption); one row per group."""

    name = "exact_dedup"
    # 3: pixel hashes of the picture as stages.images shows it (composited, oriented).
    version = "3"
    Params = ExactDedupParams

    def added_columns(self) -> dict[str, Any]:
        names = [PART_COLUMNS[part] for part in key_parts(self.params.key)]
        return {name: column_type(name) for name in (*names, *PROVENANCE_COLUMNS)}

    def check_params(self) -> None:
        if self.params.key not in KEYS:
            raise ValueError(f"exact_dedup: key must be one of {KEYS}, got {self.params.key!r}")
        if self.params.caption_norm not in CAPTION_NORMS:
            raise ValueError(
                f"exact_dedup: caption_norm must be one of {CAPTION_NORMS}, "
                f"got {self.params.caption_norm!r}"
            )

    # The hashes are computed per piece from the image bytes and the caption; only they (and the
    # ids) take part in the grouping.
    prepares = True

    def decision_columns(self) -> tuple[str, ...]:
        return ("caption",) if self.params.key == "caption" else ("images", "caption")

    def prepare(self, table: pa.Table) -> pa.Table:
        p = self.params
        keyed = content_key(table, p.key, p.caption_norm)
        return keyed.drop_columns([c for c in ("images", "caption") if c in keyed.column_names])

    def run(self, ds, ctx: GlobalContext):
        return map_groups(
            ds,
            KEY_COLUMN,
            resolve_partition,
            fn_args=(self.params.key,),
            whole_partitions=True,
            num_partitions=ctx.partitions(),
            num_rows=ctx.num_rows,
            num_cpus=ctx.num_cpus,
            checkpoint=ctx.checkpoint,
        )


__all__ = [
    "ExactDedup",
    "ExactDedupParams",
    "caption_hash",
    "content_key",
    "image_sha256",
    "normalise_caption",
    "pixel_hash",
    "resolve_group",
]
