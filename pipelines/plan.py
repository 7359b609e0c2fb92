"""A pipeline and its plan: the ordered stages a recipe declares, checked before any work.

A run's plan is the reader stage (`stages.readers.stage.ReaderStage`, folder `00-ingest`)
followed by the pipeline's stages, folder `NN-<name>` each (`stages.run_layout.stage_folder`).
`check_columns` walks a plan without Ray: every column a stage requires must be a core column,
one the reader stage adds, or one an earlier stage adds; `warren describe` calls it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from warren.pipelines.run_errors import PipelineError
from warren.stages.base import BatchStage, GlobalStage, Stage, stable_hash
from warren.stages.readers.stage import INGEST, ReaderStage
from warren.stages.run_layout import stage_folder
from warren.stages.schema import CORE_FIELDS, EDITS_COLUMN


@dataclasses.dataclass
class Pipeline:
    """An ordered list of stages with a name; the recipe scripts build one and call `main`."""

    name: str
    stages: list[Stage]
    description: str = ""
    # Stage parameters used only on the bundled demo pool, e.g. {"embed": {"model": DEMO_CLIP}}:
    # the recipe's own defaults stay the published ones for real data.
    demo_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        for stage_name, values in self.demo_params.items():
            if stage_name not in names:
                raise ValueError(f"pipeline {self.name}: demo_params names no stage {stage_name!r}")
            known = {
                f.name for f in dataclasses.fields(self.stages[names.index(stage_name)].params)
            }
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(
                    f"pipeline {self.name}: demo_params for {stage_name!r} name unknown "
                    f"parameters {unknown}"
                )
        if INGEST in names:
            raise ValueError(f"'{INGEST}' is reserved for the input stage")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"pipeline {self.name}: stage names {repeated} repeat; give each instance its own "
                "name with stage_name=..."
            )
        for s in self.stages:
            if not isinstance(s, (BatchStage, GlobalStage)):
                raise TypeError(f"{s!r} is neither a BatchStage nor a GlobalStage")

    def plan(self, reader_stage: ReaderStage) -> list[Stage]:
        """The stages a run executes: the reader stage first, then the pipeline's."""
        return [reader_stage, *self.stages]

    def folders(self) -> list[str]:
        names = [INGEST] + [s.name for s in self.stages]
        return [stage_folder(i, name) for i, name in enumerate(names)]

    def check(self, reader_stage: ReaderStage | None = None) -> None:
        """`check_columns` over this pipeline, with the input a run reads when one is given
        (without one, the input is taken to carry the core columns only)."""
        check_columns(self.plan(reader_stage) if reader_stage else self.stages)


def cache_identity(stage: Stage) -> dict[str, Any]:
    """What a stage is, hashed with its input into its fingerprint: name, version, parameters.
    Never its resources: a different batch size or concurrency recomputes nothing."""
    own = getattr(stage, "cache_identity", None)
    if own is not None:
        return own()
    return {"stage": stage.name, "version": stage.version, "params": stage.params_hash}


def fingerprint(stage: Stage, input_fp: str) -> str:
    return stable_hash({**cache_identity(stage), "input": input_fp})


def _core_columns() -> set[str]:
    return {f.name for f in CORE_FIELDS} | {EDITS_COLUMN}


def column_problems(
    stages: Sequence[Stage], known_stages: Iterable[type[Stage]] | None = None
) -> list[str]:
    """One message per column a stage requires that nothing before it adds.

    `stages` may begin with the reader stage: its added columns are what the input carries, and
    when the reader cannot tell (`adds_unknown`) a column no stage adds is trusted to come from
    the input. Without a reader stage the input carries the core columns only. The message names
    the stage, the column and the stages (of the pipeline, or any stage class loaded) that add it.
    """
    available = _core_columns()
    reader: ReaderStage | None = None
    problems = []
    for i, stage in enumerate(stages):
        if isinstance(stage, ReaderStage):
            reader = stage
            continue
        for column in stage.required_columns():
            # The input is asked last, and only then: the Parquet reader reads footers to tell.
            if column in available or (reader is not None and _from_input(reader, column)):
                continue
            problems.append(_missing(stage, column, stages[i + 1 :], known_stages))
        available |= set(stage.added_columns())
    return problems


def _from_input(reader: ReaderStage, column: str) -> bool:
    return reader.adds_unknown or column in reader.added_columns()


def check_columns(
    stages: Sequence[Stage], known_stages: Iterable[type[Stage]] | None = None
) -> None:
    """PipelineError naming every stage and column that `column_problems` finds; runs without
    Ray and before any folder is written."""
    problems = column_problems(stages, known_stages)
    if problems:
        raise PipelineError("; ".join(problems))


def _missing(
    stage: Stage,
    column: str,
    later: Sequence[Stage],
    known_stages: Iterable[type[Stage]] | None,
) -> str:
    text = f"{stage.name}: requires column {column!r}, which no stage before it adds"
    after = [s.name for s in later if column in s.added_columns()]
    if after:
        return text + f" (the `{after[0]}` stage adds it, but runs after it)"
    adders = sorted(
        {
            cls.name
            for cls in (known_stages if known_stages is not None else _stage_classes())
            if cls.name and column in _class_adds(cls)
        }
    )
    if adders:
        return text + " (" + " or ".join(f"the `{n}` stage" for n in adders) + " adds it)"
    return text + " (no known stage adds it; the input must carry it)"


def _class_adds(cls: type[Stage]) -> set[str]:
    """The columns a stage class adds: its `adds`, and what an instance with its default
    parameters says (a stage whose columns depend on its parameters declares them through
    `added_columns()`, e.g. embed's `image_emb`); a class that needs parameters gives its `adds`."""
    try:
        return set(cls.adds) | set(cls().added_columns())
    except Exception:  # abstract, or no defaults for its parameters: only what it declares
        return set(cls.adds)


def _stage_classes() -> list[type[Stage]]:
    """Every stage class loaded in this process (recipes import theirs)."""
    out, todo = [], list(Stage.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
