"""datacomp_filter: DataComp's CLIP-score filter, optionally intersected with its image-based filter.

1. embed images and captions with CLIP (DataComp's best baseline: ViT-L/14, openai), L2-normalised;
2. image-based filter (off unless `--image_based.reference` is given): k-means on the pool's image
   embeddings (100,000 clusters), each reference embedding (ImageNet-1k train images, embedded with
   the same model) picks its nearest cluster, and rows of unpicked clusters are marked;
3. keep the top 30% of the pool by CLIP score (`--clip_score.hi 0.3`; or an absolute threshold,
   DataComp ViT-B/32: `--clip_score.threshold 0.28 --clip_score.hi 1`);
4. reject the rows the image-based filter marked.

Both filters are computed on the whole pool (the image-based one only marks, and `require` applies
its mark after the CLIP-score ranks are taken), so the result is their exact intersection.

    python pipelines/datacomp_filter.py             # the bundled demo pool, with the demo CLIP
    python pipelines/datacomp_filter.py --input pool/ --image_based.reference imagenet_emb/
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import DEMO_CLIP, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.caption_check import CaptionCheck
from warren.stages.clip_score import ClipScore
from warren.stages.embed import Embed
from warren.stages.image_based import ImageBased
from warren.stages.image_check import ImageCheck
from warren.stages.require import Require


@recipe("datacomp_filter")
def pipeline() -> Pipeline:
    return Pipeline(
        name="datacomp_filter",
        description="embed, image-based clustering mark, CLIP-score top 30%, apply the mark",
        stages=[
            ImageCheck(),
            CaptionCheck(),
            Embed(),  # CLIP ViT-L/14 (openai)
            ImageBased(reject=False),
            ClipScore(lo=0.0, hi=0.3),
            Require(column="near_reference", reason="image_based: no reference image nearest"),
        ],
        demo_params={"embed": {"model": DEMO_CLIP}},
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
