"""The basic filter's stages: the cheap junk removal every published pipeline runs first.

`pipelines/basic_filter.py` runs them as a recipe; `--basic-filter` (pipelines/recipe.py) puts
them in front of any other recipe. Both import this module, which imports neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from warren.pipelines.runner import Pipeline
from warren.stages.base import Stage
from warren.stages.caption_filter import CaptionFilter
from warren.stages.exact_dedup import ExactDedup
from warren.stages.image_check import ImageCheck
from warren.stages.image_filter import ImageFilter
from warren.stages.language import Language
from warren.stages.nsfw import Nsfw
from warren.stages.phash_dedup import PhashDedup

#: On the demo pool (clip art about 160 px wide, captions in several languages) the image size
#: floor is 64 px and the language rule only scores: the published floors would remove nearly
#: every row of it.
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "image_filter": {"min_width": 64, "min_height": 64},
    "language": {"languages": ""},
}


def basic_filter_stages() -> list[Stage]:
    return [
        ImageCheck(),
        ImageFilter(),
        CaptionFilter(),
        Language(),
        Nsfw(),
        ExactDedup(key="pixels"),
        PhashDedup(),
    ]


def with_basic_filter(recipe: Pipeline) -> Pipeline:
    """`recipe` with the basic filter's stages in front; a recipe stage of the same name as one
    of them (its own `image_check`) is left out, since the filter already ran it."""
    front = basic_filter_stages()
    names = {s.name for s in front}
    rest = [s for s in recipe.stages if s.name not in names]
    kept = {s.name for s in rest}
    demo = {k: v for k, v in recipe.demo_params.items() if k in kept}
    return dataclasses.replace(
        recipe,
        stages=front + rest,
        description=f"basic filter, then {recipe.description}".strip(", "),
        demo_params={**demo, **DEMO_PARAMS},
    )


__all__ = ["DEMO_PARAMS", "basic_filter_stages", "with_basic_filter"]
