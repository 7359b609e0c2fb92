"""The `warren` commands as Python functions: the API and the command line are the same thing.

Each function takes the parameters its command takes as flags (`warren report OUT --to F --seed 1`
is `report("OUT", to="F", seed=1)`), prints what the command prints and returns its exit code.
pipelines/cli.py builds the command line from these signatures (tests/test_cli.py checks that
every command's flags and its function's parameters are the same set).

    from warren.pipelines import commands
    commands.run("bunny_pretrain", output="out/bunny", resources={"embed": {"num_gpus": 0.5}})
    commands.describe("bunny_pretrain")
    commands.train(["out/bunny"], "runs/align", vision="openai/clip-vit-large-patch14-336",
                   llm="lmsys/vicuna-7b-v1.5")

A recipe's stage flags are the `params` and `resources` arguments, per stage name:
`--embed.model M --embed.num_gpus 0.5` is `params={"embed": {"model": M}},
resources={"embed": {"num_gpus": 0.5}}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warren.pipelines import registry
from warren.pipelines.recipe import DEMO_DATA, execute

StageValues = dict[str, dict[str, Any]]


def recipes() -> int:
    """List the registered recipes.

    One a line, with the first line of each one's docstring."""
    for name in registry.names():
        print(f"{name:<20} {registry.summary(name)}")
    return 0


def _pipeline(recipe: str) -> Any:
    try:
        return registry.get(recipe)()
    except registry.UnknownRecipe as exc:
        print(f"warren: {exc}", file=sys.stderr)
        return None


def run(
    recipe: str,
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
    params: StageValues | None = None,
    resources: StageValues | None = None,
) -> int:
    """Run a registered recipe: `warren run RECIPE [flags]`.

    The flags of `python pipelines/RECIPE.py` (pipelines/recipe.py documents them). Output
    defaults to warren-out/RECIPE."""
    pipeline = _pipeline(recipe)
    if pipeline is None:
        return 2
    return execute(
        pipeline,
        input=input,
        input_format=input_format,
        input_option=input_option,
        output=output,
        force=force,
        from_stage=from_stage,
        only=only,
        num_cpus=num_cpus,
        basic_filter=basic_filter,
        on_duplicate_id=on_duplicate_id,
        allow_demo_model=allow_demo_model,
        break_lock=break_lock,
        describe=describe,
        quiet=quiet,
        no_report=no_report,
        verbose=verbose,
        params=params,
        resources=resources,
    )


def describe(
    recipe: str,
    input: str = DEMO_DATA,
    basic_filter: bool = False,
    params: StageValues | None = None,
    resources: StageValues | None = None,
) -> int:
    """Print a recipe's stages, parameters, resources and columns, without starting Ray.

    `warren describe RECIPE`: the stages in order (kind, version, parameters, resources, required
    and added columns) and the column check. On the demo pool (no `input`) the parameters are the
    demo's."""
    return run(
        recipe,
        input=input,
        basic_filter=basic_filter,
        params=params,
        resources=resources,
        describe=True,
    )


def _as_flags(values: dict[str, Any]) -> list[str]:
    """Keyword arguments as the flags pipelines/mixture.py parses (`from_stage` is `--from`)."""
    flags: list[str] = []
    for key, value in values.items():
        flag = "--from" if key == "from_stage" else "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def _stage_flags(params: StageValues | None, resources: StageValues | None) -> list[str]:
    flags: list[str] = []
    for stage, values in (params or {}).items():
        for key, value in values.items():
            text = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
            flags += [f"--{stage}.{key}", text]
    for stage, values in (resources or {}).items():
        for key, value in values.items():
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            flags += [f"--{stage}.{key}", text]
    return flags


def mixture(
    spec: str,
    output: str | None = None,
    export_format: str | None = None,
    export_to: str | None = None,
    caption_template: str | None = None,
    overwrite_export: bool = False,
    no_export: bool = False,
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
    params: StageValues | None = None,
    resources: StageValues | None = None,
) -> int:
    """Build the training mixture a spec describes: `warren mixture SPEC [flags]`.

    pipelines/mixture.py, with a recipe's run flags (the input is the spec's sources)."""
    options = {k: v for k, v in locals().items() if k not in ("spec", "params", "resources")}
    from warren.pipelines.mixture import main as mixture_main

    if on_duplicate_id == "reject":
        options.pop("on_duplicate_id")  # the default: not a flag to pass
    return mixture_main([spec, *_as_flags(options), *_stage_flags(params, resources)])


