"""Reader for the official COCO annotation files: `captions_<split>.json` (+ `instances_<split>.json`).

One canonical row per image of the captions file:

- `id` = `coco-<image_id>`; `images` = one image, `path` = the COCO `file_name`, `bytes` read
  from option `image_root`;
- `caption` = the image's first caption, `captions` (list<string>) = all of them in file order;
- `boxes` (list<struct<category, x0, y0, x1, y1: float32>>) = the instances of option
  `instances`, COCO's pixel `[x, y, w, h]` turned into corners normalised by the image's width
  and height and clipped to [0, 1] (COCO boxes overshoot the border by a fraction of a pixel);
  crowd regions are kept, as LLaVA did. Empty when the image has no instances or no instances
  file was given;
- `width`, `height` from the annotation file; `url` = `coco_url` (else `flickr_url`); `license` =
  the name of the image's entry in `licenses`.

The input (`uri`) is the captions file, or a folder holding exactly one `captions_*.json` (for
example the COCO root with `annotations/`). Options: `instances` (path or URI of the instances
file, optional), `image_root` (default: `<root>/<split>` when that folder exists next to the
annotations folder, as in the official layout, else the folder holding the captions file),
`chunk_size` (images per unit, default 1000), `source` (default: `coco`).

Rejections (rows kept with a `_reject` reason): `coco: image has no captions (image_id N)`,
`coco: image path escapes root (<file_name>)`, `coco: image not found (<file_name>)`,
`coco: image unreadable (...)`, `coco: bad image size (...)` (boxes cannot be normalised),
`coco: bad record (captions_x.json image_id N: text is not valid UTF-8: lone surrogate)` (a
caption JSON can spell but UTF-8 cannot hold).

An annotation whose `image_id` is not among the file's images is an `InputError` raised by
`plan()`: the official files never have one, so it means an instances file from another split
(or a truncated file), which would otherwise turn a whole run into rejected rows.

`plan()` parses both files once on the driver (`json.loads`; the official train2017 files take a
few GB) and groups annotations by image straight into the per-unit column lists, which the runner
ships to the read tasks; `read()` only loads image bytes, so parsing is never repeated per task.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from warren.stages.base import stable_hash
from warren.stages.readers.base import InputError, Reader, ReadUnit, positive_int_option
from warren.stages.readers.columns import file_uri, finish, list_input_files, table_from_rows
from warren.stages.readers.llava_json import safe_relative_path
from warren.stages.schema import REJECT_COLUMN
from warren.stages.shards import Location

READER = "coco"
DEFAULT_CHUNK_SIZE = 1000
CAPTIONS_FILE = re.compile(r"^captions_([^/]*)\.json$", re.IGNORECASE)

BOX_TYPE = pa.struct(
    [
        pa.field("category", pa.string()),
        pa.field("x0", pa.float32()),
        pa.field("y0", pa.float32()),
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
    ]
)
EXTRA_FIELDS = (
    pa.field("captions", pa.list_(pa.string())),
    pa.field("boxes", pa.list_(BOX_TYPE)),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
)
_BOX_KEYS = ("category", "x0", "y0", "x1", "y1")


def is_captions_file(path: str) -> bool:
    """True for a file named like COCO's `captions_<split>.json` (used by format detection)."""
    return CAPTIONS_FILE.match(path.rsplit("/", 1)[-1]) is not None


def normalised_box(bbox: Any, width: Any, height: Any) -> tuple[float, float, float, float]:
    """COCO pixel `[x, y, w, h]` -> `(x0, y0, x1, y1)` in [0, 1]; ValueError naming what is wrong."""
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        raise ValueError(f"bbox {bbox!r} has non-numeric values")
    x, y, w, h = bbox

    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    return (clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height))


def _valid_size(width: Any, height: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))


