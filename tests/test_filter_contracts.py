"""The stage contract of the per-row filter, model-scoring and generation stages: the columns each
declares it adds are exactly the columns its output has beyond its input's (with the declared
types), the columns it requires follow its parameters, and its thresholds are the ones its
parameters set, with their direction and the value that turns each off."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray
from fake_chat_server import ScriptedChatServer
from PIL import Image
from tiny_models import llm_config, word_level_tokenizer

from warren.stages.base import GlobalContext, Stage, Threshold
from warren.stages.capfusion import CapFusion
from warren.stages.caption_check import CaptionCheck
from warren.stages.caption_filter import CaptionFilter
from warren.stages.export_check import ExportCheck
from warren.stages.generate import AllavaGenerate, LlavaGenerate
from warren.stages.image_check import ImageCheck
from warren.stages.image_filter import ImageFilter
from warren.stages.language import Language
from warren.stages.nsfw import Nsfw
from warren.stages.perplexity import Perplexity, PplFilter
from warren.stages.recaption import Recaption
from warren.stages.schema import REJECT_COLUMN, image_value, rows_to_table

KEY_ENV = "WARREN_TEST_CONTRACT_KEY"
WORDS = "a the small brown dog cat sits runs on in green grass field red ball".split()
QA_REPLY = '[{"question": "What is in the picture?", "answer": "A small brown dog."}]'


def _png(seed: int, size: tuple[int, int] = (300, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _rows(required: tuple[str, ...] = ()) -> pa.Table:
    """Caption rows with one image each, an instruction row, and a row without an image; with the
    web caption recaption keeps in `original_caption` when the stage requires it."""
    rows = [
        {
            "id": "dog",
            "images": [image_value(_png(1))],
            "caption": "a small brown dog sits on the green grass",
            "original_caption": "dog in field",
            "source": "web",
        },
        {
            "id": "cat",
            "images": [image_value(_png(2))],
            "caption": "the cat runs in a field",
            "original_caption": "cat",
            "source": "web",
        },
        {
            "id": "talk",
            "images": [image_value(_png(3))],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A red ball on the grass."},
            ],
            "original_caption": "ball",
            "source": "chat",
        },
        {"id": "text", "caption": "a red ball", "original_caption": "ball", "source": "web"},
    ]
    if "original_caption" not in required:
        for row in rows:
            del row["original_caption"]
    return rows_to_table(rows)


def _tiny_lm(folder: Path) -> str:
    from transformers import LlamaForCausalLM

    tok = word_level_tokenizer([" ".join(WORDS)], special=())
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    LlamaForCausalLM(llm_config(len(tok), max_positions=64)).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _endpoint(server: ScriptedChatServer, tmp_path: Path) -> dict[str, Any]:
    return dict(
        model="served",
        base_url=server.url,
        api_key_env=KEY_ENV,
        cache_dir=str(tmp_path / "cache"),
        max_attempts=1,
    )


#: name -> (builds the stage, given a tmp folder and a fake endpoint's settings; needs an endpoint)
BATCH_STAGES: dict[str, tuple[Callable[[Path, dict[str, Any]], Stage], bool]] = {
    "image_check": (lambda tmp, ep: ImageCheck(), False),
    "image_filter": (lambda tmp, ep: ImageFilter(), False),
    "caption_check": (lambda tmp, ep: CaptionCheck(), False),
    "caption_filter": (lambda tmp, ep: CaptionFilter(), False),
    "language": (lambda tmp, ep: Language(), False),
    "nsfw": (lambda tmp, ep: Nsfw(), False),
    "export_check": (lambda tmp, ep: ExportCheck(), False),
    "perplexity": (lambda tmp, ep: Perplexity(model=_tiny_lm(tmp / "lm")), False),
    "llava_generate": (lambda tmp, ep: LlavaGenerate(**ep), True),
    "allava_generate": (lambda tmp, ep: AllavaGenerate(**ep), True),
    "recaption": (lambda tmp, ep: Recaption(backend="endpoint", **ep), True),
    "capfusion": (lambda tmp, ep: CapFusion(backend="endpoint", **ep), True),
}


def _check_added(stage: Stage, before: pa.Schema, after: pa.Schema) -> None:
    new = set(after.names) - set(before.names) - {REJECT_COLUMN}
    declared = stage.added_columns()
    assert new == set(declared), stage.name
    for name in new:
        assert after.field(name).type == declared[name], (stage.name, name)


@pytest.mark.parametrize("name", sorted(BATCH_STAGES))
def test_a_batch_stage_adds_exactly_the_columns_it_declares(name, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-contract-test")
    build, needs_endpoint = BATCH_STAGES[name]
    if needs_endpoint:
        with ScriptedChatServer(lambda messages: (200, QA_REPLY, "stop")) as server:
            stage = build(tmp_path, _endpoint(server, tmp_path))
            table = _rows(stage.required_columns())
            out = stage.process(table)
            assert server.log, "the stage sent no request: the check would prove nothing"
    else:
        stage = build(tmp_path, {})
        table = _rows(stage.required_columns())
        stage.setup()
        out = stage.process(table)
    assert out.num_rows == table.num_rows
    _check_added(stage, table.schema, out.schema)


@pytest.mark.parametrize("normalize", ["none", "source"])
def test_ppl_filter_adds_exactly_the_columns_it_declares(ray_session, normalize) -> None:
    rng = np.random.default_rng(0)
    table = rows_to_table(
        [
            {"id": f"r{i}", "ppl": float(rng.uniform(2, 50)), "source": f"s{i % 2}"}
            for i in range(12)
        ]
    )
    stage = PplFilter(keep_lowest=0.5, normalize=normalize)
    ds = ray.data.from_arrow(table)
    out = stage.run(ds, GlobalContext(num_rows=12, num_shards=1, num_cpus=2)).materialize()
    assert out.count() == 12
    after = pa.schema(list(zip(out.schema().names, out.schema().types, strict=True)))
    _check_added(stage, table.schema, after)


def test_required_columns_follow_the_parameters() -> None:
    assert Perplexity().required_columns() == ()  # the caption is a core column
    assert Perplexity(column="synthetic_caption").required_columns() == ("synthetic_caption",)
    assert PplFilter().required_columns() == ("ppl",)
    assert PplFilter(normalize="source").required_columns() == ("ppl",)  # source is core
    assert PplFilter(normalize="source", source_column="task").required_columns() == (
        "ppl",
        "task",
    )
    assert CapFusion(backend="endpoint", api_key_env=KEY_ENV).required_columns() == (
        "original_caption",
    )
    assert ImageFilter().required_columns() == ()  # reads image_check's sizes only if present
    assert set(PplFilter(normalize="source").added_columns()) == {"ppl_norm", "ppl_norm_rank"}
    assert PplFilter().added_columns() == {"ppl_rank": pa.int64()}


def _t(param: str, kind: str, column: str, value: float, descending: bool = True) -> Threshold:
    return Threshold(param, kind, column, value, descending)


def test_thresholds_are_the_parameters_that_set_them() -> None:
    image = ImageFilter(
        min_width=100,
        min_height=0,
        max_width=0,
        max_height=500,
        max_aspect_ratio=2.5,
        min_bytes=10,
        max_bytes=0,
        max_frames=0,
        max_blank_share=0.9,
    )
    assert image.thresholds() == [
        _t("min_width", "min", "width", 100),
        _t("max_height", "max", "height", 500),
        _t("max_aspect_ratio", "max", "aspect_ratio", 2.5),
        _t("min_bytes", "min", "image_bytes", 10),
        _t("max_blank_share", "max", "blank_share", 0.9),
    ]
    assert ImageFilter().thresholds() == [
        _t("min_width", "min", "width", 200),
        _t("min_height", "min", "height", 200),
        _t("max_aspect_ratio", "max", "aspect_ratio", 3.0),
        _t("max_frames", "max", "n_frames", 1),
        _t("max_blank_share", "max", "blank_share", 0.98),
    ]
    caption = CaptionFilter(
        min_words=0,
        max_words=40,
        min_chars=6,
        max_chars=0,
        max_char_rep_ratio=0.3,
        max_word_rep_ratio=0,
    )
    assert caption.thresholds() == [
        _t("max_words", "max", "caption_words", 40),
        _t("min_chars", "min", "caption_chars", 6),
        _t("max_char_rep_ratio", "max", "char_rep_ratio", 0.3),
    ]
    # caption_check measures what caption_filter writes as caption_chars; 0 turns min_chars off,
    # max_chars has no off value.
    assert CaptionCheck(min_chars=0, max_chars=500).thresholds() == [
        _t("max_chars", "max", "caption_chars", 500)
    ]
    assert Language(min_score=0.7).thresholds() == [_t("min_score", "min", "lang_score", 0.7)]
    assert Language(min_score=0).thresholds() == []
    assert Language(languages="", min_score=0.7).thresholds() == []  # no rule at all
    assert Nsfw(max_score=0.3).thresholds() == [_t("max_score", "max", "nsfw_score", 0.3)]
    assert Nsfw(max_score=1.0).thresholds() == []  # a probability is never above 1: scores only
    assert Perplexity(max_ppl=500).thresholds() == [_t("max_ppl", "max", "ppl", 500)]
    assert Perplexity().thresholds() == []
    assert PplFilter(keep_lowest=0.2).thresholds() == [
        _t("keep_lowest", "rank_hi", "ppl", 0.2, descending=False)
    ]
    assert PplFilter(keep_lowest=0.25, normalize="source").thresholds() == [
        _t("keep_lowest", "rank_hi", "ppl_norm", 0.25, descending=False)
    ]
    assert PplFilter(keep_lowest=1.0).thresholds() == []
    for stage in (ImageCheck(), ExportCheck(), Recaption(), CapFusion()):
        assert stage.thresholds() == [], stage.name
