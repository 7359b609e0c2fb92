"""demo: the foundation pipeline (decode, caption and exact-duplicate checks) on the bundled demo pool.

Read the pool into canonical rows, reject images that do not decode (empty, not an image,
truncated, corrupt, decompression bombs), reject missing or empty captions, then keep one copy of
every exact duplicate.

    python pipelines/demo.py                       # the bundled demo pool, local Ray
    ray job submit --working-dir . -- python pipelines/demo.py --output /shared/out
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.caption_check import CaptionCheck
from warren.stages.exact_dedup import ExactDedup
from warren.stages.image_check import ImageCheck


@recipe("demo")
def pipeline() -> Pipeline:
    return Pipeline(
        name="demo",
        description="decode check, caption check, exact dedup",
        stages=[
            ImageCheck(),  # drop what cannot be decoded, before anything pays for it
            CaptionCheck(),  # every pretraining row needs a caption
            ExactDedup(),  # one copy of byte-identical images
        ],
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
