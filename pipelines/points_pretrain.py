"""points_pretrain: POINTS-style pretraining captions: recaption, CapFusion, lowest perplexity.

The method of POINTS' pretraining data (Liu et al., 2024), one stage per step:

0. `subsample`: keeps every row unless `--subsample.n N` asks for a seeded slice to try first;
1. `image_check`, `caption_check`: undecodable images and missing captions out first;
2. `recaption`: a vision-language model writes a detailed caption of each image (the
   `detailed_caption` prompt; ShareCaptioner's decoding by default); the web caption moves to
   `original_caption`;
3. `capfusion`: an LLM merges the web caption and the synthetic one (the `capfusion` prompt:
   the synthetic caption's visible content, the web caption's names and facts);
4. `perplexity`: the fused caption's perplexity under a causal LM (SmolLM2-135M-Instruct by
   default, offline), written to `ppl`;
5. `ppl_filter`: keep the 20% of rows with the lowest perplexity, by exact global rank.

    python pipelines/points_pretrain.py --input pool/ \\
        --recaption.model llava-hf/llava-1.5-7b-hf \\
        --capfusion.backend endpoint --capfusion.base_url http://vllm-host:8000/v1 \\
        --capfusion.model Qwen/Qwen2.5-7B-Instruct
    python pipelines/points_pretrain.py --ppl_filter.keep_lowest 0.3   # re-runs the filter alone

Without --input it reads 64 rows of the bundled demo pool (the whole pool takes about 50 minutes
on 2 CPUs: `--subsample.n 1000`): the demo VLM (stages/demo_vlm.py, untrained
vision, so its captions do not describe the images), SmolLM2 for CapFusion and perplexity.
"""

from __future__ import annotations

import sys

from warren.pipelines.recipe import ALL_ROWS, DEMO_RECAPTION, DEMO_SUBSAMPLE, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.capfusion import CapFusion
from warren.stages.caption_check import CaptionCheck
from warren.stages.image_check import ImageCheck
from warren.stages.perplexity import Perplexity, PplFilter
from warren.stages.recaption import Recaption
from warren.stages.select import Sample


@recipe("points_pretrain")
def pipeline() -> Pipeline:
    return Pipeline(
        name="points_pretrain",
        description="recaption, CapFusion, perplexity, keep the lowest 20%",
        stages=[
            Sample(stage_name="subsample", n=ALL_ROWS),  # --subsample.n N: try it on N rows
            ImageCheck(),
            CaptionCheck(),
            Recaption(),
            CapFusion(),
            Perplexity(),  # SmolLM2-135M-Instruct, offline
            PplFilter(keep_lowest=0.2),  # POINTS keeps the 20% with the lowest perplexity
        ],
        demo_params={"subsample": DEMO_SUBSAMPLE, "recaption": DEMO_RECAPTION},
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
