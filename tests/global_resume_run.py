"""A run of one global stage (and what it needs before it) for tests/test_global_resume.py:

python tests/global_resume_run.py semdedup|phash POOL OUTPUT NUM_CPUS
"""

from __future__ import annotations

import sys

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.cluster import Cluster
from warren.stages.phash_dedup import PhashDedup
from warren.stages.semdedup import SemDedup


def pipeline(kind: str) -> Pipeline:
    if kind == "semdedup":
        return Pipeline("t", [Cluster(n_clusters=8, niter=5), SemDedup()])
    return Pipeline("t", [PhashDedup()])


if __name__ == "__main__":
    kind, pool, out, cpus = sys.argv[1:5]
    Runner(
        pipeline(kind), pool, out, input_format="parquet", progress=True, num_cpus=int(cpus)
    ).run()
