"""The recipe registry: a recipe is a function that returns a Pipeline, registered by name.

    @recipe("bunny_pretrain")
    def pipeline() -> Pipeline: ...

`warren run NAME` and `warren recipes` find recipes here. A recipe registers when its module is
imported; `names()` imports the recipe scripts of `warren.pipelines` and the modules that other
installed packages declare under the entry-point group `warren.recipes`
(`[project.entry-points."warren.recipes"] my_recipe = "my_package.my_recipe"`), so a plugin adds
recipes without editing warren. A module that registers nothing (the runner, the report) is
simply not a recipe: there is no list of modules to leave out.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "warren.recipes"
_PACKAGE = "warren.pipelines"

#: name -> the function that builds the recipe's Pipeline.
_RECIPES: dict[str, Callable[[], Any]] = {}


class UnknownRecipe(LookupError):
    """No recipe of that name is registered; the message lists the known ones."""


def recipe(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register the decorated function (no arguments, returns a Pipeline) as recipe `name`."""

    def register(build: Callable[[], Any]) -> Callable[[], Any]:
        known = _RECIPES.get(name)
        # A script run as `python pipelines/X.py` registers from __main__ and again when its module
        # is imported by name: the same file is the same recipe.
        if known is not None and known.__code__.co_filename != build.__code__.co_filename:
            raise ValueError(
                f"recipe {name!r} is registered twice: in {known.__code__.co_filename} and in "
                f"{build.__code__.co_filename}"
            )
        _RECIPES[name] = build
        build.recipe_name = name  # type: ignore[attr-defined]
        return build

    return register


def _import_own(module: str) -> None:
    importlib.import_module(f"{_PACKAGE}.{module}")


def discover() -> None:
    """Import every module of warren.pipelines and every `warren.recipes` entry point."""
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            _import_own(info.name)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()


def names() -> list[str]:
    """Every registered recipe, sorted."""
    discover()
    return sorted(_RECIPES)


def get(name: str) -> Callable[[], Any]:
    """The function that builds recipe `name`; UnknownRecipe lists the known ones."""
    own = name.isidentifier() and importlib.util.find_spec(f"{_PACKAGE}.{name}") is not None
    if name not in _RECIPES and own:
        _import_own(name)  # the common case: a recipe of warren's own, named as its script
    if name not in _RECIPES:
        known = names()
        if name not in _RECIPES:
            raise UnknownRecipe(f"unknown recipe {name!r}; known: {', '.join(known)}")
    return _RECIPES[name]


def summary(name: str) -> str:
    """The first line of the recipe module's docstring."""
    build = get(name)
    module = importlib.import_module(build.__module__)
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


__all__ = ["ENTRY_POINT_GROUP", "UnknownRecipe", "discover", "get", "names", "recipe", "summary"]
