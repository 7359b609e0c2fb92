"""basic_filter: the cheap junk removal every published pipeline runs before anything model-heavy.

DataComp's basic filtering (English captions by fastText, more than 2 words and 5 characters,
shorter image side at least 200 px, aspect ratio at most 3), Data-Juicer's image and text
filters, NeMo Curator's NSFW filter and exact and near-exact duplicate removal, one stage each:

1. `image_check`: images that decode (undecodable, truncated, bombs rejected), width and height;
2. `image_filter`: at least 200 px a side, aspect ratio <= 3, one frame, not blank;
3. `caption_filter`: boilerplate (stock credits, file names, URLs), >= 3 words, >= 6 characters,
   character and word repetition (Data-Juicer) <= 0.5;
4. `language`: English by fastText's lite language-ID model, score >= 0.5;
5. `nsfw`: Open-NSFW score <= 0.5;
6. `exact_dedup`: one row per group of identical decoded pixels;
7. `phash_dedup`: one row per group of perceptual-hash near duplicates.

    python pipelines/basic_filter.py                  # the bundled demo pool
    python pipelines/basic_filter.py --input pool/ --language.languages en,de
    python pipelines/bunny_pretrain.py --basic-filter # these steps in front of a recipe

Every threshold is a flag (`--help`); every rule writes its score column, and every rejected
row's reason names the rule and the value. On the demo pool (clip art about 160 px wide, captions
in several languages) the image size floor is 64 px and the language rule only scores: the
published floors would remove nearly every row of it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from warren.pipelines.recipe import main
from warren.pipelines.runner import Pipeline
from warren.stages.base import Stage
from warren.stages.caption_filter import CaptionFilter
from warren.stages.exact_dedup import ExactDedup
from warren.stages.image_check import ImageCheck
from warren.stages.image_filter import ImageFilter
from warren.stages.language import Language
from warren.stages.nsfw import Nsfw
from warren.stages.phash_dedup import PhashDedup

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


def pipeline() -> Pipeline:
    return Pipeline(
        name="basic_filter",
        description="image checks and filters, caption filters, English, NSFW, exact and "
        "perceptual-hash duplicates",
        stages=basic_filter_stages(),
        demo_params=DEMO_PARAMS,
    )


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


if __name__ == "__main__":
    sys.exit(main(pipeline()))
