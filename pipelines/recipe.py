"""The command line every recipe script shares, generated from the stages' parameter dataclasses.

`python pipelines/<recipe>.py --help` lists the runner's flags and one `--<stage>.<param>` flag per
stage parameter, with the default and help text declared on the dataclass field: a default lives
in one place. After a run it writes `OUTPUT/report.html` (`pipelines.report`) and prints its path;
`--no-report` skips it.

Each stage also takes its resources from the command line, `--<stage>.num_cpus`, `.num_gpus`,
`.batch_size` and `.concurrency` (one int, or "min,max" for an actor pool that grows), e.g.
`--embed.num_gpus 0.5 --embed.concurrency 8 --embed.batch_size 256`; they go to the instance as
`Stage(..., resources={...})` and are not parameters (they change no output, so no cache key). A
stage with a parameter of the same name (`recaption.batch_size`, rows per generate call) takes
that resource as `--<stage>.resources.<name>`.

`main(pipeline, argv)` parses the flags and calls `execute(pipeline, ...)`, whose keyword
arguments are the same flags (`params`/`resources` hold the per-stage ones): `warren run` and
`warren.pipelines.commands.run` go through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warren.pipelines.basic_filter_stages import with_basic_filter
from warren.pipelines.describe import describe_pipeline
from warren.pipelines.funnel import StageReport
from warren.pipelines.runner import Pipeline, PipelineError, Runner, one_line
from warren.stages.base import BatchStage, Resources, Stage
from warren.stages.demo_vlm import DEMO_VLM, ensure_demo_vlm
from warren.stages.readers.base import InputError
from warren.stages.readers.stage import ReaderStage
from warren.stages.schema import SchemaError

DEMO_DATA = str(Path(__file__).resolve().parent / "demo_data" / "demo.parquet")
# The demo CLIP, trained on the demo pool (pipelines/demo_data/train_demo_clip.py): offline default.
DEMO_CLIP = str(Path(__file__).resolve().parent / "demo_data" / "demo_clip")
# The demo VLM (stages/demo_vlm.py, DEMO_VLM): built into the model cache on first use, offline.
# Model-heavy recipes start with a seeded `subsample` (a Sample stage) that keeps every row unless
# `--subsample.n` is given: a way to try a recipe on a slice before paying for all of it. On the
# demo pool they take 64 rows: the CPU-only demo models caption about one row a second.
ALL_ROWS = 10**15
DEMO_SUBSAMPLE = {"n": 64}
DEMO_RECAPTION = {
    "model": DEMO_VLM,
    "preset": "greedy",
    "max_tokens": 32,
    "repetition_penalty": 1.3,
    "keep_truncated": True,
}


def _flag_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _flag_type(args[0])
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return json.loads
    return str


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


RESOURCE_NAMES = tuple(f.name for f in dataclasses.fields(Resources))
RESOURCE_HELP = {
    "num_cpus": "CPUs per worker",
    "num_gpus": "GPUs per worker (a fraction shares one)",
    "batch_size": "rows per batch given to the stage",
    "concurrency": 'workers of its actor pool: N, or "MIN,MAX" to let it grow',
}


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    if not math.isfinite(value):  # float() takes "nan" and "inf": no count of CPUs or GPUs
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def parse_concurrency(text: str) -> tuple[int, int]:
    """`--<stage>.concurrency`: "N" (a pool of N workers) or "MIN,MAX"."""
    parts = text.split(",")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f'expected N or "MIN,MAX", got {text!r}')
    lo, hi = (_positive_int(p.strip()) for p in (parts * 2)[:2])
    if lo > hi:
        raise argparse.ArgumentTypeError(f"MIN must not exceed MAX, got {text!r}")
    return lo, hi


RESOURCE_TYPES = {
    "num_cpus": _non_negative,
    "num_gpus": _non_negative,
    "batch_size": _positive_int,
    "concurrency": parse_concurrency,
}


def resource_flag(stage: Stage, resource: str) -> str:
    """The flag of one of a stage's resources: `--<stage>.<resource>`, or
    `--<stage>.resources.<resource>` when the stage has a parameter of that name."""
    names = {f.name for f in dataclasses.fields(stage.params)}
    middle = "resources." if resource in names else ""
    return f"--{stage.name}.{middle}{resource}"


def add_stage_flags(
    parser: argparse.ArgumentParser,
    stages: Sequence[Stage],
    demo_params: dict[str, dict[str, Any]] | None = None,
) -> None:
    demo_params = demo_params or {}
    for stage in stages:
        group = parser.add_argument_group(
            f"stage {stage.name} (v{stage.version})", type(stage).__doc__
        )
        hints = typing.get_type_hints(type(stage.params))
        for f in dataclasses.fields(stage.params):
            default = getattr(stage.params, f.name)
            on_demo = demo_params.get(stage.name, {})
            demo_note = (
                f"; on the demo pool: {json.dumps(on_demo[f.name])}" if f.name in on_demo else ""
            )
            help_text = f"{f.metadata.get('help', '')} (default: {json.dumps(default)}{demo_note})"
            group.add_argument(
                f"--{stage.name}.{f.name}",
                dest=f"{stage.name}.{f.name}",
                type=_flag_type(hints.get(f.name, str)),
                default=None,
                metavar=type(default).__name__.upper(),
                # argparse %-formats help strings, and a stage's help may say "top 30%".
                help=help_text.replace("%", "%%"),
            )
        # Only a batch stage's workers take resources (map_batches); a global stage sizes its
        # Ray Data operations to the cluster.
        for resource in RESOURCE_NAMES if isinstance(stage, BatchStage) else ():
            current = getattr(stage.resources, resource)
            shown = ",".join(map(str, current)) if isinstance(current, tuple) else current
            group.add_argument(
                resource_flag(stage, resource),
                dest=f"{stage.name}.resources.{resource}",
                type=RESOURCE_TYPES[resource],
                default=None,
                metavar="N" if resource != "concurrency" else "N|MIN,MAX",
                help=f"resource: {RESOURCE_HELP[resource]} (default: {shown}; not a parameter)",
            )


def stage_flags(args: argparse.Namespace, stages: Sequence[Stage]) -> tuple[dict, dict]:
    """(params, resources) per stage name, from the `--<stage>.*` flags that were given."""
    params: dict[str, dict[str, Any]] = {}
    resources: dict[str, dict[str, Any]] = {}
    for stage in stages:
        for f in dataclasses.fields(stage.params):
            value = getattr(args, f"{stage.name}.{f.name}")
            if value is not None:
                params.setdefault(stage.name, {})[f.name] = value
        for resource in RESOURCE_NAMES if isinstance(stage, BatchStage) else ():
            value = getattr(args, f"{stage.name}.resources.{resource}")
            if value is not None:
                resources.setdefault(stage.name, {})[resource] = value
    return params, resources


def _own_resources(stage: Stage) -> dict[str, Any]:
    """The resources this instance was given beyond what its class and parameters imply."""
    default = dataclasses.asdict(stage.default_resources())
    return {k: v for k, v in dataclasses.asdict(stage.resources).items() if v != default[k]}


def configure(
    stage: Stage,
    params: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
) -> Stage:
    """A new instance of `stage` with `params` over its parameters and `resources` over the
    resources it was given (never a change to the stage or its class)."""
    if not params and not resources:
        return stage
    try:
        return type(stage)(
            stage.params,
            stage_name=stage.name,
            resources={**_own_resources(stage), **(resources or {})},
            **(params or {}),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"stage {stage.name}: {exc}") from exc


def apply_stage_flags(
    stages: Sequence[Stage],
    params: dict[str, dict[str, Any]] | None = None,
    resources: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> list[Stage]:
    """Stages with the given parameters and resources per stage name; `defaults` (per stage)
    fill the parameters that `params` does not give. A stage name that is not in the pipeline
    is a ValueError."""
    params, resources, defaults = params or {}, resources or {}, defaults or {}
    names = [s.name for s in stages]
    for what, given in (("params", params), ("resources", resources)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"{what} for {unknown[0]!r}: no such stage in this pipeline ({', '.join(names)})"
            )
    return [
        configure(
            stage,
            {**defaults.get(stage.name, {}), **params.get(stage.name, {})},
            resources.get(stage.name),
        )
        for stage in stages
    ]


def build_parser(pipeline: Pipeline, default_output: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{pipeline.name}",
        description=pipeline.description,
    )
    parser.add_argument(
        "--input", default=DEMO_DATA, help="input path or URI (default: the bundled demo pool)"
    )
    parser.add_argument(
        "--input-format",
        default=None,
        help="parquet, img2dataset, llava_json, image_folder, hf_datasets, coco, mixture, "
        "download (a URL table: fetched with img2dataset first) (default: detected)",
    )
    parser.add_argument(
        "--input-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='reader option, e.g. image_root="/data/coco" or columns=\'{"caption": "TEXT"}\'',
    )
    parser.add_argument(
        "--output", default=default_output, help=f"output folder or URI (default: {default_output})"
    )
    parser.add_argument("--force", action="store_true", help="recompute every stage")
    parser.add_argument(
        "--from", dest="from_stage", help="recompute this stage and everything after it"
    )
    parser.add_argument("--only", help="recompute this stage alone (its input must be up to date)")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)"
    )
    parser.add_argument(
        "--basic-filter",
        action="store_true",
        help="run pipelines/basic_filter.py's stages (image and caption filters, language, NSFW, "
        "exact and perceptual duplicates) in front of this recipe",
    )
    parser.add_argument(
        "--on-duplicate-id",
        choices=("reject", "suffix"),
        default="reject",
        help="a record whose id was seen before (in input order): reject it with reason "
        "'ingest: duplicate id (first seen at FILE:INDEX)', or keep it as ID#2, ID#3, ... with "
        "the id it came with in original_id (default: reject)",
    )
    parser.add_argument(
        "--allow-demo-model",
        action="store_true",
        help="run a demo model (e.g. pipelines/demo_data/demo_clip, trained only on the demo "
        "pool) on other input; without it such a run is refused",
    )
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="take over OUTPUT/.lock even when its owner runs on another host (only when that "
        "run is known to be dead); a stale lock of this host is taken over without it",
    )
    parser.add_argument("--describe", action="store_true", help="print the pipeline and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or funnel")
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write OUTPUT/report.html (the funnel, score histograms and galleries)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the full traceback on errors")
    add_stage_flags(parser, pipeline.stages, pipeline.demo_params)
    return parser


def _reader_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--input-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _with_demo_models(stages: list[Stage]) -> list[Stage]:
    """Stages whose `model` names the demo VLM get its directory, built first if need be (on the
    driver, once: Ray workers then load it from the cache like any local model)."""
    return [
        configure(stage, {"model": ensure_demo_vlm()})
        if getattr(stage.params, "model", None) == DEMO_VLM
        else stage
        for stage in stages
    ]


def main(
    pipeline: Pipeline, argv: Sequence[str] | None = None, default_output: str | None = None
) -> int:
    """Parse the command line, run the pipeline, print the funnel. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before the parser is built: the filter's stages bring their own --<stage>.<param> flags.
    shown = with_basic_filter(pipeline) if "--basic-filter" in argv else pipeline
    parser = build_parser(shown, default_output or f"warren-out/{pipeline.name}")
    args = vars(parser.parse_args(argv))
    params, resources = stage_flags(argparse.Namespace(**args), shown.stages)
    options = {k: v for k, v in args.items() if "." not in k}
    return execute(pipeline, **options, params=params, resources=resources)