def report(output: str, to: str | None = None, seed: int = 0) -> int:
    """Write a run's HTML report (funnel, histograms, galleries).

    `warren report OUTPUT`: by default into OUTPUT/report.html; `seed` draws the gallery
    samples."""
    from warren.pipelines.report import main as report_main

    return report_main([output, "--seed", str(seed), *(["--to", to] if to else [])])


def explain(output: str, id: str) -> int:
    """Print one row's journey through a run: stages passed, scores, why it was removed.

    `warren explain OUTPUT ID`; exit 1 when no row has that id."""
    from warren.pipelines.explain import main as explain_main

    return explain_main(["--", output, id])  # an id may begin with "-"


def export(
    src: str,
    *,
    format: str,
    to: str,
    overwrite: bool = False,
    name: str | None = None,
    caption_template: str | None = None,
) -> int:
    """Export a stage folder, or a run's final stage, as LLaVA JSON, ShareGPT or HF datasets.

    `warren export SRC --format F --to DIR`: format llava, sharegpt or hf. `overwrite` replaces a
    non-empty `to`; `name` is a sharegpt dataset's name in dataset_info.json; `caption_template`
    the human turn of caption rows (default "<image>\\n{instruction}", as LCS-558K). Exit 0 when
    rows were written (the rows not written are listed with their reasons), 2 when the export
    failed or would have written no row."""
    from warren.stages.exports import ExportError
    from warren.stages.exports import export as write_export
    from warren.stages.exports.caption import unescape

    options: dict[str, str] = {}
    if name is not None:
        options["name"] = name
    if caption_template is not None:
        options["caption_template"] = unescape(caption_template)
    try:
        written = write_export(src, format, to, overwrite=overwrite, **options)
    except ExportError as exc:
        print(f"warren export: {exc}", file=sys.stderr)
        return 2
    print(written.summary())
    return 0


def train(
    data: str | Sequence[str],
    output: str,
    stage: str = "align",
    vision: str | None = None,
    llm: str | None = None,
    from_checkpoint: str | None = None,
    projector: str | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_tokens: int | None = None,
    lr: float | None = None,
    projector_lr: float | None = None,
    weight_decay: float | None = None,
    warmup_ratio: float | None = None,
    max_grad_norm: float | None = None,
    lora: bool | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
    lora_merge: bool | None = None,
    qlora: bool | None = None,
    unfreeze_vision: bool | None = None,
    gradient_checkpointing: bool | None = None,
    precision: str | None = None,
    device: str | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
    shuffle_buffer: int | None = None,
    length_group_batches: int | None = None,
    max_bad_share: float | None = None,
    log_every: int | None = None,
    save_every: int | None = None,
    keep_checkpoints: int | None = None,
    resume: bool | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    fsdp: bool | None = None,
    cpus_per_worker: float | None = None,
    training_args: dict[str, Any] | None = None,
) -> int:
    """Train a LLaVA model on warren output: `warren train --data OUTPUT --output DIR`.

    Stage `align` (the projector, on caption rows) or `instruct` (projector and LM, on
    conversations).
    `data`: run folders (their final stage), stage folders or Parquet files. Every other
    parameter is the trainer's flag of the same name (warren.trainers.config.TrainConfig, which
    documents them); None keeps the trainer's default. `training_args`: transformers
    `TrainingArguments` settings over warren's (on the command line, any Trainer flag after
    warren's: `--deepspeed ds.json --report_to wandb`). Prints the run's JSON summary; exit 2 with
    the error for settings or data that cannot run."""
    given = {k: v for k, v in locals().items() if v is not None}
    # The trainer is imported here only: the recipe layer does not depend on it (or on torch).
    from warren.trainers.config import TrainConfig
    from warren.trainers.llava import train as run_training

    given["data"] = [_final_stage(p) for p in ([data] if isinstance(data, str) else data)]
    try:
        config = TrainConfig(**given)
        _log_to_console()
        summary = run_training(config)
    except (ValueError, FileNotFoundError) as exc:  # bad settings; data that is not there
        print(f"warren train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def evaluate(
    checkpoint: str,
    *,
    tasks: str,
    data: str,
    output: str | None = None,
    endpoint: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    limit: int = 0,
    device: str = "auto",
) -> int:
    """Evaluate a checkpoint on benchmark files: `warren eval CHECKPOINT --tasks pope,gqa --data DIR`.

    `tasks`: comma-separated (vqav2, gqa, textvqa, vizwiz, pope, scienceqa, mmbench, seedbench,
    coco_caption, nocaps, flickr30k). `data`: a folder holding one folder per task, named as the
    task, or comma-separated `TASK=FOLDER` (warren.trainers.eval_tasks lists each task's files).
    `output`: where results.json, results.md and predictions/ go (default CHECKPOINT/eval).
    `endpoint`: an OpenAI-compatible URL serving the model as CHECKPOINT (`vllm serve CHECKPOINT`)
    instead of loading it here. `max_new_tokens` 0 keeps each task's own; `limit` N asks the first
    N items of each task (0: all). Exit 2 with the error for tasks, data or settings that cannot
    run, or a task with no answered item."""
    from warren.trainers.evaluate import default_output
    from warren.trainers.evaluate import evaluate as run_eval

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    folders = [d.strip() for d in data.split(",") if d.strip()]
    try:
        _log_to_console()
        run_eval(
            checkpoint,
            names,
            folders,
            output or default_output(checkpoint),
            endpoint=endpoint,
            model=checkpoint if endpoint else None,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens or None,
            limit=limit or None,
            device=device,
        )
    except (ValueError, OSError) as exc:
        print(f"warren eval: {exc}", file=sys.stderr)
        return 2
    return 0


