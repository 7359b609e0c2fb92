"""Tiny models and tokenizers for the trainer tests, built offline from configs."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig

# The product's own (the demo proxy of `warren compare` uses it too).
from warren.trainers.compare import word_level_tokenizer  # noqa: F401

# 32 px images in 8 px patches: 16 patch tokens (+ CLIP's CLS), width 32, two layers.
TOWER = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def vision_config(**kw) -> CLIPVisionConfig:
    return CLIPVisionConfig(**TOWER, **kw)


def siglip_config(**kw) -> SiglipVisionConfig:
    return SiglipVisionConfig(**TOWER, **kw)


def llm_config(vocab_size: int, max_positions: int = 256) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
