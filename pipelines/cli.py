"""`warren`: the one front door. Each command is a function of warren.pipelines.commands, and its
flags are that function's parameters (tests/test_cli.py checks they are the same set).

warren recipes                                   # the registered recipes
warren run bunny_pretrain --output out/bunny     # the flags of python pipelines/bunny_pretrain.py
warren run bunny_pretrain --embed.num_gpus 0.5 --embed.concurrency 8 --embed.batch_size 256
warren describe bunny_pretrain                   # stages, parameters, resources, columns; no Ray
warren train --data out/bunny --output runs/align --vision V --llm L   # a run's final stage
warren eval runs/align --tasks pope,gqa --data /data/eval   # a checkpoint on benchmark files
warren compare --demo --output out/compare    # recipes judged by the models they train
warren mixture pipelines/mixtures/demo.yaml      # flags as pipelines/mixture.py
warren report OUT [--to report.html] [--seed 0]  # the run's HTML report (OUT/report.html)
warren explain OUT ID                            # one row's journey: stages, scores, its removal
warren export OUT --format llava --to exports/llava [--overwrite] [--name N]
              [--caption-template "<image>"]     # OUT: a stage folder or a run (its final stage)

`run`, `describe` and `mixture` take the stage flags of their recipe (`--<stage>.<param>`, and
the resources `--<stage>.num_cpus/.num_gpus/.batch_size/.concurrency`), so their flags are parsed
once the recipe is known; `train` takes the trainer's flags (warren.trainers.config).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from warren.pipelines import commands, registry
from warren.pipelines.basic_filter_stages import with_basic_filter
from warren.pipelines.recipe import add_stage_flags, stage_flags
from warren.pipelines.recipe import main as recipe_main

#: Help of the parameters of the commands whose parser is generated from the signature.
PARAM_HELP: dict[str, dict[str, str]] = {
    "report": {
        "output": "a run's output folder (has run.json or NN-stage folders)",
        "to": "the HTML file (default: OUTPUT/report.html)",
        "seed": "seed of the gallery samples",
    },
    "explain": {"output": "a run's output folder", "id": "the row's id"},
    "export": {
        "src": "a stage folder (has _manifest.json) or a run's output (run.json)",
        "format": "llava, sharegpt or hf",
        "to": "the folder to write",
        "overwrite": "replace a non-empty --to folder",
        "name": "sharegpt: the dataset's name in dataset_info.json",
        "caption_template": 'the human turn of caption rows (default "<image>\\n{instruction}", '
        "as LCS-558K)",
    },
    "eval": {
        "checkpoint": "a LLaVA checkpoint folder or hub id (with --endpoint: the served name)",
        "tasks": "comma-separated tasks",
        "data": "a folder of task folders, or TASK=FOLDER,...",
        "output": "the results folder (default CHECKPOINT/eval)",
        "endpoint": "an OpenAI-compatible base URL serving the model, e.g. vLLM's",
        "batch_size": "generation batch (in-process) or concurrent requests (endpoint)",
        "max_new_tokens": "0: each task's own",
        "limit": "the first N items of each task (0: all)",
        "device": "auto (the GPU when there is one), cpu or cuda[:N]",
    },
    "compare": {
        "recipes": "NAME=FOLDER,NAME=FOLDER,... (run outputs or stage folders)",
        "output": "the comparison folder (compare.html, compare.json, runs/)",
        "tasks": "comma-separated evaluation tasks (warren eval's)",
        "data": "the benchmark files, as warren eval's --data",
        "demo": "two bunny_pretrain variants on the demo pool, with a tiny proxy",
        "vision": "the proxy's vision tower (hub id or folder)",
        "llm": "the proxy's LM (hub id or folder)",
        "from_checkpoint": "the proxy as a LLaVA checkpoint, instead of --vision/--llm",
        "stage": "align or instruct",
        "steps": "optimizer steps per run (the budget; with --tokens, the cap)",
        "tokens": "end each run at this many tokens instead (0: the budget is --steps)",
        "batch_size": "samples per step",
        "lr": "learning rate (0: the stage's default)",
        "seeds": "runs per recipe (at least 2; 3 or more to trust the spread)",
        "limit": "evaluate the first N items of each task (0: all)",
        "device": "auto, cpu or cuda",
    },
    "describe": {
        "recipe": "a registered recipe (warren recipes)",
        "input": "the input it would read (default: the bundled demo pool, with its demo "
        "parameters)",
        "basic_filter": "with the basic filter's stages in front",
    },
}
#: Commands whose flags depend on the recipe, spec or trainer: parsed after the command's name.
DELEGATED = ("run", "describe", "mixture", "train")


def _summary(fn: Callable[..., Any]) -> str:
    """The first line of the command's docstring."""
    return (inspect.getdoc(fn) or "").split("\n", 1)[0]


