"""Assembling LLaVA models: tiny towers and LMs from configs (fixed seeds, no download), and the
id/path loading path exercised on tiny checkpoints saved to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_trainers_templates import tiny_tokenizer
from tiny_models import llm_config, siglip_config, vision_config
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from warren.trainers.model import ModelNotFoundError, build_llava, load_llava
from warren.trainers.templates import ConversationEncoder

CAPTION_ROW = {
    "id": "c1",
    "images": [{"bytes": None, "path": None}],
    "caption": "a red cat sits on a mat.",
}
CHAT_ROW = {
    "id": "r1",
    "images": [{"bytes": None, "path": None}],
    "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the picture?"},
        {"from": "gpt", "value": "a red cat sits on a mat."},
    ],
}


def image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return build_llava(vision_config(), llm_config(len(tok)), tokenizer=tok)


def batch(parts, row: dict, template: str = "vicuna_v1") -> dict:
    sample = ConversationEncoder(
        parts.tokenizer, template, num_image_tokens=parts.num_image_tokens
    ).encode(row)
    pixels = parts.image_processor(images=[image()], return_tensors="pt")["pixel_values"]
    return {
        "input_ids": torch.tensor([sample.input_ids]),
        "labels": torch.tensor([sample.labels]),
        "pixel_values": pixels,
    }


def test_a_model_from_configs_is_llava_15_shaped(parts):
    config = parts.model.config
    tok = parts.tokenizer
    assert config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu"
    # (32 / 8)^2 patches; CLIP's CLS token is dropped.
    assert parts.num_image_tokens == config.image_seq_length == 16
    projector = parts.model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_2.out_features) == (32, 32)
    assert parts.model.generation_config.eos_token_id == tok.eos_token_id


def test_forward_gives_a_loss_whose_gradient_reaches_the_projector(parts):
    model = parts.model
    out = model(**batch(parts, CHAT_ROW))
    assert out.logits.shape[:2] == (1, len(batch(parts, CHAT_ROW)["input_ids"][0]))
    assert torch.isfinite(out.loss)
    model.zero_grad()
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_the_image_changes_the_answer_logits(parts):
    inputs = batch(parts, CHAT_ROW)
    other = parts.image_processor(images=[image(seed=1)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a = parts.model(**inputs).logits
        b = parts.model(**{**inputs, "pixel_values": other}).logits
    assert not torch.allclose(a, b)


def test_generate_continues_a_prompt_with_an_image(parts):
    inputs = batch(parts, CHAT_ROW)
    # The prompt is everything before the first token in the loss.
    prompt_length = int((inputs["labels"][0] == -100).long().argmin())
    prompt = inputs["input_ids"][:, :prompt_length]
    with torch.no_grad():
        out = parts.model.generate(
            input_ids=prompt,
            pixel_values=inputs["pixel_values"],
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    assert out.shape == (1, prompt_length + 4)
    assert torch.equal(out[:, :prompt_length], prompt)


def test_template_expansion_matches_the_llava_processor(parts):
    # LlavaProcessor is what serving uses; the template must give the model the same sequence.
    served = parts.processor(
        text="<image>a red cat sits on a mat.</s>", images=[image()], return_tensors="pt"
    )
    sample = ConversationEncoder(
        parts.tokenizer, "plain", num_image_tokens=parts.num_image_tokens
    ).encode(CAPTION_ROW)
    assert served["input_ids"][0].tolist() == sample.input_ids


def test_save_pretrained_round_trip_gives_identical_logits(parts, tmp_path):
    parts.save_pretrained(tmp_path)
    inputs = batch(parts, CHAT_ROW)
    inputs.pop("labels")
    with torch.no_grad():
        before = parts.model(**inputs).logits
        plain = LlavaForConditionalGeneration.from_pretrained(tmp_path)
        assert torch.equal(plain(**inputs).logits, before)
        loaded = load_llava(tmp_path)
        assert torch.equal(loaded.model(**inputs).logits, before)
    assert loaded.num_image_tokens == parts.num_image_tokens
    assert loaded.image_token == "<image>"
    assert loaded.tokenizer.get_vocab() == parts.tokenizer.get_vocab()


def test_a_missing_image_token_is_added_and_the_embeddings_grow():
    tok = tiny_tokenizer(image_token=False)
    vocab = len(tok)
    torch.manual_seed(0)
    parts = build_llava(vision_config(), llm_config(vocab), tokenizer=tok)
    assert len(tok) == vocab + 1
    assert parts.model.config.image_token_index == tok.convert_tokens_to_ids("<image>") == vocab
    assert parts.model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert parts.model.lm_head.weight.shape[0] == parts.model.config.text_config.vocab_size
    assert parts.model.config.text_config.vocab_size == vocab + 1
    assert torch.isfinite(parts.model(**batch(parts, CAPTION_ROW, "plain")).loss)


def test_a_siglip_tower_feeds_all_its_patch_tokens():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    siglip = siglip_config()
    parts = build_llava(siglip, llm_config(len(tok)), tokenizer=tok)
    assert parts.model.config.vision_feature_select_strategy == "full"
    assert parts.num_image_tokens == 16  # no CLS to drop
    assert torch.isfinite(parts.model(**batch(parts, CHAT_ROW)).loss)


def test_parts_given_by_path_keep_their_pretrained_weights(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    # A full CLIP checkpoint (both towers), as openai/clip-vit-large-patch14-336 is.
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision_config().to_dict(),
            text_config={
                "vocab_size": 16,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "max_position_embeddings": 8,
            },
            projection_dim=16,
        )
    ).eval()
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "clip")
    lm = LlamaForCausalLM(llm_config(len(tok))).eval()
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")

    parts = build_llava(str(tmp_path / "clip"), str(tmp_path / "lm"))
    pixels = parts.image_processor(images=[image()], return_tensors="pt")["pixel_values"]
    text = torch.tensor([tok.encode("what is in the picture?")])
    with torch.no_grad():
        tower = parts.model.model.vision_tower(pixels).last_hidden_state
        assert torch.equal(tower, clip.vision_model(pixels).last_hidden_state)
        assert torch.equal(parts.model(input_ids=text).logits, lm(input_ids=text).logits)
    assert parts.tokenizer.get_vocab() == tok.get_vocab()  # it already had <image>
    assert torch.isfinite(parts.model(**batch(parts, CHAT_ROW)).loss)


def test_a_model_that_is_not_on_this_machine_is_a_clear_error_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="vision tower 'nobody/no-such-clip'.*offline"):
        build_llava("nobody/no-such-clip", llm_config(8), tokenizer=tiny_tokenizer())
    with pytest.raises(ModelNotFoundError, match="LLaVA checkpoint"):
        load_llava(tmp_path / "nothing-here")


def test_an_lm_config_without_a_tokenizer_is_refused():
    with pytest.raises(ValueError, match="needs tokenizer="):
        build_llava(vision_config(), llm_config(8))


def test_an_lm_with_tied_embeddings_stays_tied_through_resize_and_reload(tmp_path):
    # Small LMs (Qwen2.5-0.5B, SmolLM) tie lm_head to the input embeddings.
    tok = tiny_tokenizer(image_token=False)
    config = llm_config(len(tok))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    parts = build_llava(vision_config(), config, tokenizer=tok)
    model = parts.model
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.shape[0] == len(tok)
    parts.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    inputs = batch(parts, CHAT_ROW)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
