"""Tiny models and tokenizers for the trainer tests, built offline from configs."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast, SiglipVisionConfig

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


def word_level_tokenizer(
    corpus: Sequence[str], special: Sequence[str] = ("<image>",), plain: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus's words that, like Llama's, puts bos in front of
    what it encodes; `special` are added as special tokens (as llava-hf adds `<image>`), `plain`
    as ordinary added tokens (e.g. a newline)."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if special:
        tok.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True
        )
    if plain:
        tok.add_tokens([AddedToken(t, normalized=False) for t in plain])
    return tok
