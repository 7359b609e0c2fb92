"""llama3_pretrain: the image-text pretraining data recipe of the Llama 3 paper (section 7.1.1).

The paper's steps, in its order, one stage each:

1. quality filtering: drop non-English captions (`language`, en) and low-quality ones by heuristics
   (`caption_filter`: boilerplate, too few words, repetition), and pairs with a low CLIP score:
   `embed` (CLIP ViT-L/14, openai) and `clip_score`, keeping the top 30% (the paper gives no
   threshold; DataComp's best CLIP filter with ViT-L/14 keeps 30%);
2. de-duplication with SSCD copy-detection descriptors (`sscd`, `sscd_disc_mixup`, 512-d): the
   pool pre-clustered with k-means (`cluster` on `sscd_emb`, faiss), each image's nearest
   neighbours searched with faiss inside its cluster (`semdedup`, `rule=components`, `k=20`),
   pairs above a cosine threshold linked (0.75: the paper gives none), connected components
   grouped and one pair kept per component (`keep=first`: the smallest id);
3. resampling by caption n-grams (`ngram_resample`): a pair with an n-gram in fewer than T rows is
   kept, otherwise each of its n-grams is drawn with probability sqrt(T / f) and the pair kept when
   any is. The paper builds its n-gram vocabulary from high-quality text sources and gives
   neither it nor T: give a vocabulary (`--ngram_resample.ngrams FILE`, one entry per line, e.g.
   MetaCLIP's metadata entries), else the pool's own caption words in two rows or more are
   counted; T is `--ngram_resample.ngram_threshold` (default 20,000, MetaCLIP's t for its 400M
   pool);
4. optical character recognition (`ocr`, RapidOCR): the text written in the image is appended to
   the caption (`append_text`), the caption as it was kept in `original_caption`.

Not in the paper, scored for later filtering (no threshold is applied): LAION's aesthetic score
(`aesthetic`, from the CLIP ViT-L/14 embeddings of step 1) and watermark probability
(`watermark`), the scores LAION-style pipelines filter on; `--aesthetic.min_score 5` or
`--watermark.max_score 0.8` turn them into filters.

    python pipelines/llama3_pretrain.py            # the bundled demo pool, offline: demo models
    python pipelines/llama3_pretrain.py --input pool/ --output out/ \\
        --ngram_resample.ngrams vocabulary.txt     # CLIP ViT-L/14, sscd_disc_mixup, RapidOCR

On the demo pool the models are the demo's (the demo CLIP; `sscd:demo`, a weight-free thumbnail
descriptor that finds re-encoded, resized and mirrored copies), the n-gram vocabulary is built from
the demo captions (`demo_data/demo_ngrams.txt`) with T = 5, and the k-means clusters are small.
"""

from __future__ import annotations

import sys
from pathlib import Path

from warren.pipelines.recipe import DEMO_CLIP, main
from warren.pipelines.registry import recipe
from warren.pipelines.runner import Pipeline
from warren.stages.aesthetic import Aesthetic
from warren.stages.caption_check import CaptionCheck
from warren.stages.caption_filter import CaptionFilter
from warren.stages.clip_score import ClipScore
from warren.stages.cluster import Cluster
from warren.stages.embed import Embed
from warren.stages.image_check import ImageCheck
from warren.stages.language import Language
from warren.stages.ngram_resample import NgramResample
from warren.stages.ocr import Ocr
from warren.stages.semdedup import SemDedup
from warren.stages.sscd import Sscd
from warren.stages.watermark import Watermark

DEMO_NGRAMS = str(Path(__file__).resolve().parent / "demo_data" / "demo_ngrams.txt")


@recipe("llama3_pretrain")
def pipeline() -> Pipeline:
    return Pipeline(
        name="llama3_pretrain",
        description="English, caption heuristics, CLIP-score top 30%, SSCD copy dedup "
        "(k-means, faiss kNN, components), caption n-gram resampling, OCR text appended; "
        "aesthetic and watermark scored",
        stages=[
            ImageCheck(),
            CaptionCheck(),
            Language(),  # English
            CaptionFilter(),
            Embed(),  # CLIP ViT-L/14 (openai)
            ClipScore(lo=0.0, hi=0.3),
            Sscd(),  # sscd_disc_mixup
            Cluster(column="sscd_emb", rows_per_cluster=20_000),
            SemDedup(rule="components", column="sscd_emb", threshold=0.75, k=20, keep="first"),
            NgramResample(ngram_threshold=20_000),
            Ocr(append_text=True),
            Aesthetic(),  # scored only
            Watermark(max_score=1.0),  # scored only
        ],
        demo_params={
            "embed": {"model": DEMO_CLIP},
            "sscd": {"model": "sscd:demo"},
            "cluster": {"rows_per_cluster": 50},
            "semdedup": {"threshold": 0.9},
            "ngram_resample": {"ngrams": DEMO_NGRAMS, "ngram_threshold": 5},
            "aesthetic": {"model": "demo"},
            "watermark": {"model": "demo"},
        },
    )


if __name__ == "__main__":
    sys.exit(main(pipeline()))
