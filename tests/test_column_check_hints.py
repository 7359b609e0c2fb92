"""The column check names the stage that adds a missing column, also when the stage declares its
columns through `added_columns()` (they depend on its parameters) rather than `adds`."""

from __future__ import annotations

from warren.pipelines.plan import column_problems
from warren.stages.cluster import Cluster
from warren.stages.embed import Embed
from warren.stages.select import RankWindow
from warren.stages.semdedup import SemDedup


def test_a_missing_embedding_names_the_embed_stage():
    (problem,) = column_problems([Cluster()], known_stages=[Embed, Cluster, SemDedup])
    assert problem == (
        "cluster: requires column 'image_emb', which no stage before it adds "
        "(the `embed` stage adds it)"
    )


def test_a_stage_that_cannot_be_built_with_its_defaults_is_skipped():
    class NeedsParams(RankWindow):
        name = "needs_params"

        def __init__(self, *args, **kwargs):
            raise TypeError("needs parameters")

    (problem,) = column_problems([Cluster()], known_stages=[NeedsParams, Embed])
    assert problem.endswith("(the `embed` stage adds it)")
