"""model: assemble a LLaVA-architecture VLM as a Hugging Face `LlavaForConditionalGeneration`.

`build_llava(vision, llm)` puts together a vision tower (CLIP or SigLIP), LLaVA-1.5's projector
(two linear layers with a GELU between, "mlp2x_gelu") and a causal LM. Each part is a hub id or a
local directory, whose pretrained weights go into the assembled model unchanged, or a config, for
a part with random weights (tests, and experiments on architecture). Image features come from the
vision tower's penultimate layer, as in LLaVA-1.5: without CLIP's CLS token ("default"), and all
of SigLIP's tokens ("full"; SigLIP has no CLS).

`load_llava(path)` continues from any Hugging Face LLaVA checkpoint (ours, or llava-hf's).
`LlavaParts.save_pretrained(path)` writes the model and its processor, so the checkpoint loads
with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`, in the
layout llava-hf publishes (the one vLLM serves).

Nothing is downloaded when the user is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): a part
that is neither a local directory nor in the Hugging Face cache is a `ModelNotFoundError` naming
it. Parts already cached load without a network round trip.

Written against transformers >= 4.56: its `dtype=` argument, and the module layout of 4.52 on
(`model.model.vision_tower`, `model.model.language_model` as the LM's base model,
`model.lm_head`); a different layout is an error, not a silently half-loaded model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    SiglipImageProcessor,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from warren.stages.schema import IMAGE_MARKER


@dataclass(frozen=True)
class _Tower:
    model_class: type
    image_processor_class: type  # for a tower built from a config, which brings none
    strategy: str  # the feature selection LLaVA uses with it
    extra_tokens: int  # tokens the tower adds to its patches


# Vision towers we can take features from, by their vision config's model_type.
VISION_TOWERS: dict[str, _Tower] = {
    "clip_vision_model": _Tower(CLIPVisionModel, CLIPImageProcessor, "default", 1),  # CLS
    "siglip_vision_model": _Tower(SiglipVisionModel, SiglipImageProcessor, "full", 0),
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ModelNotFoundError(ValueError):
    """A model part is neither a local directory nor cached, and cannot be downloaded.

    The trainers' own copy of stages.models' error: trainers import stages for the schema and
    shards only.
    """


@dataclass
class LlavaParts:
    """An assembled model and the processor that feeds it (tokenizer and image processor).

    `num_image_tokens` is how many image-token positions one image fills in `input_ids`, the
    count the templates expand each `<image>` marker to.
    """

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    num_image_tokens: int

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def build_llava(
    vision: str | PretrainedConfig,
    llm: str | PretrainedConfig,
    *,
    tokenizer: Any | None = None,
    image_processor: Any | None = None,
    image_token: str = IMAGE_MARKER,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str | None = None,
    projector_hidden_act: str = "gelu",
    dtype: torch.dtype = torch.float32,
) -> LlavaParts:
    """Assemble a LLaVA model from a vision tower and a causal LM, each an id/path or a config.

    A part given by id or path keeps its pretrained weights, and brings its tokenizer (LM) or
    image processor (vision tower) unless one is passed. A part given as a config gets random
    weights from torch's current seed, and needs `tokenizer` (LM) passed; a vision config gets
    a CLIP or SigLIP image processor sized to it. The projector is always new, with PyTorch's
    default Linear init as in LLaVA. `image_token` is added to the tokenizer as a special token
    when missing, and the embeddings grow to fit it. A tokenizer without a pad token pads with
    its unk token (LLaVA's choice), else its eos; labels mask padding either way.

    `vision_feature_select_strategy` defaults to "default" (drop CLS) for CLIP, "full" for
    SigLIP. Everything is created in `dtype` (float32 by default; transformers would otherwise
    keep each checkpoint's own dtype, and the parts must agree).
    """
    vision_config, vision_model, loaded_image_processor = _vision_part(vision, dtype)
    text_config, lm, loaded_tokenizer = _llm_part(llm, dtype, tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if tokenizer is None:
        raise ValueError("an LLM given as a config needs tokenizer=: there is none to load")
    image_processor = image_processor if image_processor is not None else loaded_image_processor

    tower = VISION_TOWERS[vision_config.model_type]
    strategy = vision_feature_select_strategy or tower.strategy
    if strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', not {strategy!r}"
        )
    _ensure_image_token(tokenizer, image_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    num_image_tokens = _num_image_tokens(vision_config, strategy)

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=num_image_tokens,
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    # Build the shell on the meta device and move the loaded parts in: no second, randomly
    # initialised copy of a 7B LM in memory, no copying of weights, and the parts keep their
    # non-persistent buffers (rotary frequencies, position ids) that a state dict would lose.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    _check_layout(model)
    for name, part, slot in (
        ("vision tower", vision_model, model.model.vision_tower),
        ("language model", lm.base_model, model.model.language_model),
    ):
        if type(part) is not type(slot):
            raise TypeError(
                f"the {name} loaded as {type(part).__name__}, but LlavaForConditionalGeneration "
                f"builds a {type(slot).__name__} for its config"
            )
    model.model.vision_tower = vision_model
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"assembling the model left tensors without data: {on_meta[:5]}")

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # Grow only: many LMs pad their embedding matrix past the tokenizer (Qwen2.5 by ~200
        # rows), and shrinking it would drop rows the checkpoint trained.
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = _generation_config(lm, tokenizer)
    model.eval()  # as from_pretrained returns models; the trainer switches to train()

    if image_processor is None:
        image_processor = _image_processor_for(tower.image_processor_class, vision_config)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        image_token=image_token,
        num_additional_image_tokens=tower.extra_tokens,
    )
    return LlavaParts(model, processor, num_image_tokens)


def load_llava(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **load: Any
) -> LlavaParts:
    """Load a Hugging Face LLaVA checkpoint (model and processor) to continue training it;
    `load` goes to the model's `from_pretrained` (a quantization config, a device map)."""
    spec = os.fspath(path)
    model = _pretrained(
        LlavaForConditionalGeneration.from_pretrained, spec, "LLaVA checkpoint", dtype=dtype, **load
    )
    _check_layout(model)
    processor = _pretrained(AutoProcessor.from_pretrained, spec, "LLaVA checkpoint")
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"{spec!r} holds a {type(processor).__name__}, expected a LlavaProcessor")
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id != model.config.image_token_index:
        raise ValueError(
            f"{spec!r}: the tokenizer's image token {processor.image_token!r} is id {token_id}, "
            f"the model's config says {model.config.image_token_index}"
        )
    strategy = model.config.vision_feature_select_strategy
    return LlavaParts(model, processor, _num_image_tokens(model.config.vision_config, strategy))


def _vision_part(
    vision: str | PretrainedConfig, dtype: torch.dtype
) -> tuple[PretrainedConfig, torch.nn.Module, Any | None]:
    if isinstance(vision, PretrainedConfig):
        config = _vision_config(vision, "the vision config")
        return config, AutoModel.from_config(config).to(dtype), None
    spec = os.fspath(vision)
    config = _pretrained(AutoConfig.from_pretrained, spec, "vision tower")
    config = _vision_config(config, f"vision tower {spec!r}")
    # The vision tower's own class: from a full CLIP/SigLIP checkpoint it takes the vision
    # weights and leaves the text tower on disk.
    model_class = VISION_TOWERS[config.model_type].model_class
    module = _pretrained(model_class.from_pretrained, spec, "vision tower", dtype=dtype)
    image_processor = _pretrained(AutoImageProcessor.from_pretrained, spec, "vision tower")
    return config, module, image_processor


def _vision_config(config: PretrainedConfig, what: str) -> PretrainedConfig:
    """The vision tower's config, from a vision config or a full CLIP/SigLIP config."""
    config = getattr(config, "vision_config", None) or config
    if config.model_type not in VISION_TOWERS:
        raise ValueError(
            f"{what} is a {config.model_type!r} model; the vision tower must be one of "
            f"{', '.join(VISION_TOWERS)} (a CLIP or SigLIP model)"
        )
    return config


def _llm_part(
    llm: str | PretrainedConfig, dtype: torch.dtype, want_tokenizer: bool
) -> tuple[PretrainedConfig, torch.nn.Module, Any | None]:
    if isinstance(llm, PretrainedConfig):
        return llm, AutoModelForCausalLM.from_config(llm).to(dtype), None
    spec = os.fspath(llm)
    lm = _pretrained(AutoModelForCausalLM.from_pretrained, spec, "language model", dtype=dtype)
    tokenizer = (
        _pretrained(AutoTokenizer.from_pretrained, spec, "language model")
        if want_tokenizer
        else None
    )
    return lm.config, lm, tokenizer


def _ensure_image_token(tokenizer: Any, image_token: str) -> None:
    from tokenizers import AddedToken

    if image_token not in tokenizer.get_vocab():
        # special: never split, never merged with neighbours; normalized=False: matched verbatim.
        tokenizer.add_tokens(
            [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
        )
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer splits the image token {image_token!r} into {len(ids)} tokens; "
            "give an image_token that is one token"
        )


def _num_image_tokens(vision_config: PretrainedConfig, strategy: str) -> int:
    """Image-token positions per image, counted as LlavaProcessor counts them."""
    side = vision_config.image_size // vision_config.patch_size
    extra = VISION_TOWERS[vision_config.model_type].extra_tokens
    return side * side + extra - (1 if strategy == "default" else 0)


def _image_processor_for(processor_class: type, vision_config: PretrainedConfig) -> Any:
    size = vision_config.image_size
    if processor_class is CLIPImageProcessor:
        return CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return processor_class(size={"height": size, "width": size})


def _generation_config(lm: torch.nn.Module, tokenizer: Any) -> GenerationConfig:
    # The LM's own generation settings (eos ids, sampling defaults) are what it was tuned with;
    # a config-built LM has none beyond transformers' defaults, so take the ids from the tokenizer.
    config = GenerationConfig.from_dict(lm.generation_config.to_dict())
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _check_layout(model: LlavaForConditionalGeneration) -> None:
    inner = getattr(model, "model", None)
    if not all(
        hasattr(inner, a) for a in ("vision_tower", "language_model", "multi_modal_projector")
    ):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} lays LlavaForConditionalGeneration out "
            "differently from the layout this module assembles; install transformers>=4.56"
        )


def _is_offline() -> bool:
    if any(
        os.environ.get(k, "").strip().lower() in {"1", "on", "yes", "true"} for k in _OFFLINE_VARS
    ):
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # older huggingface_hub
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _pretrained(load: Callable[..., Any], spec: str, what: str, **kwargs: Any) -> Any:
    """`load(spec, ...)` (a from_pretrained) from a local directory or the cache first, and from
    the hub only when that fails and the user is online; not found is a ModelNotFoundError."""
    attempts = [True] if os.path.isdir(spec) or _is_offline() else [True, False]
    last: BaseException | None = None
    for local_only in attempts:
        try:
            return load(spec, local_files_only=local_only, **kwargs)
        except OSError as exc:  # transformers' and huggingface_hub's "not found" and offline errors
            last = exc
    offline = " (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if _is_offline() else ""
    reason = " ".join(str(last).split())
    raise ModelNotFoundError(
        f"{what} {spec!r} is not available{offline}: {reason}. Give a local model directory, or "
        "a hub id whose files are in the Hugging Face cache"
    ) from last
