"""semdedup: plain SemDeDup (Abbas et al. 2023) on an image-text pool.

1. embed images and captions with CLIP, L2-normalised;
2. k-means on the image embeddings (SemDeDup on LAION-440M: 50,000 clusters, ~9k rows a cluster);
3. inside each cluster, in order of distance to the centroid (farthest first: `keep hard`), remove
   every item whose largest cosine similarity to an earlier item exceeds 1 - eps (default 0.07).

    python pipelines/semdedup.py                     # the bundled demo pool, with the demo CLIP
    python pipelines/semdedup.py --semdedup.eps 0.05 # re-runs the dedup stage only
    ray job submit --working-dir . -- python pipelines/semdedup.py \\
        --input s3://bucket/pool/ --output s3://bucket/semdedup/   # CLIP ViT-L/14 (openai)
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import DEMO_CLIP, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.caption_check import CaptionCheck
from warren.stages.cluster import Cluster
from warren.stages.embed import Embed
from warren.stages.image_check import ImageCheck
from warren.stages.semdedup import SemDedup


@recipe("semdedup")
def pipeline() -> Pipeline:
    return Pipeline(
        name="semdedup",
        description="embed, k-means, SemDeDup (remove items with cosine > 1 - eps to an earlier one)",
        stages=[
            ImageCheck(),
            CaptionCheck(),
            Embed(),  # CLIP ViT-L/14 (openai)
            Cluster(rows_per_cluster=9_000),
            SemDedup(rule="semdedup", eps=0.07, keep="hard"),
        ],
        demo_params={"embed": {"model": DEMO_CLIP}},
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
