"""Ingest as a stage: `ReaderStage(reader)` is stage 0 of every run, folder `00-ingest`.

It reads the input through a reader (`stages.readers.base.Reader`) into canonical rows, one task
per read unit, then gives every row a unique id (`stages.unique_ids`: a repeated id is rejected,
or suffixed with `--on-duplicate-id suffix`). Its cache identity is the one ingest always had
(`{"stage": "ingest", "ids": mode}` over the reader's fingerprint of the input), and its manifest
records the reader's description as its parameters, so run folders written before ingest was a
stage keep their meaning.

Its added columns are the core columns, `edits`, and what the input is known to carry: a reader
whose `known_columns()` can tell from the input's metadata (the Parquet reader, from footers only)
says so; one that cannot tell leaves `adds_unknown` true, and the column check then trusts the
input for columns no stage adds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from warren.stages import unique_ids
from warren.stages.base import Resources, Stage, stable_hash
from warren.stages.readers.base import Reader, ReadUnit
from warren.stages.schema import CORE_FIELDS, EDITS_COLUMN, KNOWN_TYPES, REJECT_COLUMN

#: The name (and folder `00-ingest`) of the reader stage; no other stage may take it.
INGEST = "ingest"


class ReaderStage(Stage):
    """Stage 0 of a run: the input read into canonical rows with unique ids."""

    name = INGEST
    version = "1"
    kind: ClassVar[str] = "reader"
    # One read task per unit, each on a whole CPU (a reader decodes and hashes images).
    resources = Resources(num_cpus=1.0)

    def __init__(self, reader: Reader, on_duplicate_id: str = "reject") -> None:
        super().__init__()
        unique_ids.check_mode(on_duplicate_id)
        self.reader = reader
        self.on_duplicate_id = on_duplicate_id
        self._units: list[ReadUnit] | None = None
        self._known: dict[str, pa.DataType] | None = None

    def plan(self) -> list[ReadUnit]:
        """The reader's read units, planned once on the driver (it lists the input and reads what
        metadata the reader needs, e.g. Parquet footers) and reused."""
        if self._units is None:
            self._units = self.reader.plan()
        return self._units

    def input_fingerprint(self) -> str:
        """What ingest reads: the reader's view of the input files and options."""
        return self.reader.fingerprint()

    def cache_identity(self) -> dict[str, Any]:
        """What the stage is, for its fingerprint: the same as ingest's before it was a stage."""
        return {"stage": INGEST, "ids": self.on_duplicate_id}

    @property
    def params_hash(self) -> str:
        return stable_hash(self.reader.describe())

    @property
    def adds_unknown(self) -> bool:
        """True when the reader cannot tell which columns beyond the core ones its rows carry."""
        return self._input_columns() is None

    def _input_columns(self) -> dict[str, pa.DataType] | None:
        if not self.reader.KNOWS_COLUMNS:
            return None
        if self._known is None:
            self.plan()
            known = self.reader.known_columns()
            if known is None:
                return None
            self._known = known
        return self._known

    def added_columns(self) -> dict[str, Any]:
        """The core columns, `edits`, `original_id` when ids are suffixed, and the input's own
        columns when the reader can tell them (see `adds_unknown`)."""
        columns: dict[str, Any] = {f.name: f.type for f in CORE_FIELDS}
        columns[EDITS_COLUMN] = KNOWN_TYPES[EDITS_COLUMN]
        if self.on_duplicate_id == "suffix":
            columns[unique_ids.ORIGINAL_ID_COLUMN] = pa.string()
        for name, type_ in (self._input_columns() or {}).items():
            if name != REJECT_COLUMN:
                columns.setdefault(name, type_)
        return columns

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(kind=self.kind, params=self.reader.describe(), adds_unknown=self.adds_unknown)
        return out

    def __repr__(self) -> str:
        return f"ReaderStage({self.reader.format}: {self.reader.uri})"