def flag_name(param: str) -> str:
    return "--" + param.replace("_", "-")


def add_signature_flags(
    parser: argparse.ArgumentParser,
    fn: Callable[..., Any],
    help: dict[str, str],
    skip: Sequence[str] = (),
) -> None:
    """One argument per parameter of `fn`: a required positional for a parameter without a
    default, a required `--flag` for a keyword-only one, `--flag` (store_true for a False bool)
    for one with a default."""
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip:
            continue
        kw: dict[str, Any] = {"help": help.get(p.name)}
        if p.default is inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY:
            parser.add_argument(p.name, **kw)
            continue
        if p.default is inspect.Parameter.empty:
            kw["required"] = True
        elif p.default is False:
            kw["action"] = "store_true"
        else:
            kw["default"] = p.default
            if isinstance(p.default, int | float) and not isinstance(p.default, bool):
                kw["type"] = type(p.default)
        parser.add_argument(flag_name(p.name), dest=p.name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warren", description="Curate image-text data for VLMs on Ray, and train on it."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in commands.COMMANDS.items():
        if name in DELEGATED:
            # Its flags come with the recipe (or trainer): `warren run RECIPE --help` lists them.
            sub.add_parser(name, help=_summary(fn), add_help=False)
            continue
        command = sub.add_parser(name, help=_summary(fn), description=_summary(fn))
        add_signature_flags(command, fn, PARAM_HELP.get(name, {}))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegated(argv[0], argv[1:])
    args = vars(build_parser().parse_args(argv))
    return commands.COMMANDS[args.pop("command")](**args)


def _delegated(name: str, rest: list[str]) -> int:
    if name == "train":
        return _train(rest)
    if not rest or rest[0].startswith("-"):
        what = "SPEC.yaml" if name == "mixture" else "RECIPE (warren recipes lists them)"
        if rest and rest[0] in ("-h", "--help"):
            print(f"usage: warren {name} {what.split()[0]} [flags]; {what}")
            return 0
        print(f"warren {name}: give a {what}", file=sys.stderr)
        return 2
    if name == "mixture":
        from warren.pipelines.mixture import main as mixture_main

        return mixture_main(rest)
    if name == "describe":
        return _describe(rest)
    pipeline = _pipeline(rest[0])
    if pipeline is None:
        return 2
    # The recipe's own command line (pipelines/recipe.py): the parameters of commands.run.
    return recipe_main(pipeline, rest[1:])


def _pipeline(recipe: str) -> Any:
    try:
        return registry.get(recipe)()
    except registry.UnknownRecipe as exc:
        print(f"warren: {exc}", file=sys.stderr)
        return None


def _describe(rest: list[str]) -> int:
    """`warren describe RECIPE [--input X] [--basic-filter] [stage flags]`."""
    pipeline = _pipeline(rest[0])
    if pipeline is None:
        return 2
    shown = with_basic_filter(pipeline) if "--basic-filter" in rest else pipeline
    args = describe_parser(rest[0], shown).parse_args(rest[1:])
    params, resources = stage_flags(args, shown.stages)
    options = {k: v for k, v in vars(args).items() if "." not in k}
    return commands.describe(rest[0], **options, params=params, resources=resources)


def describe_parser(recipe: str, shown: Any) -> argparse.ArgumentParser:
    """The flags of `warren describe RECIPE`: commands.describe's, and the stage flags of the
    pipeline it shows."""
    parser = argparse.ArgumentParser(
        prog=f"warren describe {recipe}", description=_summary(commands.describe)
    )
    add_signature_flags(
        parser, commands.describe, PARAM_HELP["describe"], skip=("recipe", "params", "resources")
    )
    add_stage_flags(parser, shown.stages, shown.demo_params)
    return parser


def _train(rest: list[str]) -> int:
    parser = commands.train_parser()
    args, unknown = parser.parse_known_args(rest)
    # The flags that are not warren's are transformers TrainingArguments' (an unknown one is an
    # error naming it).
    from warren.trainers.config import trainer_flags

    return commands.train(**vars(args), training_args=trainer_flags(unknown, parser))


if __name__ == "__main__":
    sys.exit(main())