class CocoReader(Reader):
    """COCO `captions_*.json` (+ optional `instances_*.json`) with images under `image_root`."""

    format = READER
    OPTIONS = ("instances", "image_root", "chunk_size", "source")

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        if "source" not in options:
            self.source = READER
        self.chunk_size = positive_int_option(
            self.format, options, "chunk_size", DEFAULT_CHUNK_SIZE
        )
        for name in ("instances", "image_root"):
            value = options.get(name)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise InputError(f"{self.format}: option {name} must be a path, got {value!r}")
        instances = options.get("instances")
        self.instances = Location.of(str(instances)) if instances else None
        root = options.get("image_root")
        self.image_root = Location.of(str(root)) if root else None

    # ---------------------------------------------------------------- plan

    def _captions_path(self) -> str:
        files = list_input_files(self.format, self.location, (".json",), "JSON files")
        if len(files) == 1 and self.location.fs.get_file_info(self.location.path).is_file:
            return files[0].path
        found = [f.path for f in files if is_captions_file(f.path)]
        if len(found) != 1:
            detail = ", ".join(p.rsplit("/", 1)[-1] for p in found) or "none"
            raise InputError(
                f"{self.format}: {self.location.uri}: expected exactly one captions_*.json, "
                f"found {detail}; pass the captions file itself"
            )
        return found[0]

    def _default_root(self, captions: str) -> Location:
        folder = captions.rsplit("/", 1)[0] or "/"
        match = CAPTIONS_FILE.match(captions.rsplit("/", 1)[-1])
        if match:
            # Official layout: coco/annotations/captions_val2017.json next to coco/val2017/.
            parent = folder.rsplit("/", 1)[0] or "/"
            official = Location(self.location.fs, f"{parent.rstrip('/')}/{match.group(1)}")
            if official.is_dir():
                return official
        return Location(self.location.fs, folder)

    def _load(self, loc: Location, what: str) -> dict:
        try:
            data = json.loads(loc.read_bytes())
        except FileNotFoundError as exc:
            raise InputError(f"{self.format}: {what} file {loc.uri}: not found") from exc
        except (ValueError, OSError) as exc:
            raise InputError(f"{self.format}: {what} file {loc.uri}: invalid JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise InputError(
                f"{self.format}: {what} file {loc.uri}: not a COCO annotation file "
                "(expected an object with 'images' and 'annotations')"
            )
        return data

    def plan(self) -> list[ReadUnit]:
        captions_path = self._captions_path()
        captions_loc = Location(self.location.fs, captions_path)
        root = self.image_root or self._default_root(captions_path)
        if not root.is_dir():
            raise InputError(f"{self.format}: image_root {root.uri} is not a directory")
        data = self._load(captions_loc, "captions")
        where = file_uri(self.location.fs, captions_path)
        licenses = {
            lic.get("id"): lic.get("name")
            for lic in data.get("licenses") or []
            if isinstance(lic, dict)
        }
        images = data.get("images")
        if not isinstance(images, list) or not all(
            isinstance(im, dict) and isinstance(im.get("id"), int) for im in images
        ):
            raise InputError(f"{self.format}: {where}: 'images' must be a list of objects with ids")
        images = sorted(images, key=lambda im: im["id"])
        # image_id -> (unit options, position in the unit): annotations go straight to their rows.
        slot: dict[int, tuple[dict, int]] = {}
        chunks: list[dict] = []
        for start in range(0, len(images), self.chunk_size):
            chunk = images[start : start + self.chunk_size]
            opts: dict[str, Any] = {
                "image_root": root.uri,
                "image_ids": [im["id"] for im in chunk],
                "file_names": [im.get("file_name") for im in chunk],
                "widths": [im.get("width") for im in chunk],
                "heights": [im.get("height") for im in chunk],
                "urls": [im.get("coco_url") or im.get("flickr_url") for im in chunk],
                "licenses": [licenses.get(im.get("license")) for im in chunk],
                "captions": [[] for _ in chunk],
                "boxes": [[] for _ in chunk],
            }
            for pos, im in enumerate(chunk):
                if im["id"] in slot:
                    raise InputError(f"{self.format}: {where}: image id {im['id']} listed twice")
                slot[im["id"]] = (opts, pos)
            chunks.append(opts)
        for ann in data["annotations"]:
            opts, pos = self._slot(slot, ann, where)
            text = ann.get("caption")
            if isinstance(text, str) and text.strip():
                opts["captions"][pos].append(text.strip())
        del data, images
        if self.instances is not None:
            self._add_boxes(slot)
        units = []
        for i, opts in enumerate(chunks):
            key = f"chunk-{i:05d}-{stable_hash(opts['image_ids'])[:8]}"
            units.append(ReadUnit(key, captions_path, opts))
        return units

    def _slot(self, slot: dict, ann: Any, where: str) -> tuple[dict, int]:
        if not isinstance(ann, dict):
            raise InputError(f"{self.format}: {where}: annotation {ann!r} is not an object")
        found = slot.get(ann.get("image_id"))
        if found is None:
            raise InputError(
                f"{self.format}: {where}: annotation {ann.get('id')!r} points to image_id "
                f"{ann.get('image_id')!r}, which is not among the captions file's images "
                "(are the captions and instances files from the same split?)"
            )
        return found

    def _add_boxes(self, slot: dict) -> None:
        assert self.instances is not None
        data = self._load(self.instances, "instances")
        where = self.instances.uri
        names = {
            c.get("id"): c.get("name") for c in data.get("categories") or [] if isinstance(c, dict)
        }
        for ann in data["annotations"]:
            opts, pos = self._slot(slot, ann, where)
            name = names.get(ann.get("category_id"))
            if not isinstance(name, str):
                raise InputError(
                    f"{self.format}: {where}: annotation {ann.get('id')!r} has category_id "
                    f"{ann.get('category_id')!r}, which is not in 'categories'"
                )
            width, height = opts["widths"][pos], opts["heights"][pos]
            if not _valid_size(width, height):
                continue  # the row is rejected for its size in read(); nothing to normalise by
            try:
                corners = normalised_box(ann.get("bbox"), width, height)
            except ValueError as exc:
                raise InputError(
                    f"{self.format}: {where}: annotation {ann.get('id')!r}: {exc}"
                ) from exc
            opts["boxes"][pos].append([name, *corners])

    # ---------------------------------------------------------------- read

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        opts = unit.options
        root = Location.of(opts["image_root"])
        rows = [
            self._row(root, *fields)
            for fields in zip(
                opts["image_ids"],
                opts["file_names"],
                opts["widths"],
                opts["heights"],
                opts["urls"],
                opts["licenses"],
                opts["captions"],
                opts["boxes"],
                strict=True,
            )
        ]
        where = file_uri(self.location.fs, unit.path)
        table = table_from_rows(rows, EXTRA_FIELDS, unit.path.rsplit("/", 1)[-1], READER)
        yield finish(table, self.source, "source" in self.options, where, self.format)

    @staticmethod
    def _row(
        root: Location,
        image_id: int,
        file_name: Any,
        width: Any,
        height: Any,
        url: Any,
        license: Any,
        captions: list[str],
        boxes: list[list],
    ) -> dict:
        row: dict[str, Any] = {
            "id": f"{READER}-{image_id}",
            "_record": f"image_id {image_id}",
            "images": [],
            "caption": captions[0] if captions else None,
            "captions": captions,
            "boxes": [dict(zip(_BOX_KEYS, b, strict=True)) for b in boxes],
            "url": url if isinstance(url, str) else None,
            "license": license if isinstance(license, str) else None,
        }
        if _valid_size(width, height):
            row["width"], row["height"] = width, height
        reject = None
        rel = safe_relative_path(file_name) if isinstance(file_name, str) else None
        if rel is None:
            reject = f"{READER}: image path escapes root ({file_name!r})"
        else:
            row["images"] = [{"bytes": None, "path": rel}]
            try:
                row["images"][0]["bytes"] = root.join(rel).read_bytes()
            except FileNotFoundError:
                reject = f"{READER}: image not found ({rel})"
            except OSError as exc:
                reject = f"{READER}: image unreadable ({rel}: {exc})"
        if not _valid_size(width, height):
            reject = reject or f"{READER}: bad image size ({width!r} x {height!r})"
        if not captions:
            reject = reject or f"{READER}: image has no captions (image_id {image_id})"
        row[REJECT_COLUMN] = reject
        return row

    def fingerprint(self) -> str:
        """The captions input plus the instances file (its size and time), so edits re-run ingest."""
        extra = None
        if self.instances is not None:
            info = self.instances.fs.get_file_info(self.instances.path)
            extra = [self.instances.uri, info.size, info.mtime_ns]
        return stable_hash({"input": super().fingerprint(), "instances": extra})
