"""allava: ALLaVA-style captions and instructions written by a vision model looking at each image.

The method of ALLaVA (Chen et al., 2024), one step per stage:

1. reject rows whose image cannot be decoded (no request is paid for a broken image);
2. ask a vision-capable model for a detailed caption of the image, then for one complex question
   from image + caption, then for the answer from image + caption + question. The caption
   replaces `caption` (the previous one stays in `source_caption`); the question/answer pair is
   the row's `conversations`, "<image>" in the question.

    export OPENAI_API_KEY=...
    python pipelines/allava.py --input s3://bucket/images/ --output s3://bucket/allava/ \\
        --allava_generate.model gpt-4o --allava_generate.max_cost 200 \\
        --allava_generate.price_prompt_per_1k 0.0025 --allava_generate.price_completion_per_1k 0.01

Without --input it reads the bundled demo pool and sends each of its images to the endpoint (three
requests per image). Responses are cached under --allava_generate.cache_dir.
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.generate import AllavaGenerate
from warren.stages.image_check import ImageCheck


@recipe("allava")
def pipeline() -> Pipeline:
    return Pipeline(
        name="allava",
        description="ALLaVA generation: detailed caption, question, answer from each image",
        stages=[
            ImageCheck(),
            AllavaGenerate(),
        ],
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
