"""`warren`: run a recipe by name, list recipes, describe one.

warren recipes
warren run demo --output out/demo            # same flags as python pipelines/demo.py
warren describe demo
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import pipelines

NOT_RECIPES = {"cli", "recipe", "runner"}


def recipe_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(pipelines.__path__)
        if not m.ispkg and m.name not in NOT_RECIPES
    )


def load_recipe(name: str):
    if name not in recipe_names():
        raise SystemExit(f"warren: unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    return importlib.import_module(f"pipelines.{name}")


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
    args, rest = parser.parse_known_args(argv)
    if args.command == "recipes":
        for name in recipe_names():
            doc = (load_recipe(name).__doc__ or "").strip().splitlines()
            print(f"{name:<20} {doc[0] if doc else ''}")
        return 0
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    module = load_recipe(args.recipe)
    from pipelines.recipe import main as recipe_main

    if args.command == "describe":
        return recipe_main(module.pipeline(), ["--describe"])
    return recipe_main(module.pipeline(), rest)


if __name__ == "__main__":
    sys.exit(main())
