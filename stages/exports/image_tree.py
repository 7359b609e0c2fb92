"""The image tree of the LLaVA and ShareGPT exports, and the loop both exports share.

Images are written under the export folder at their relative `images[].path`, next to the JSON
file, so reading the export with `image_root` = the export folder (the `llava_json` reader's
default) gives every row its path back. The rules:

- An image with no path gets `images/<sanitised id>-<k>.<ext>` (`k` its index in the row, the id
  with every character outside `A-Za-z0-9._-` turned into `_`, the extension from the image's
  format as PIL reads it from the bytes).
- Rows that name the same path with identical bytes share one file.
- The same path with different bytes: the later image is written at the path with
  `.<first 8 hex digits of the bytes' sha1>` put before the extension (`a/cat.png` ->
  `a/cat.1f2e3d4c.png`), and that row's path in the export is the new one. This, and the next
  rule, are the only cases where an exported path differs from the row's.
- A path that would be taken for one of the export's own data files (a top-level name of the
  export's JSON files or of a `datasets` folder's marker files, or any name ending in `.json` /
  `.jsonl`, which a reader of the folder would take for data) is treated as a missing path.
- A path that is absolute or leaves the folder (`..`) is never written: ExportError, telling the
  user to run the `export_check` stage first, which rejects such rows with a reason. The exporter
  is not the validator; it refuses what it cannot write faithfully.
- An image without bytes is an ExportError for the same reason.

The path-to-digest table is kept in memory (about 100 bytes per distinct path).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Callable

from PIL import Image

from warren.stages.exports.base import (
    ExportError,
    ExportReport,
    JsonListWriter,
    Skipped,
    SkipRow,
    StagedFolder,
    StageFolder,
    write_json,
)
from warren.stages.exports.caption import CaptionTemplate, turns_of
from warren.stages.readers.llava_json import safe_relative_path
from warren.stages.shards import Location

# Names a reader of the export folder looks at: warren's JSON files and the files that make
# `detect_format` take a folder for a `datasets` save_to_disk folder.
RESERVED_NAMES = frozenset(
    {"llava.json", "data.json", "dataset_info.json", "state.json", "dataset_dict.json"}
)
DATA_SUFFIXES = (".json", ".jsonl")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "JPEG2000": "jp2"}
MAX_STEM = 100


def sanitised_id(row_id: str) -> str:
    """A file-name-safe stem for a row id; long ids are cut and keep a hash so they stay distinct."""
    stem = _UNSAFE_CHARS.sub("_", row_id) or "_"
    if len(stem) > MAX_STEM:
        stem = f"{stem[:80]}-{hashlib.sha1(row_id.encode()).hexdigest()[:12]}"
    return stem


def image_extension(data: bytes) -> str:
    """The file extension of an image's format, read from its bytes ("bin" when PIL cannot tell)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except Exception:  # noqa: BLE001 - any bytes: an unknown format is not an error here
        return "bin"
    if fmt in _EXTENSIONS:
        return _EXTENSIONS[fmt]
    if not fmt:
        return "bin"
    registered = [e for e, f in Image.registered_extensions().items() if f == fmt]
    return registered[0].lstrip(".") if registered else fmt.lower()


def _with_digest(path: str, hexdigest: str) -> str:
    stem, ext = posixpath.splitext(path)
    return f"{stem}.{hexdigest[:8]}{ext}"


