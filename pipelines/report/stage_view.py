"""A run's stages as the report and `warren explain` look at them.

The run is opened through `warren.stages.run_layout` (the one owner of the on-disk layout); each
`StageFolder` is wrapped in a `StageView` that adds what only readers of the rows need: the
columns its shards have, the ones it added (those its input did not have), the thresholds its
manifest recorded, and from those the columns worth a histogram.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines.report.thresholds import RankWindow, lines, recorded, windows
from warren.stages.base import Threshold
from warren.stages.run_layout import MANIFEST, ShardFile, StageFolder, open_run
from warren.stages.schema import REASON_COLUMN, rank_column
from warren.stages.shards import Location

# The provenance of a removal, as data: the kept row a duplicate was removed in favour of, and
# how alike the two are. Null on every row they do not concern.
PROVENANCE_COLUMNS = ("duplicate_of", "similarity")
# Numeric columns that are identifiers, hashes or provenance, not scores: no histogram.
NOT_SCORES = frozenset({"phash", "cluster_id", "image_cluster", "similarity"})
# Columns holding cluster assignments: their value counts are the cluster sizes.
CLUSTER_COLUMNS = ("cluster_id", "image_cluster")


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


@dataclasses.dataclass
class StageView:
    """One completed stage folder with its columns and recorded thresholds."""

    stage: StageFolder
    schema: dict[str, pa.DataType]  # union of the kept and rejected shards' columns
    added: list[str]  # columns this stage's rows have and its input's did not
    thresholds: list[Threshold] | None  # None: the manifest predates recorded thresholds

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def folder(self) -> str:
        return self.stage.folder

    @property
    def loc(self) -> Location:
        return self.stage.loc

    @property
    def manifest(self) -> dict:
        return self.stage.manifest

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def params(self) -> dict:
        return self.stage.params

    @property
    def kept(self) -> list[ShardFile]:
        return self.stage.kept

    @property
    def rejected(self) -> list[ShardFile]:
        return self.stage.rejected

    def windows(self) -> list[RankWindow]:
        """The rank windows the stage applied (none when its thresholds were not recorded)."""
        return windows(self.thresholds or [])

    def lines(self, column: str) -> list[tuple[str, float]]:
        """(parameter, value) of each min/max threshold of the stage on `column`."""
        return lines(self.thresholds or [], column)

    def _is_rank(self, column: str) -> bool:
        return any(column == rank_column(c) for c in self.schema)

    def score_columns(self) -> list[str]:
        """Numeric columns the stage added, then the columns its thresholds bound or rank by
        (an earlier stage's, such as image_filter's bounds on image_check's width) where the
        stage's rows have them."""
        cols = [
            c
            for c in self.added
            if is_numeric(self.schema[c]) and c not in NOT_SCORES and not self._is_rank(c)
        ]
        bounded = [w.column for w in self.windows()]
        bounded += [t.column for t in self.thresholds or [] if not t.kind.startswith("rank_")]
        for c in bounded:
            if c in self.schema and c not in cols:
                cols.append(c)
        return cols

    def cluster_columns(self) -> list[str]:
        return [c for c in CLUSTER_COLUMNS if c in self.added]


def _schema_of(loc: Location, files: Sequence[ShardFile]) -> dict[str, pa.DataType]:
    if not files:
        return {}
    with loc.fs.open_input_file(files[0].path) as f:
        return {field.name: field.type for field in pq.read_schema(f)}


def read_stages(output: str | os.PathLike | Location) -> tuple[dict | None, list[StageView]]:
    """(run.json or None, every completed stage of the run in order), through `open_run`: the
    folders come from run.json when there is one, and only the shards a manifest lists are read."""
    run = open_run(output)
    views: list[StageView] = []
    previous: dict[str, pa.DataType] = {}
    for stage in run.stages:
        schema = {**_schema_of(stage.loc, stage.rejected), **_schema_of(stage.loc, stage.kept)}
        schema.pop(REASON_COLUMN, None)
        # ingest has no input to compare with: what the source had is not a stage's score.
        added = [c for c in schema if c not in previous] if stage.index and views else []
        thresholds = recorded(stage.manifest, stage.loc.join(MANIFEST).uri)
        views.append(StageView(stage, schema, added, thresholds))
        if schema:
            previous = schema
    return run.summary, views
