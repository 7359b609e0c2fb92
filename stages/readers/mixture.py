"""Reader for a mixture spec (`stages.mixture_spec`): every source it names, as one input.

    reader = get_reader("mixture", "mixtures/llava_v1_5_665k.yaml")

Each source is read by its own reader (its `format`, or the one `detect_format` picks, with its
`options`); an earlier warren output is read from the kept shards its manifest lists. Every row
gets the source's name as `source`, the source's `task` (or the inferred one, see
`stages.mixture_spec.infer_tasks`; rows that already have a task keep it) as `task`, and, unless the spec says `prefix_ids: false`, an
id prefixed with `<source>/`.

A mixture is a new dataset: its rows carry the canonical columns (`id`, `images`, `caption`,
`conversations`, `source`, `url`, `license`) and `task`. Other columns of a source (its scores,
embeddings, extra fields) are not carried over, so that every source gives rows of one schema;
they stay in that source's own output. Rows a source's reader rejects (a missing image, a
malformed item) are rejected rows of the mixture's ingest, with the reader's reason.

A unit is one unit of one source's reader (`<source>/<unit key>`), so ingest resumes per file.
The fingerprint covers the spec's sources and every source reader's own fingerprint: editing a
source file re-reads the mixture; editing the spec's balance section does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import stable_hash
from warren.stages.mixture_spec import MixtureSpec, SourceSpec, infer_tasks, load_spec
from warren.stages.readers.base import InputError, Reader, ReadUnit
from warren.stages.readers.registry import SOURCE_READERS, make_reader
from warren.stages.run_layout import LayoutError, is_warren_output, open_stage
from warren.stages.schema import CORE_FIELDS, EDITS_COLUMN, KNOWN_TYPES, REJECT_COLUMN, conform
from warren.stages.shards import Location

READER = "mixture"
MIXTURE_COLUMNS = [f.name for f in CORE_FIELDS] + ["task", EDITS_COLUMN]


def warren_output_files(loc: Location) -> list[str] | None:
    """The kept shard URIs of an earlier warren output (a run folder's final stage, or a stage
    folder), or None when `loc` is neither."""
    if not is_warren_output(loc):
        return None
    try:
        return open_stage(loc).uris()
    except LayoutError as exc:
        raise InputError(f"{READER}: {exc}") from exc


class MixtureReader(Reader):
    """The sources of a mixture spec (YAML), read by their own readers into one input."""

    format = READER
    OPTIONS = ()

    def __init__(self, uri: str, spec: MixtureSpec | None = None, **options: Any) -> None:
        super().__init__(uri, **options)
        try:
            self.spec = spec or load_spec(self.uri)
        except ValueError as exc:  # SpecError: the message names the file and key already
            raise InputError(str(exc)) from exc
        self.readers: dict[str, list[Reader]] = {
            s.name: self._source_readers(s) for s in self.spec.sources
        }

    def _source_readers(self, source: SourceSpec) -> list[Reader]:
        where = f"{READER}: source {source.name}"
        loc = Location.of(source.path)
        if not loc.exists():
            raise InputError(f"{where}: {loc.uri}: no such file or directory")
        try:
            files = warren_output_files(loc) if loc.is_dir() else None
            if files is not None:
                if source.format not in (None, "parquet"):
                    raise InputError(f"{where}: a warren output is Parquet, not {source.format}")
                return [make_reader(SOURCE_READERS, "parquet", f, **source.options) for f in files]
            # A source is never a spec itself: the mixture reader is not among SOURCE_READERS.
            return [make_reader(SOURCE_READERS, source.format, source.path, **source.options)]
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc

    def plan(self) -> list[ReadUnit]:
        units = []
        for source in self.spec.sources:
            planned = 0
            for i, reader in enumerate(self.readers[source.name]):
                try:
                    sub_units = reader.plan()
                except InputError as exc:
                    raise InputError(f"{READER}: source {source.name}: {exc}") from exc
                for u in sub_units:
                    key = f"{source.name}/{i}/{u.key}"
                    units.append(
                        ReadUnit(
                            key,
                            u.path,
                            {"source": source.name, "reader": i, "key": u.key, **u.options},
                        )
                    )
                planned += len(sub_units)
            if not planned:
                raise InputError(f"{READER}: source {source.name}: {source.path} has no rows")
        return units

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        options = dict(unit.options)
        name, index, key = options.pop("source"), options.pop("reader"), options.pop("key")
        source = next(s for s in self.spec.sources if s.name == name)
        reader = self.readers[name][index]
        for table in reader.read(ReadUnit(key, unit.path, options)):
            yield self._as_mixture_rows(table, source)

    def _as_mixture_rows(self, table: pa.Table, source: SourceSpec) -> pa.Table:
        n = table.num_rows
        ids = table.column("id").cast(pa.string())
        if self.spec.prefix_ids:
            ids = pc.binary_join_element_wise(pa.array([source.name] * n, pa.string()), ids, "/")
        if source.task:
            task = pa.array([source.task] * n, pa.string())
        elif "task" in table.column_names:  # an earlier mixture's rows keep their task
            task = pc.coalesce(table.column("task").cast(pa.string()), infer_tasks(table))
        else:
            task = infer_tasks(table)
        columns = {
            "id": ids,
            **{
                c: table.column(c)
                for c in MIXTURE_COLUMNS
                if c not in ("id", "source", "task")
                if c != EDITS_COLUMN
            },
            # the edits its reader made (an earlier warren output may have none)
            EDITS_COLUMN: table.column(EDITS_COLUMN)
            if EDITS_COLUMN in table.column_names
            else pa.nulls(n, KNOWN_TYPES[EDITS_COLUMN]),
            "source": pa.array([source.name] * n, pa.string()),
            "task": task,
            REJECT_COLUMN: table.column(REJECT_COLUMN)
            if REJECT_COLUMN in table.column_names
            else pa.nulls(n, pa.string()),
        }
        return conform(pa.table(columns), where=f"{READER}: source {source.name}")

    def fingerprint(self) -> str:
        return stable_hash(
            {
                "format": self.format,
                "sources": [
                    {
                        "name": s.name,
                        "path": s.path,
                        "format": s.format,
                        "options": s.options,
                        "task": s.task,
                        "readers": [r.fingerprint() for r in self.readers[s.name]],
                    }
                    for s in self.spec.sources
                ],
                "prefix_ids": self.spec.prefix_ids,
            }
        )

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "uri": self.uri,
            "sources": {
                s.name: {"path": s.path, "format": s.format, "options": s.options, "task": s.task}
                for s in self.spec.sources
            },
        }


__all__ = ["MIXTURE_COLUMNS", "MixtureReader", "warren_output_files"]