class ImageTree:
    """Writes each distinct (path, bytes) once under `root`; `place` returns the exported path."""

    def __init__(self, root: Location) -> None:
        self.root = root
        self.digests: dict[str, bytes] = {}  # written path -> sha1 of its bytes
        self.dirs: set[str] = set()  # folders that written paths live in
        self.written = self.shared = self.changed = 0

    def place(self, row_id: str, k: int, count: int, image: dict | None) -> str:
        where = f"row {row_id!r}, image {k + 1} of {count}"
        data = (image or {}).get("bytes")
        if not data:
            state = "null" if data is None else "empty"
            raise ExportError(
                f"{where}: {state} bytes; run the export_check stage before exporting "
                "(it rejects rows whose images do not decode)"
            )
        original = (image or {}).get("path")
        rel = None
        if original is not None:
            rel = safe_relative_path(original)
            if rel is None:
                raise ExportError(
                    f"{where}: path {original!r} is absolute or leaves the export folder; run the "
                    "export_check stage before exporting (it rejects such rows)"
                )
            if self._reserved(rel):
                rel = None
        changed = original is not None and rel is None
        if rel is None:
            rel = f"images/{sanitised_id(row_id)}-{k}.{image_extension(data)}"
        digest = hashlib.sha1(data)
        for candidate in (rel, _with_digest(rel, digest.hexdigest())):
            known = self.digests.get(candidate)
            if known == digest.digest():
                self.shared += 1
                self.changed += changed or candidate != rel
                return candidate
            if known is None and not self._blocked(candidate):
                self._write(candidate, data, digest.digest())
                self.changed += changed or candidate != rel
                return candidate
        raise ExportError(
            f"{where}: cannot place the image at {rel!r}: that path and its disambiguated form are "
            "taken by other files (or one is a folder of the other)"
        )

    @staticmethod
    def _reserved(rel: str) -> bool:
        first = rel.split("/", 1)[0].lower()
        return first in RESERVED_NAMES or rel.lower().endswith(DATA_SUFFIXES)

    def _blocked(self, rel: str) -> bool:
        """A path that is a folder of written files, or lies under a written file."""
        if rel in self.dirs:
            return True
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self.digests for i in range(1, len(parts)))

    def _write(self, rel: str, data: bytes, digest: bytes) -> None:
        parts = rel.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if parents and parents[-1] not in self.dirs:
            self.root.join(parents[-1]).mkdir()
        self.dirs.update(parents)
        with self.root.fs.open_output_stream(self.root.join(rel).path) as f:
            f.write(data)
        self.digests[rel] = digest
        self.written += 1


def export_with_image_tree(
    src: StageFolder,
    dest: str,
    fmt: str,
    file_name: str,
    make_item: Callable[[dict, list[dict], list[str]], dict],
    overwrite: bool,
    template: CaptionTemplate,
    extra_files: dict[str, object] | None = None,
) -> ExportReport:
    """Write the image tree and a JSON list of `make_item(row, turns, exported paths)` into
    `dest`; `turns` are the row's conversations or its caption as LLaVA's pretraining pair
    (`caption.turns_of`). Rows with neither are counted by reason, and their images not written."""
    skipped = Skipped()
    given = captions = 0
    with StagedFolder(dest, overwrite, src.location) as staged:
        tree = ImageTree(staged.path)
        writer = JsonListWriter(staged.path.join(file_name))
        try:
            for rows in src.batches():
                for row in rows:
                    given += 1
                    try:
                        turns = turns_of(row, template)
                    except SkipRow as skip:
                        skipped.add(skip.reason, row["id"])
                        continue
                    captions += not row.get("conversations")
                    images = row.get("images") or []
                    paths = [
                        tree.place(row["id"], k, len(images), image)
                        for k, image in enumerate(images)
                    ]
                    writer.add(make_item(row, turns, paths))
        finally:
            writer.close()
        skipped.check_any_written(fmt, src.location, writer.count, given)
        for name, obj in (extra_files or {}).items():
            write_json(staged.path.join(name), obj)
        files, size = staged.totals()
    return ExportReport(
        format=fmt,
        dest=staged.dest.uri,
        rows=writer.count,
        images=tree.written,
        bytes=size,
        files=files,
        images_shared=tree.shared,
        paths_changed=tree.changed,
        given=given,
        captions=captions,
        skipped=dict(skipped.counts),
        skipped_lines=skipped.lines(),
    )