def execute(
    pipeline: Pipeline,
    *,
    input: str = DEMO_DATA,
    input_format: str | None = None,
    input_option: Sequence[str] = (),
    output: str | None = None,
    force: bool = False,
    from_stage: str | None = None,
    only: str | None = None,
    num_cpus: int | None = None,
    basic_filter: bool = False,
    on_duplicate_id: str = "reject",
    allow_demo_model: bool = False,
    break_lock: bool = False,
    describe: bool = False,
    quiet: bool = False,
    no_report: bool = False,
    verbose: bool = False,
    params: dict[str, dict[str, Any]] | None = None,
    resources: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Run `pipeline` as its command line does, one keyword per flag (`--from` is `from_stage`,
    `--input-option` a list of KEY=JSON); `params` and `resources` map a stage's name to its
    `--<stage>.<param>` and resource values. Prints the funnel; returns the exit code (0, or 2
    with the error printed)."""
    if basic_filter:
        pipeline = with_basic_filter(pipeline)
    output = output or f"warren-out/{pipeline.name}"
    try:
        on_demo = input == DEMO_DATA
        stages = apply_stage_flags(
            pipeline.stages, params, resources, pipeline.demo_params if on_demo else None
        )
    except ValueError as exc:  # a stage flag's value: the user's to fix, no traceback to log
        if verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if describe:
            described = Pipeline(pipeline.name, stages, pipeline.description)
            reader_stage = _reader_stage(input, input_format, input_option, on_duplicate_id)
            print(describe_pipeline(described, reader_stage))
            return 0
        configured = Pipeline(pipeline.name, _with_demo_models(stages), pipeline.description)
        reports = Runner(
            configured,
            input,
            output,
            input_format=input_format,
            reader_options=_reader_options(list(input_option)),
            force=force,
            from_stage=from_stage,
            only=only,
            progress=not quiet,
            num_cpus=num_cpus,
            break_lock=break_lock,
            on_duplicate_id=on_duplicate_id,
            allow_demo_model=allow_demo_model,
        ).run()
    except (PipelineError, InputError, SchemaError) as exc:
        if verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an unforeseen error: one line here, the stack in logs/
        if verbose:
            raise
        log = _log_traceback(output, exc)
        where = f" (traceback: {log})" if log else " (run with --verbose for the traceback)"
        print(f"error: {one_line(exc)}{where}", file=sys.stderr)
        return 2
    if not no_report:
        _write_report(output, verbose)
    emptied = nothing_kept(reports)
    if emptied:
        print(f"error: {emptied}", file=sys.stderr)
        return 2
    return 0


def nothing_kept(reports: Sequence[StageReport]) -> str | None:
    """Why a run whose last stage kept no row wrote nothing (the stage that removed the last
    rows and its most frequent reasons), or None when it kept some. Such a run fails: an empty
    result that exits 0 reads as success downstream."""
    if not reports or reports[-1].kept:
        return None
    last = next((r for r in reports if r.rows_in and not r.kept), None)
    if last is None:
        return f"the run kept no rows: {reports[0].folder} read none from the input"
    top = sorted(last.reasons.items(), key=lambda kv: -kv[1])[:3]
    why = "; ".join(f"{reason} x{n}" for reason, n in top) or "no reason recorded"
    return (
        f"the run kept no rows: {last.folder} rejected all {last.rows_in:,} rows it was given "
        f"({why}); its rejected/ shards hold them"
    )


def _reader_stage(
    input: str, input_format: str | None, input_option: Sequence[str], on_duplicate_id: str
) -> ReaderStage | None:
    """The reader stage a run of `input` starts with, for describe's column check (the run's
    own); None when the input cannot be read (yet): the check then assumes the core columns."""
    from warren.stages.readers import get_reader

    try:
        reader = get_reader(input_format, input, **_reader_options(list(input_option)))
        stage = ReaderStage(reader, on_duplicate_id)
        stage.adds_unknown  # noqa: B018 - reads the input's metadata when the reader can
    except (OSError, ValueError):  # InputError, or a filesystem that cannot be reached
        return None
    return stage


def _log_traceback(output: str, exc: BaseException) -> str | None:
    """Write the traceback to OUTPUT/logs/run.log; its path, or None when it cannot be written."""
    import traceback

    from warren.pipelines.runner import LOGS_DIR
    from warren.stages.shards import Location

    try:
        log = Location.of(output).join(LOGS_DIR, "run.log")
        log.mkdir_parent()
        log.write_bytes_atomic("".join(traceback.format_exception(exc)).encode())
        return log.uri
    except (OSError, ValueError):
        return None


def _write_report(output: str, verbose: bool) -> None:
    """The run's HTML report; the data is what the run is for, so a report that cannot be
    written is a warning, never a failed run."""
    try:
        from warren.pipelines.report import write_report

        print(f"report: {write_report(output)}", flush=True)
    except Exception as exc:  # matplotlib missing, a full disk, a bug in the report: warn only
        if verbose:
            import traceback

            traceback.print_exc()
        print(
            f"warning: the run finished but its report could not be written: "
            f"{type(exc).__name__}: {exc} (retry with `warren report {output}`)",
            file=sys.stderr,
        )
