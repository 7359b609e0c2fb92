"""explain: the journey of one row through a run, "why was this row dropped?".

`warren explain OUTPUT ID` looks the id up stage by stage in a run's output folder (kept shards,
then `rejected/`, reading only `id`, `reason` and the columns the stage added, with a pyarrow
filter on `id`), and prints each stage it passed with the values that stage wrote (a window
stage's rank among them), the stage and reason that removed it, and, for a duplicate, its
`duplicate_of` and `similarity` columns and where the kept copy ended. Provenance is read from
those columns, never from the reason text: an output written before they existed shows no
"duplicate of" line. Stages after the removal are listed as "not in the input of this stage".
The run is read through the report's `read_stages` (`warren.stages.run_layout.open_run`).

Exit code 0 when the row was found, 1 when no stage ever saw the id, 2 when OUTPUT is not a run.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines.report.stage_view import PROVENANCE_COLUMNS, StageView, read_stages
from warren.stages.base import reason_key
from warren.stages.run_layout import ShardFile
from warren.stages.schema import REASON_COLUMN, rank_column
from warren.stages.shards import Location

# What ingest shows of a row: where it came from and what it says.
INGEST_COLUMNS = ("source", "caption")
VALUE_CHARS = 80


@dataclasses.dataclass
class Step:
    folder: str
    stage: str
    status: str  # "passed", "removed", "absent" (removed earlier), "missing" (should be here)
    values: dict[str, Any]
    reason: str | None = None


@dataclasses.dataclass
class Journey:
    id: str
    steps: list[Step]
    duplicate_of: str | None = None
    duplicate_fate: str | None = None

    @property
    def found(self) -> bool:
        return any(s.status in ("passed", "removed") for s in self.steps)

    @property
    def removed_at(self) -> Step | None:
        return next((s for s in self.steps if s.status == "removed"), None)


def _shown_columns(stage: StageView) -> list[str]:
    """Scalar columns worth printing: the ones the stage added, the ones it ranks by and their
    ranks, and the provenance columns (ingest: source and caption)."""
    names = list(INGEST_COLUMNS if stage.index == 0 else stage.added)
    for window in stage.windows():
        names += [window.column, rank_column(window.column)]
    # An earlier dedup stage may have added them: a later one's rows carry them on.
    names += PROVENANCE_COLUMNS
    names = list(dict.fromkeys(names))
    out = []
    for c in names:
        t = stage.schema.get(c)
        if t is not None and (
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
        ):
            out.append(c)
    return out


def _find(
    stage: StageView, files: Sequence[ShardFile], row_id: str, columns: list[str]
) -> dict | None:
    for shard in files:
        with stage.loc.fs.open_input_file(shard.path) as f:
            pf = pq.ParquetFile(f)
            present = ["id"] + [c for c in columns if c in pf.schema_arrow.names and c != "id"]
            # Row groups whose id statistics exclude the id are skipped; others read only `present`.
            table = pq.read_table(f, columns=present, filters=[("id", "=", row_id)])
        if table.num_rows:
            return table.slice(0, 1).to_pylist()[0]
    return None


def locate(stage: StageView, row_id: str) -> tuple[str | None, dict]:
    """("kept" | "rejected" | None, the row's shown values and reason) in one stage folder."""
    columns = _shown_columns(stage)
    row = _find(stage, stage.kept, row_id, columns)
    if row is not None:
        return "kept", row
    row = _find(stage, stage.rejected, row_id, [*columns, REASON_COLUMN])
    if row is not None:
        return "rejected", row
    return None, {}


def _fate(stages: Sequence[StageView], row_id: str, start: int) -> str:
    """Where a row ended, looked up from stage `start` on (for the kept copy of a duplicate)."""
    for st in stages[start:]:
        where, row = locate(st, row_id)
        if where == "rejected":
            return f"removed at {st.folder}: {row.get(REASON_COLUMN)}"
        if where is None:
            return f"not found in {st.folder}"
    return f"kept to the end ({stages[-1].folder})"


def explain(output: str | Location, row_id: str) -> Journey:
    _, stages = read_stages(output)
    steps: list[Step] = []
    gone = False
    for st in stages:
        if gone:
            steps.append(Step(st.folder, st.name, "absent", {}))
            continue
        where, row = locate(st, row_id)
        values = {c: row[c] for c in _shown_columns(st) if c in row}
        # Provenance is null on every row it does not concern: only a removal's is worth a word.
        values = {c: v for c, v in values.items() if not (c in PROVENANCE_COLUMNS and v is None)}
        if where == "kept":
            steps.append(Step(st.folder, st.name, "passed", values))
        elif where == "rejected":
            steps.append(Step(st.folder, st.name, "removed", values, row.get(REASON_COLUMN)))
            gone = True
        else:
            # Not in ingest: an unknown id. Later: the ledger says rows in = kept + rejected, so a
            # row that passed the stage before and is nowhere here means a damaged output.
            steps.append(Step(st.folder, st.name, "missing", {}))
            gone = True
    journey = Journey(row_id, steps)
    removed = journey.removed_at
    if removed is not None:
        kept_id = removed.values.get("duplicate_of")
        journey.duplicate_of = str(kept_id) if kept_id is not None else None
        if journey.duplicate_of:
            at = next(i for i, s in enumerate(steps) if s is removed)
            journey.duplicate_fate = _fate(stages, journey.duplicate_of, at)
    return journey


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str):
        text = " ".join(v.split())
        text = text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"
        return repr(text)
    return "null" if v is None else str(v)


