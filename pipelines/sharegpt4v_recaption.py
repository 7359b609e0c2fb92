"""sharegpt4v_recaption: replace short alt-text with detailed captions written by a VLM.

The method of ShareGPT4V's pretraining data (Chen et al., 2023): ShareCaptioner looked at each
image and wrote a long, faithful caption (1.2M of them), decoding with 3 beams, repetition penalty
1.5 and up to 500 new tokens. One check and one stage (after `subsample`, which keeps every row
unless `--subsample.n N` asks for a seeded slice to try first):

1. `image_check`: undecodable images are rejected before any model time is spent on them;
2. `recaption`: the `detailed_caption` prompt (prompts/recaption) to a vision-language model; the
   new caption goes to `caption`, the old one to `original_caption`, with `gen_*` provenance.

    python pipelines/sharegpt4v_recaption.py --input pool/ \\
        --recaption.model llava-hf/llava-1.5-7b-hf           # in-process, one model per GPU
    python pipelines/sharegpt4v_recaption.py --input pool/ --recaption.backend endpoint \\
        --recaption.base_url http://vllm-host:8000/v1 \\
        --recaption.model Qwen/Qwen2-VL-7B-Instruct          # a model vLLM serves

Without --input it reads 64 rows of the bundled demo pool (`--subsample.n 1000` for all 658:
about 7 minutes on 2 CPUs) with the demo VLM (stages/demo_vlm.py: SmolLM2 behind an
untrained vision tower and projector built from configs with a fixed seed), greedy, 32 new
tokens, truncated captions kept: its captions are fluent but do not describe the images; they
show the machinery, not the quality. Give a real model for real captions.
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import ALL_ROWS, DEMO_RECAPTION, DEMO_SUBSAMPLE, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.image_check import ImageCheck
from warren.stages.recaption import Recaption
from warren.stages.select import Sample


@recipe("sharegpt4v_recaption")
def pipeline() -> Pipeline:
    return Pipeline(
        name="sharegpt4v_recaption",
        description="detailed captions from a VLM (ShareCaptioner decoding: 3 beams, repetition "
        "penalty 1.5, 500 tokens)",
        stages=[
            Sample(stage_name="subsample", n=ALL_ROWS),  # --subsample.n N: try it on N rows
            ImageCheck(),
            Recaption(),
        ],
        # No real VLM can be fetched offline: the demo pool gets the demo VLM, greedy and short.
        demo_params={"subsample": DEMO_SUBSAMPLE, "recaption": DEMO_RECAPTION},
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
