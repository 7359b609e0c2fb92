"""mixture: build a training mixture from a spec (YAML): read the sources, filter, balance, export.

    python pipelines/mixture.py pipelines/mixtures/llava_v1_5_665k.yaml
    python pipelines/mixture.py SPEC.yaml --balance.total 500000     # any stage flag overrides
    python pipelines/mixture.py SPEC.yaml --export-format sharegpt --export-to exports/mix

The steps, from the spec (`stages.mixture_spec` documents every key):

1. ingest every source with its own reader, each row named by its source and tagged with its task;
2. `source_filter`: the sources' SQL conditions (only when a source has one);
3. `short_answer`: LLaVA-1.5's single-word-or-phrase instruction on the sources marked for it;
4. `balance`: concept caps, per-source caps, size-tempered sampling to a total, text-only share;
5. `export_check`: alternating turns, one image per `<image>`, decodable images, safe paths;

then the rows and shares per source and per task type before and after (printed, and saved in
`run.json` under "mixture"), and the export when the spec or the command line asks for one.
Every format takes caption rows (as LLaVA's pretraining pairs, `stages.exports.caption`;
`--caption-template` or the spec's `export.caption_template` sets the human turn). The export
prints how many rows it wrote and, for the rows it did not, why; an export that writes no row, or
fails, makes the exit code 2.
Each step is cached like any recipe's: change the total and only `balance` and what follows
re-run.

`pipelines/mixtures/` has specs for a LLaVA-1.5-665K-style and a Bunny-695K-style mixture (paths
come from environment variables; each spec says which public dataset goes where) and a demo
mixture of the bundled demo pool (`python pipelines/mixture.py pipelines/mixtures/demo.yaml`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from warren.pipelines.recipe import main as recipe_main
from warren.pipelines.runner import Pipeline
from warren.stages.balance import Balance
from warren.stages.base import Stage
from warren.stages.concept_balance import ConceptBalance, ConceptBalanceParams
from warren.stages.export_check import ExportCheck
from warren.stages.exports.caption import CaptionTemplate, unescape
from warren.stages.mixture_spec import MixtureSpec, SpecError, load_spec
from warren.stages.readers.mixture import READER
from warren.stages.run_layout import open_stage
from warren.stages.shards import Location
from warren.stages.short_answer import ShortAnswer
from warren.stages.source_filter import SourceFilter

BALANCE_KEYS_FROM_SOURCES = ("source_caps", "source_weights")


def build_stages(spec: MixtureSpec) -> list[Stage]:
    """The mixture's stages, in order, from the spec (steps 2-5 of the module docstring)."""
    where = f"{spec.uri}"
    stages: list[Stage] = []
    filters = {s.name: s.filter for s in spec.sources if s.filter}
    if filters:
        stages.append(SourceFilter(filters=filters))
    short = [s.name for s in spec.sources if s.short_answer]
    if short or spec.short_answer:
        if "sources" in spec.short_answer:
            raise SpecError(f"{where}: short_answer: mark sources with `short_answer: true`")
        stages.append(ShortAnswer(**{**spec.short_answer, "sources": ",".join(short)}))
    balance = dict(spec.balance)
    for key in BALANCE_KEYS_FROM_SOURCES:
        if key in balance:
            raise SpecError(f"{where}: balance: give {key} as each source's cap / weight")
    caps = {s.name: s.cap for s in spec.sources if s.cap is not None}
    weights = {s.name: s.weight for s in spec.sources if s.weight is not None}
    if caps:
        balance["source_caps"] = caps
    if weights:
        balance["source_weights"] = weights
    # MetaCLIP's concept keys go to their own stage, concept_balance, run before balance
    keys = set(ConceptBalanceParams.__dataclass_fields__) - {"seed"}
    concepts = {k: balance.pop(k) for k in sorted(keys & set(balance))}
    if concepts:
        concepts["seed"] = balance.get("seed", spec.seed)
        stages.append(_make(ConceptBalance, concepts, where))
    if set(balance) - {"seed"} or (balance and not concepts):
        balance.setdefault("seed", spec.seed)
        stages.append(_make(Balance, balance, where))
    # Every export format takes caption rows, so export_check is the same whatever the format.
    stages.append(_make(ExportCheck, dict(spec.export_check), where))
    return stages


def _make(cls: type[Stage], params: dict[str, Any], where: str) -> Stage:
    try:
        return cls(**params)
    except TypeError as exc:  # an unknown parameter name
        raise SpecError(f"{where}: {cls.name}: {exc}") from exc


def build_pipeline(spec: MixtureSpec) -> Pipeline:
    return Pipeline(
        name=spec.name,
        stages=build_stages(spec),
        description=spec.description or f"mixture of {len(spec.sources)} sources",
    )


# ---- before and after ------------------------------------------------------------------------


