"""bunny_pretrain: a Bunny-pretrain-style coreset from a LAION-like image-text pool.

The method of Bunny's data selection, one stage per step:

1. embed images and captions with CLIP (Bunny: ViT-L/14), L2-normalised;
2. k-means on the image embeddings (Bunny: ~20k rows per cluster), optionally dropping clusters;
3. inside each cluster, link images with cosine > 0.86 and keep the middle item of each component;
4. rank the survivors by image-text cosine and keep ranks 40%-60%;
5. rank those by cosine to their centroid and keep ranks 15%-35%;
6. draw N rows uniformly at random (Bunny: 2M).

    python pipelines/bunny_pretrain.py            # the bundled demo pool, with the demo CLIP
    ray job submit --working-dir . -- python pipelines/bunny_pretrain.py \\
        --input s3://bucket/pool/ --output s3://bucket/bunny/   # CLIP ViT-L/14 (openai)
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import DEMO_CLIP, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.caption_check import CaptionCheck
from warren.stages.clip_score import ClipScore
from warren.stages.cluster import Cluster
from warren.stages.embed import Embed
from warren.stages.image_check import ImageCheck
from warren.stages.select import RankWindow, Sample
from warren.stages.semdedup import SemDedup


@recipe("bunny_pretrain")
def pipeline() -> Pipeline:
    return Pipeline(
        name="bunny_pretrain",
        description="embed, k-means, component dedup (0.86), CLIP-score window 40-60%, "
        "centroid window 15-35%, sample N",
        stages=[
            ImageCheck(),
            CaptionCheck(),
            Embed(),  # CLIP ViT-L/14 (openai), as Bunny
            Cluster(rows_per_cluster=20_000),
            SemDedup(rule="components", threshold=0.86, keep="middle"),
            ClipScore(lo=0.4, hi=0.6),
            RankWindow(stage_name="centroid_window", column="cos_to_centroid", lo=0.15, hi=0.35),
            Sample(n=2_000_000, seed=0),
        ],
        # No pretrained CLIP can be fetched offline; the demo pool gets the demo CLIP trained on it.
        demo_params={"embed": {"model": DEMO_CLIP}},
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
