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
row's reason names the rule and the value. On the demo pool the image size floor is 64 px and the
language rule only scores (pipelines/basic_filter_stages.py says why).
"""

from __future__ import annotations

import sys

from warren.pipelines.basic_filter_stages import DEMO_PARAMS, basic_filter_stages, with_basic_filter
from warren.pipelines.recipe import main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline


@recipe("basic_filter")
def pipeline() -> Pipeline:
    return Pipeline(
        name="basic_filter",
        description="image checks and filters, caption filters, English, NSFW, exact and "
        "perceptual-hash duplicates",
        stages=basic_filter_stages(),
        demo_params=DEMO_PARAMS,
    )


__all__ = ["DEMO_PARAMS", "basic_filter_stages", "pipeline", "with_basic_filter"]


if __name__ == "__main__":
    sys.exit(main(pipeline()))