def composition(folder: Location) -> dict[str, Any]:
    """Rows per source and per task of a stage folder's kept shards (two columns read)."""
    stage = open_stage(folder, verify=False)
    manifest = stage.manifest
    by: dict[str, dict[str, int]] = {"source": {}, "task": {}}
    for f in stage.kept:
        with folder.fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            present = [c for c in by if c in pf.schema_arrow.names]
            table = pf.read(columns=present)
        for column in present:
            for d in table.column(column).value_counts().to_pylist():
                key = "<null>" if d["values"] is None else d["values"]
                by[column][key] = by[column].get(key, 0) + d["counts"]
    rows = manifest["kept"]
    return {
        "rows": rows,
        **{
            f"by_{column}": {
                k: {"rows": n, "share": round(n / rows, 6) if rows else 0.0}
                for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            }
            for column, counts in by.items()
        },
    }


def mixture_summary(output: Location) -> dict[str, Any]:
    """The mixture before balancing (the rows entering `balance`, or the rows read when there is
    no balance stage) and after (the final stage's rows), saved in run.json under "mixture"."""
    run = output.join("run.json").read_json()
    stages = run["stages"]
    names = [s["name"] for s in stages]
    first = next((n for n in (ConceptBalance.name, Balance.name) if n in names), None)
    before = stages[names.index(first) - 1] if first else stages[0]
    summary = {
        "before_stage": before["folder"],
        "before": composition(output.join(before["folder"])),
        "after": composition(output.join(run["final"]["folder"])),
    }
    run["mixture"] = summary
    output.join("run.json").write_json_atomic(run)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    before, after = summary["before"], summary["after"]
    lines = [
        f"mixture: {before['rows']:,} rows before balancing ({summary['before_stage']}) -> "
        f"{after['rows']:,} rows in the mixture"
    ]
    for column in ("source", "task"):
        keys = list(before[f"by_{column}"])
        keys += [k for k in after[f"by_{column}"] if k not in keys]
        width = max([len(column), *map(len, keys)])
        lines.append(f"  {column:<{width}} {'before':>10} {'share':>7} {'after':>10} {'share':>7}")
        for k in keys:
            b = before[f"by_{column}"].get(k, {"rows": 0, "share": 0.0})
            a = after[f"by_{column}"].get(k, {"rows": 0, "share": 0.0})
            lines.append(
                f"  {k:<{width}} {b['rows']:>10,} {100 * b['share']:>6.1f}% "
                f"{a['rows']:>10,} {100 * a['share']:>6.1f}%"
            )
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="mixture",
        description=__doc__.split("\n", 1)[0],
        add_help=False,
    )
    parser.add_argument("spec", nargs="?")
    parser.add_argument("--output")
    parser.add_argument("--export-format", choices=("llava", "sharegpt", "hf"))
    parser.add_argument("--export-to")
    parser.add_argument("--caption-template")
    parser.add_argument("--overwrite-export", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)


USAGE = """usage: mixture.py SPEC.yaml [--output DIR] [--export-format llava|sharegpt|hf]
                  [--export-to DIR] [--caption-template TEXT] [--overwrite-export]
                  [--no-export] [recipe flags]

--caption-template: the human turn caption rows are exported with (default
"<image>\\n{instruction}": LLaVA's LCS-558K pretraining form; `\\n` is a newline).

Recipe flags (see `mixture.py SPEC.yaml --help` for the stage flags of a spec): --force,
--from STAGE, --only STAGE, --num-cpus N, --describe, --quiet, --verbose, --no-report,
--<stage>.<param>."""


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _split_args(list(sys.argv[1:] if argv is None else argv))
    if args.spec is None:
        print(USAGE, file=sys.stderr if not args.help else sys.stdout)
        return 0 if args.help else 2
    try:
        spec = load_spec(args.spec)
        export = dict(spec.export or {})
        if args.export_format:
            export["format"] = args.export_format
        if args.export_to:
            export["to"] = args.export_to
        if args.caption_template is not None:
            export["caption_template"] = unescape(args.caption_template)
        if args.no_export:
            export = {}
        if export and not (export.get("format") and export.get("to")):
            raise SpecError("an export needs both --export-format and --export-to")
        if export.get("caption_template") is not None:
            CaptionTemplate(export["caption_template"])  # a bad template fails before the run
        pipeline = build_pipeline(spec)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = args.output or spec.output or f"warren-out/{spec.name}"
    flags = ["--input", args.spec, "--input-format", READER, "--output", output, *rest]
    if args.help:
        flags.append("--help")
    code = recipe_main(pipeline, flags)
    if code != 0 or any(f in rest for f in ("--describe", "--help", "-h", "--only")):
        return code
    out = Location.of(output)
    summary = mixture_summary(out)
    if "--quiet" not in rest:
        print(format_summary(summary), flush=True)
    if export:
        from warren.stages.exports import ExportError
        from warren.stages.exports import export as write_export

        options = {k: v for k, v in export.items() if k not in ("format", "to", "overwrite")}
        try:
            report = write_export(
                output,
                export["format"],
                export["to"],
                overwrite=bool(export.get("overwrite") or args.overwrite_export),
                **options,
            )
        except (ExportError, OSError, ValueError) as exc:
            print(f"error: export failed: {exc}", file=sys.stderr)
            return 2
        print(report.summary(), flush=True)
    return 0


__all__ = ["build_pipeline", "build_stages", "composition", "main", "mixture_summary"]


if __name__ == "__main__":
    sys.exit(main())
