"""Reader for a folder of images with sidecar captions.

`photos/cat.jpg` is captioned by `photos/cat.txt` (UTF-8, surrounding whitespace stripped) and may
have `photos/cat.json` metadata, merged into the row: `url`, `license` and `source` go to their
canonical columns; keys listed in option `metadata_columns` become string columns of their own;
all other keys stay in one `metadata` column (a JSON object string, null without a sidecar). Every
unit thus has the same columns, whatever keys its sidecars hold. Non-string values are written as
JSON. Keys that name other canonical columns (`id`, `caption`, `images`, signals) are not merged.
The `source` option, when given, wins over a sidecar's `source`.

The id is the relative path without its extension (`photos/cat`); `images[].path` is the relative
path. Images: jpg, jpeg, png, webp, gif, bmp, tif, tiff (any letter case).

Rejections: `image_folder: missing caption (<stem>.txt)`, `image_folder: caption not UTF-8
(<stem>.txt)`, `image_folder: bad metadata (<stem>.json: ...)`, `image_folder: image unreadable
(...)`, `image_folder: bad record (<image path>: text is not valid UTF-8: lone surrogate)` (a
sidecar value JSON can spell but UTF-8 cannot hold).

A unit is a chunk of up to `chunk_size` (default 1000) images in sorted path order; the chunk key
holds a hash of its paths, so adding files changes the keys of the chunks that changed. Sidecar
presence is taken from the listing done by `plan()`, so reading does not probe for missing files.
Options: `chunk_size`, `source` (default: the folder name), `metadata_columns` (list of sidecar
keys to lift into columns of their own).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from warren.stages.base import stable_hash
from warren.stages.readers.base import InputError, Reader, ReadUnit, positive_int_option
from warren.stages.readers.columns import finish, list_input_files, table_from_rows
from warren.stages.schema import KNOWN_TYPES, REJECT_COLUMN

READER = "image_folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_CHUNK_SIZE = 1000
_MERGED_CANONICAL = ("url", "license", "source")
METADATA_COLUMN = "metadata"
_NOT_MERGED = (set(KNOWN_TYPES) - set(_MERGED_CANONICAL)) | {REJECT_COLUMN}


def _stem(rel: str) -> str:
    folder, _, base = rel.rpartition("/")
    base = base.rsplit(".", 1)[0]
    return f"{folder}/{base}" if folder else base


class ImageFolderReader(Reader):
    """Images with `<stem>.txt` captions and optional `<stem>.json` metadata."""

    format = READER
    OPTIONS = ("chunk_size", "source", "metadata_columns")

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.chunk_size = positive_int_option(
            self.format, options, "chunk_size", DEFAULT_CHUNK_SIZE
        )
        lifted = options.get("metadata_columns") or []
        if isinstance(lifted, str) or not all(isinstance(k, str) for k in lifted):
            raise InputError(f"{self.format}: option metadata_columns must be a list of key names")
        bad = sorted(set(lifted) & (_NOT_MERGED | set(_MERGED_CANONICAL) | {METADATA_COLUMN}))
        if bad:
            raise InputError(f"{self.format}: metadata_columns cannot name canonical columns {bad}")
        self.metadata_columns = list(lifted)

    def plan(self) -> list[ReadUnit]:
        if not self.location.is_dir():
            raise InputError(f"{self.format}: {self.location.uri}: not a folder")
        files = list_input_files(self.format, self.location, None, "files")
        root = self.location.path.rstrip("/") + "/"
        rels = {f.path[len(root) :] for f in files}
        images = sorted(r for r in rels if r.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise InputError(
                f"{self.format}: {self.location.uri}: no images ({', '.join(IMAGE_SUFFIXES)}) found"
            )
        units = []
        for i, start in enumerate(range(0, len(images), self.chunk_size)):
            chunk = images[start : start + self.chunk_size]
            options = {
                "images": chunk,
                "txt": [f"{_stem(r)}.txt" in rels for r in chunk],
                "json": [f"{_stem(r)}.json" in rels for r in chunk],
            }
            key = f"chunk-{i:05d}-{stable_hash(chunk)[:8]}"
            units.append(ReadUnit(key, self.location.path, options))
        return units

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        opts = unit.options
        rows = [
            self._row(rel, has_txt, has_json)
            for rel, has_txt, has_json in zip(
                opts["images"], opts["txt"], opts["json"], strict=True
            )
        ]
        extra = [*self.metadata_columns, METADATA_COLUMN]
        table = table_from_rows(rows, [pa.field(k, pa.string()) for k in extra], reader=READER)
        yield finish(table, self.source, "source" in self.options, self.location.uri, self.format)

    def _row(self, rel: str, has_txt: bool, has_json: bool) -> dict:
        stem = _stem(rel)
        row: dict[str, Any] = {"id": stem, "images": [], "_record": rel}
        reject = None
        try:
            row["images"] = [{"bytes": self.location.join(rel).read_bytes(), "path": rel}]
        except OSError as exc:
            reject = f"{READER}: image unreadable ({rel}: {exc})"
        if not has_txt:
            reject = reject or f"{READER}: missing caption ({stem}.txt)"
        else:
            try:
                row["caption"] = (
                    self.location.join(f"{stem}.txt").read_bytes().decode("utf-8").strip()
                )
            except UnicodeDecodeError:
                reject = reject or f"{READER}: caption not UTF-8 ({stem}.txt)"
            except OSError as exc:
                reject = reject or f"{READER}: caption unreadable ({stem}.txt: {exc})"
        if has_json:
            try:
                meta = json.loads(self.location.join(f"{stem}.json").read_bytes())
                if not isinstance(meta, dict):
                    raise ValueError(f"expected an object, got {type(meta).__name__}")
            except (ValueError, OSError) as exc:
                meta = {}
                reject = reject or f"{READER}: bad metadata ({stem}.json: {exc})"
            rest = {}
            for key, value in meta.items():
                if key in _NOT_MERGED or value is None:
                    continue
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                if key in _MERGED_CANONICAL or key in self.metadata_columns:
                    row[key] = text
                else:
                    rest[key] = value
            if rest:
                row[METADATA_COLUMN] = json.dumps(rest, ensure_ascii=False, sort_keys=True)
        row[REJECT_COLUMN] = reject
        return row
