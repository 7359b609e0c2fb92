"""The reader contract: turn one input format into canonical rows, a unit (file or chunk) at a time.

The runner calls `plan()` once on the driver (it lists the input and fails early, naming the file,
on anything unreadable), then `read(unit)` in Ray tasks, one task per unit, so ingest resumes
unit by unit after an interruption. `read` yields conformed tables (`stages.schema.conform`);
rows that cannot become canonical rows (a missing image file, a path escaping the image root, a
caption that is not a string) are kept with a `_reject` reason instead of being dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa

from stages.base import stable_hash
from stages.shards import Location, list_files


class InputError(ValueError):
    """Input that cannot be read at all; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """One piece of input read by one task: `key` is stable across runs (used for resume)."""

    key: str
    path: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


class Reader:
    format: ClassVar[str] = ""

    def __init__(self, uri: str, **options: Any) -> None:
        self.uri = str(uri)
        self.location = Location.of(uri)
        self.options = options

    def plan(self) -> list[ReadUnit]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when the input files (paths, sizes, modification times) or options change."""
        files = [(f.path, f.size, f.mtime_ns) for f in list_files(self.location)]
        return stable_hash(
            {"format": self.format, "uri": self.uri, "options": self.options, "files": files}
        )

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "uri": self.uri, "options": self.options}