def compare(
    *,
    output: str,
    recipes: str = "",
    tasks: str = "coco_caption",
    data: str = "",
    demo: bool = False,
    vision: str | None = None,
    llm: str | None = None,
    from_checkpoint: str | None = None,
    stage: str = "align",
    steps: int = 200,
    tokens: int = 0,
    batch_size: int = 8,
    lr: float = 0.0,
    seeds: int = 3,
    limit: int = 0,
    device: str = "auto",
) -> int:
    """Compare curation recipes by the models they train: `warren compare --recipes A=O1,B=O2`.

    `recipes`: comma-separated NAME=FOLDER (a run's output or a stage folder) or NAME=SPEC.yaml
    (a mixture spec, built into OUTPUT/recipes/NAME first). The same proxy
    (`vision` and `llm`, or `from_checkpoint`) is trained on each with the same budget (`stage`,
    `steps` of `batch_size`, `lr`; 0 keeps the stage's default; `tokens` > 0 ends each run at
    that many tokens instead, with `steps` as the cap its schedule is planned over, for recipes
    whose captions differ in length) once per seed (`seeds` of them,
    0, 1, ...), and every checkpoint is evaluated on `tasks` with the benchmark files of `data`
    (as `warren eval`; `limit` asks the first N items). Writes OUTPUT/compare.html and
    compare.json. `demo`: two variants of bunny_pretrain on the bundled pool (CLIP-score ranks
    40-60% and 0-30%), a tiny proxy built here and a caption task of held-out pool rows, all on
    this machine in minutes. Exit 2 with the error for settings or data that cannot run."""
    from warren.trainers.compare import caption_task, tiny_proxy
    from warren.trainers.compare import compare as run_compare
    from warren.trainers.config import TrainConfig

    out = Path(output)
    try:
        _log_to_console()
        if demo:
            named, data, vision, llm = _demo_recipes(out, caption_task, tiny_proxy)
            tasks = "coco_caption"
        else:
            named = {}
            for k, entry in enumerate(e.strip() for e in recipes.split(",") if e.strip()):
                name, sep, folder = entry.partition("=")
                name, folder = (name, folder) if sep else (f"recipe{k + 1}", name)
                if folder.endswith((".yaml", ".yml")):
                    # A mixture spec: build the mixture first (cached like any run), then
                    # compare what it made.
                    built = out / "recipes" / name
                    code = mixture(
                        folder, output=str(built), no_export=True, quiet=True, no_report=True
                    )
                    if code != 0:
                        raise ValueError(
                            f"recipe {name}: the mixture {folder} failed (exit {code})"
                        )
                    folder = str(built)
                named[name] = _final_stage(folder)
        config = TrainConfig(
            stage=stage,
            data=[],
            output="",
            vision=vision,
            llm=llm,
            from_checkpoint=from_checkpoint,
            max_steps=steps,
            max_tokens=tokens or None,
            batch_size=batch_size,
            lr=lr or None,
            device=device,
            num_workers=0,
            log_every=max(1, steps // 10),
        )
        report = run_compare(
            named,
            str(out),
            tasks=[t.strip() for t in tasks.split(",") if t.strip()],
            eval_data=[d.strip() for d in data.split(",") if d.strip()],
            train=config,
            seeds=list(range(seeds)),
            limit=limit or None,
        )
    except (ValueError, OSError) as exc:
        print(f"warren compare: {exc}", file=sys.stderr)
        return 2
    for v in report["verdicts"]:
        a, b = v["recipes"]
        said = (
            f"{v['winner']} beats {v['loser']} by {v['difference']:.2f}"
            if v["winner"]
            else f"no verdict between {a} and {b} (within the seed spread)"
        )
        print(f"{v['task']}: {said}")
    print(f"report: {out / 'compare.html'}")
    return 0


def _demo_recipes(out: Path, caption_task: Any, tiny_proxy: Any) -> tuple[dict, str, str, str]:
    """Two bunny_pretrain variants on the demo pool, a held-out caption task, a tiny proxy."""
    from warren.stages.run_layout import open_run
    from warren.trainers.compare import data_stats

    variants = {"clip-40-60": {"lo": 0.4, "hi": 0.6}, "clip-0-30": {"lo": 0.0, "hi": 0.3}}
    named: dict[str, str] = {}
    for name, window in variants.items():
        folder = out / "recipes" / name
        code = run(
            "bunny_pretrain", output=str(folder), quiet=True, no_report=True,
            params={"clip_score": window},
        )  # fmt: skip
        if code != 0:
            raise ValueError(f"the demo recipe {name} failed (exit {code})")
        named[name] = _final_stage(str(folder))
    # One read of each recipe: its ids (held out of the task) and its captions (the vocabulary).
    read = [data_stats(d, captions=True) for d in named.values()]
    kept = set().union(*(ids for _, ids in read))
    pool = open_run(str(out / "recipes" / "clip-40-60")).stages[0].loc.uri
    eval_root = out / "eval-data"
    caption_task(pool, eval_root / "coco_caption", 40, exclude=kept)
    # The proxy's vocabulary: every word of the recipes' captions and of the references.
    refs = json.loads((eval_root / "coco_caption" / "captions.json").read_text())
    words = [a["caption"] for a in refs["annotations"]]
    for stats, _ in read:
        words += stats["captions"]
    vision, llm = tiny_proxy(out / "proxy", words)
    return named, str(eval_root), vision, llm


def train_parser() -> argparse.ArgumentParser:
    """The flags of `warren train` (pipelines/cli.py): the trainer's (warren.trainers.config), with stage `align`
    unless --stage says otherwise; imported only when asked for (torch)."""
    from warren.trainers.config import build_parser as trainer_parser

    parser = trainer_parser(prog="warren train")
    for action in parser._actions:
        if action.dest == "stage":
            action.required, action.default = False, "align"
    return parser


def _final_stage(path: str) -> str:
    """A run's output folder stands for its final stage folder (stages/run_layout.py), whose
    manifest lists the shards to read; any other path is passed on as it is."""
    from warren.stages.run_layout import LayoutError, is_run, open_stage
    from warren.stages.shards import Location

    try:
        loc = Location.of(path)
        return open_stage(loc, verify=False).loc.uri if is_run(loc) else path
    except (LayoutError, OSError, ValueError):
        return path  # the trainer names what is wrong with it


def _log_to_console() -> None:
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


#: The commands of `warren`, in the order `warren --help` lists them.
COMMANDS = {
    "run": run,
    "describe": describe,
    "recipes": recipes,
    "train": train,
    "eval": evaluate,
    "compare": compare,
    "mixture": mixture,
    "report": report,
    "explain": explain,
    "export": export,
}

__all__ = [
    "COMMANDS",
    "train_parser",
    "describe",
    "evaluate",
    "compare",
    "explain",
    "export",
    "mixture",
    "recipes",
    "report",
    "run",
    "train",
]
