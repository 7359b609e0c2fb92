"""What a recipe is, without running it: its stages in order with their kind, version, parameters,
resources, the columns each requires and adds, and whether every required column is there.

`warren describe RECIPE` and `--describe` on any recipe print `describe_pipeline(pipeline)`. Nothing
here starts Ray or loads a model: it reads what each stage declares (`Stage.describe()`).
"""

from __future__ import annotations

from typing import Any

from warren.pipelines.plan import column_problems
from warren.stages.schema import CORE_FIELDS

#: The columns every row has after ingest.
INGEST_COLUMNS = tuple(f.name for f in CORE_FIELDS)


def _resources(resources: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        if isinstance(value, list | tuple):
            return ",".join(map(str, value))
        return "auto" if value is None else str(value)

    return " ".join(f"{k}={shown(v)}" for k, v in resources.items())


def _resources_line(d: dict[str, Any]) -> str:
    """A batch stage's resources; a global stage takes none (its Ray Data operations size
    themselves to the cluster)."""
    if d["kind"] == "batch":
        return _resources(d["resources"])
    return "sized to the cluster by its Ray Data operations"


def describe_pipeline(pipeline: Any, reader_stage: Any = None) -> str:
    """The recipe as text: a header, ingest, then each stage (index, name, version, kind) with its
    parameters, resources and columns, and the column check last: against the input a run
    reads when its `reader_stage` is given (as the run checks), else the core columns only."""
    lines = [
        f"pipeline {pipeline.name}: {pipeline.description}".rstrip(": "),
        f"  00 ingest: read the input into canonical rows ({', '.join(INGEST_COLUMNS)})",
    ]
    for i, stage in enumerate(pipeline.stages, 1):
        d = stage.describe()
        adds = ", ".join(f"{k} ({v})" for k, v in d["adds"].items()) or "-"
        lines += [
            f"  {i:02d} {d['name']} v{d['version']} ({d['kind']})",
            f"       params:    {d['params']}",
            f"       resources: {_resources_line(d)}",
            f"       requires:  {', '.join(d['requires']) or '-'}",
            f"       adds:      {adds}",
        ]
        lines += [
            f"       threshold: {t['param']} ({t['kind']}) on {t['column']} = {t['value']:g}"
            for t in d["thresholds"]
        ]
    plan = [reader_stage, *pipeline.stages] if reader_stage is not None else pipeline.stages
    problems = column_problems(plan)
    if problems:
        lines.append("columns: " + "; ".join(problems))
    else:
        lines.append("columns: ok (every column a stage requires is added before it)")
    return "\n".join(lines)


__all__ = ["INGEST_COLUMNS", "describe_pipeline"]
