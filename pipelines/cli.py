"""`warren`: run a recipe by name, list recipes, describe one.

warren recipes
warren run demo --output out/demo            # same flags as python pipelines/demo.py
warren describe demo
warren mixture pipelines/mixtures/demo.yaml   # same flags as python pipelines/mixture.py
warren export OUT/03-export_check --format llava --to exports/llava [--overwrite]
warren export OUT --format sharegpt --to exports/lf --name my_data   # OUT: its final stage
warren export OUT --format llava --to exports/pt --caption-template "<image>"  # caption rows
warren report OUT [--to report.html] [--seed 0]   # the run's HTML report (OUT/report.html)
warren explain OUT ID                          # one row's journey: stages, scores, its removal
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import warren.pipelines as pipelines

# mixture.py takes a spec, not a fixed pipeline: `warren mixture SPEC.yaml` runs it; report.py
# and explain.py read a run's output.
NOT_RECIPES = {"cli", "recipe", "runner", "mixture", "report", "explain"} | {
    # the runner's parts
    "plan",
    "funnel",
    "ray_session",
    "run_errors",
    "run_map",
    "run_global",
    "run_ingest",
}


def recipe_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(pipelines.__path__)
        if not m.ispkg and m.name not in NOT_RECIPES
    )


def load_recipe(name: str):
    if name not in recipe_names():
        raise SystemExit(f"warren: unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    return importlib.import_module(f"warren.pipelines.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="warren", description="Curate image-text data for VLMs on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a recipe; flags after the name go to the recipe (see its --help)"
    )
    run.add_argument("recipe")
    describe = sub.add_parser("describe", help="print a recipe's stages and parameters")
    describe.add_argument("recipe")
    sub.add_parser("recipes", help="list the recipes")
    mix = sub.add_parser(
        "mixture",
        help="build a mixture from a spec; flags as pipelines/mixture.py (see its --help)",
    )
    mix.add_argument("spec")
    from warren.stages.exports import EXPORTERS

    exp = sub.add_parser(
        "export",
        help="export a stage folder (or a run's final stage) as LLaVA JSON, ShareGPT or HF datasets",
    )
    exp.add_argument("src", help="a stage folder (has _manifest.json) or a run's output (run.json)")
    exp.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    exp.add_argument("--to", required=True, dest="dest", help="the folder to write")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    exp.add_argument("--name", help="sharegpt: the dataset's name in dataset_info.json")
    exp.add_argument(
        "--caption-template",
        help='the human turn of caption rows (default "<image>\\n{instruction}", as LCS-558K)',
    )
    rep = sub.add_parser(
        "report", help="write the HTML report of a run's output (funnel, histograms, galleries)"
    )
    rep.add_argument("output", help="a run's output folder")
    rep.add_argument("--to", dest="dest", help="the HTML file (default: OUTPUT/report.html)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the gallery samples")
    why = sub.add_parser(
        "explain", help="print one row's journey through a run: stages, scores, why it was removed"
    )
    why.add_argument("output", help="a run's output folder")
    why.add_argument("id", help="the row's id")
    args, rest = parser.parse_known_args(argv)
    if args.command == "recipes":
        for name in recipe_names():
            doc = (load_recipe(name).__doc__ or "").strip().splitlines()
            print(f"{name:<20} {doc[0] if doc else ''}")
        return 0
    if rest and args.command not in ("run", "mixture"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "mixture":
        from warren.pipelines.mixture import main as mixture_main

        return mixture_main([args.spec, *rest])
    if args.command == "export":
        return export_main(args)
    if args.command == "report":
        from warren.pipelines.report import main as report_main

        seed = ["--seed", str(args.seed)]
        return report_main([args.output, *seed, *(["--to", args.dest] if args.dest else [])])
    if args.command == "explain":
        from warren.pipelines.explain import main as explain_main

        return explain_main([args.output, args.id])
    module = load_recipe(args.recipe)
    from warren.pipelines.recipe import main as recipe_main

    if args.command == "describe":
        return recipe_main(module.pipeline(), ["--describe"])
    return recipe_main(module.pipeline(), rest)


def export_main(args: argparse.Namespace) -> int:
    """`warren export`: exit 0 when rows were written (the rows not written, if any, are listed
    with their reasons), 2 when the export failed or would have written no row."""
    from warren.stages.exports import ExportError, export
    from warren.stages.exports.caption import unescape

    options: dict[str, str] = {}
    if args.name is not None:
        options["name"] = args.name
    if args.caption_template is not None:
        options["caption_template"] = unescape(args.caption_template)
    try:
        report = export(args.src, args.format, args.dest, overwrite=args.overwrite, **options)
    except ExportError as exc:
        print(f"warren export: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
