"""The reader contract: turn one input format into canonical rows, a unit (file or chunk) at a time.

The runner calls `plan()` once on the driver (it lists the input and fails early, naming the file,
on anything unreadable), then `read(unit)` in Ray tasks, one task per unit, so ingest resumes
unit by unit after an interruption. `read` yields conformed tables (`stages.schema.conform`,
through `stages.readers.columns.finish` and `stages.readers.records`); rows that cannot become canonical rows (a missing image
file, a path escaping the image root, a caption that is not a string, text that is not UTF-8) are
kept with a `_reject` reason instead of being dropped: the reason names the file and the record,
and the row keeps its id (or a content id) and whatever could be read, so one bad record never
stops the rest of its file. `finish` applies the conversation rules (`stages.conversation`) to
every reader's rows and records each automatic edit in the `edits` column.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import pyarrow as pa

from warren.stages.base import stable_hash
from warren.stages.shards import Location, list_files


class InputError(ValueError):
    """Input that cannot be read at all; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """One piece of input read by one task: `key` is stable across runs (used for resume)."""

    key: str
    path: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


# The version of what every reader makes of its input; bump it when rows change meaning, so an
# earlier run's ingest is recomputed. 2: conversation rules and `edits` (stages.conversation),
# record-level rejections.
CONTRACT = "2"

_DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".tar", ".arrow")


def check_options(reader: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise InputError for an option the reader does not know (a typo would otherwise be ignored)."""
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(
            f"{reader}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(allowed))}"
        )


def positive_int_option(reader: str, options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{reader}: option {name} must be a positive integer, got {value!r}")
    return value


def default_source(location: Location, fallback: str) -> str:
    """The input's name: the folder name, or the file name without its data extension."""
    name = location.path.rstrip("/").rsplit("/", 1)[-1]
    if name.lower().endswith(_DATA_SUFFIXES):
        name = posixpath.splitext(name)[0]
    return name or fallback


class Reader:
    format: ClassVar[str] = ""
    #: Options this reader accepts; any other is an error (a typo would otherwise be ignored).
    OPTIONS: ClassVar[tuple[str, ...]] = ("source",)
    #: Rows per yielded table, for readers that accept a `batch_size` option.
    DEFAULT_BATCH_SIZE: ClassVar[int] = 512
    #: True when `known_columns()` can tell the input's columns after `plan()` (cheaply).
    KNOWS_COLUMNS: ClassVar[bool] = False

    def __init__(self, uri: str, **options: Any) -> None:
        self.uri = str(uri)
        self.location = Location.of(uri)
        self.options = options
        check_options(self.format, options, self.OPTIONS)
        self.source = options.get("source") or default_source(self.location, self.format)
        if "batch_size" in self.OPTIONS:
            self.batch_size = positive_int_option(
                self.format, options, "batch_size", self.DEFAULT_BATCH_SIZE
            )

    def plan(self) -> list[ReadUnit]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:  # pragma: no cover - abstract
        raise NotImplementedError

    def known_columns(self) -> dict[str, pa.DataType] | None:
        """The columns this reader's rows carry, when it can tell after `plan()` from the input's
        metadata alone (never by reading rows); None when it cannot, and the column check then
        trusts the input for a column no stage adds."""
        return None

    def fingerprint(self) -> str:
        """Changes when the input files (paths, sizes, modification times), the options or the
        rows a reader makes of them (`CONTRACT`) change."""
        files = [(f.path, f.size, f.mtime_ns) for f in list_files(self.location)]
        return stable_hash(
            {
                "format": self.format,
                "uri": self.uri,
                "options": self.options,
                "files": files,
                "contract": CONTRACT,
            }
        )

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "uri": self.uri, "options": self.options}
