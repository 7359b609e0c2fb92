"""llava_instruct: LLaVA-158K-style instruction data from captions and object boxes.

The method of LLaVA's data generation (Liu et al., 2023), one stage:

1. for each image, draw a prompt type (conversation, detail, complex reasoning; LLaVA-158K:
   58k / 23k / 77k), show a text-only model the image's captions and boxes, and turn its reply
   into LLaVA conversations with "<image>" in the first human turn.

    export OPENAI_API_KEY=...
    python pipelines/llava_instruct.py --input coco/annotations/captions_train2017.json \\
        --input-format coco \\
        --input-option instances=coco/annotations/instances_train2017.json \\
        --llava_generate.mix "conversation=0.37,detail=0.15,complex_reasoning=0.48" \\
        --llava_generate.max_total_tokens 5000000
    python pipelines/llava_instruct.py --llava_generate.base_url http://vllm-host:8000/v1 \\
        --llava_generate.model Qwen/Qwen2.5-72B-Instruct     # a served model, no key needed

Without --input it reads the bundled demo pool (captions, no boxes) and sends its 658 rows to
the endpoint. Responses are cached under --llava_generate.cache_dir, so a re-run, or a run with a
larger budget after a budget stop, pays only for what was never answered.
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.generate import LlavaGenerate


@recipe("llava_instruct")
def pipeline() -> Pipeline:
    return Pipeline(
        name="llava_instruct",
        description="LLaVA-158K generation: conversation / detail / complex reasoning from "
        "captions and boxes",
        stages=[
            LlavaGenerate(),
        ],
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