def format_journey(journey: Journey, output: str) -> str:
    lines = [f"row {journey.id!r} in {output}"]
    width = max(len(s.folder) for s in journey.steps)
    for s in journey.steps:
        values = ", ".join(f"{k} {_fmt(v)}" for k, v in s.values.items())
        if s.status == "passed":
            lines.append(f"  {s.folder:<{width}}  passed    {values}".rstrip())
        elif s.status == "removed":
            lines.append(f"  {s.folder:<{width}}  REMOVED   {s.reason}")
            if values:
                lines.append(f"  {'':<{width}}            {values}")
            if journey.duplicate_of:
                lines.append(
                    f"  {'':<{width}}            duplicate of {journey.duplicate_of} "
                    f"({journey.duplicate_fate})"
                )
        elif s.status == "absent":
            lines.append(f"  {s.folder:<{width}}  -         not in the input of this stage")
        else:
            lines.append(f"  {s.folder:<{width}}  MISSING   neither kept nor rejected here")
    removed = journey.removed_at
    if removed is not None:
        rule = reason_key(removed.reason or "")
        lines.append(f"ended: removed at {removed.folder} (stage {removed.stage}), rule {rule!r}")
    elif journey.steps and journey.steps[-1].status == "passed":
        lines.append(f"ended: kept, in the final output {journey.steps[-1].folder}")
    else:
        last = next(s for s in reversed(journey.steps) if s.status == "passed")
        lines.append(f"ended: lost after {last.folder} (the output is incomplete or damaged)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`warren explain OUTPUT ID`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="warren explain",
        description="Print one row's journey through a run: stages passed, scores, the removal.",
    )
    parser.add_argument("output", help="a run's output folder")
    parser.add_argument("id", help="the row's id")
    args = parser.parse_args(argv)
    try:
        journey = explain(args.output, args.id)
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        print(f"warren explain: {exc}", file=sys.stderr)
        return 2
    if not journey.found:
        print(
            f"warren explain: no row with id {args.id!r} in {args.output} "
            f"(not in {journey.steps[0].folder}, the run's input)",
            file=sys.stderr,
        )
        return 1
    print(format_journey(journey, args.output))
    return 0


__all__ = ["Journey", "Step", "explain", "format_journey", "locate", "main"]


if __name__ == "__main__":
    sys.exit(main())
