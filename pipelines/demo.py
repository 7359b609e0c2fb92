"""demo: the foundation pipeline (decode, caption and exact-duplicate checks) on the bundled demo pool.

Read the pool into canonical rows, reject images that do not decode (empty, not an image,
truncated, corrupt, decompression bombs), reject missing or empty captions, then keep one copy of
every exact duplicate.

    python pipelines/demo.py                       # the bundled demo pool, local Ray
    ray job submit --working-dir . -- python pipelines/demo.py --output /shared/out
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, locally and in a Ray job
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.recipe import main
from pipelines.runner import Pipeline
from stages.caption_check import CaptionCheck
from stages.exact_dedup import ExactDedup
from stages.image_check import ImageCheck


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
