"""recaption: detailed captions written by a vision-language model (ShareGPT4V / ShareCaptioner).

Short alt-text is a weak alignment signal; ShareGPT4V and ALLaVA replace it with long captions a
VLM writes looking at the image. One stage, two backends (`backend`):

- `transformers` (default): any image-text-to-text checkpoint (`AutoModelForImageTextToText`:
  LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3, ...) by hub id or local path, loaded once per actor, run
  in batches of `batch_size` rows (left-padded), on a GPU actor pool when the cluster has GPUs and
  on CPU otherwise. The prompt is built with the processor's chat template; a processor without
  one gets LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`.
- `endpoint`: an OpenAI-compatible vision endpoint (vLLM or SGLang serving the model, or a hosted
  API), through the request machinery of the instruction-generation stages (stages/generation_backend.py,
  stages/llm_client.py): bounded concurrency, rate limits, retries, token/cost budget, on-disk
  response cache, API key from the environment only. The image goes as a data URL.

The instruction is the `detailed_caption` prompt in prompts/recaption (its version: `prompt_version`).

Decoding comes from `preset` unless a parameter overrides it (0, or < 0 for temperature, means
"from the preset"): `sharegpt4v` is ShareCaptioner's decoding (beam search with 3 beams,
repetition penalty 1.5, up to 500 new tokens, no sampling), `greedy` is one beam, no penalty, up to
300 tokens. An OpenAI-compatible API has no beam search: the endpoint backend decodes greedily
(temperature 0), sends the repetition penalty as vLLM's `repetition_penalty` extra parameter
(servers without it ignore it), and records what it sent in `gen_params`.

Output: the new caption goes to `caption`; the caption it replaced is kept in `original_caption`
(a row that already has an `original_caption`, recaptioned a second time, keeps its first one);
`gen_model`, `gen_prompt` (`detailed_caption@v1#<sha256[:12]>`), `gen_params` (canonical JSON of
the decoding parameters) record the provenance, and `gen_prompt_tokens`, `gen_completion_tokens`,
`gen_cache_hits` the usage (summed into the run summary).

Rejected rows, with `gen_raw` holding the model's text when there was one:
`recaption: no image`, `recaption: more than one image (N)`, `recaption: undecodable image (...)`,
`recaption: empty answer (...)`, `recaption: refused (...)`, `recaption: truncated (...)` (the
caption hit the new-token cap: raise `max_tokens`, or keep such captions with `keep_truncated`),
`recaption: malformed answer (...)` (it holds an `<image>` marker), `recaption: generation failed
(<error>)` (the model raised on this row; the batch is retried row by row so one bad row does not
take its batch mates down),
`recaption: request failed (...)` and `recaption: not done (budget)` (endpoint backend).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from warren.prompts import Prompt, PromptError, image_mime, load_prompt
from warren.stages.base import param, put_columns, reject
from warren.stages.generation_backend import (
    GEN_COLUMNS,
    USAGE_TYPES,
    ModelOrEndpointParams,
    ModelOrEndpointStage,
    add_usage,
    column_or_nulls,
    generate_each,
    prompt_ref,
)
from warren.stages.images import decode_error_words, endpoint_image_bytes
from warren.stages.llm_client import ChatRequest
from warren.stages.replies import RAW_LIMIT, BadReply, check_reply
from warren.stages.schema import IMAGE_MARKER

PRESETS: dict[str, dict[str, Any]] = {
    # ShareCaptioner's generation settings (ShareGPT4V's release).
    "sharegpt4v": {
        "num_beams": 3,
        "repetition_penalty": 1.5,
        "max_new_tokens": 500,
        "temperature": 0.0,
    },
    "greedy": {
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "max_new_tokens": 300,
        "temperature": 0.0,
    },
}
DEFAULT_VLM = "llava-hf/llava-1.5-7b-hf"
# LLaVA-1.5's conversation format, for processors that carry no chat template.
FALLBACK_TEMPLATE = "USER: {image}\n{instruction} ASSISTANT:"


@dataclasses.dataclass(frozen=True)
class RecaptionParams(ModelOrEndpointParams):
    model: str = param(
        DEFAULT_VLM,
        "transformers: hub id or local dir of an image-text-to-text model; endpoint: the model "
        "name the server serves.",
    )
    preset: str = param(
        "sharegpt4v",
        "Decoding preset: sharegpt4v (ShareCaptioner: 3 beams, repetition penalty 1.5, up to 500 "
        "new tokens, no sampling) or greedy (1 beam, no penalty, up to 300 tokens).",
    )
    num_beams: int = param(0, "Beams (0 = the preset's; transformers backend only).")
    repetition_penalty: float = param(0.0, "Repetition penalty (0 = the preset's).")
    max_tokens: int = param(
        0, "New-token cap (0 = the preset's); a caption cut at it is a rejected row."
    )
    temperature: float = param(-1.0, "Sampling temperature (< 0 = the preset's; 0 = greedy).")
    keep_truncated: bool = param(
        False, "Keep a caption cut at the token cap instead of rejecting it (no half sentences)."
    )


def decoding(params: Any) -> dict[str, Any]:
    """The decoding settings of a recaption/CapFusion-style parameter set: the preset's values,
    overridden by the parameters that are set."""
    if params.preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {params.preset!r}")
    out = dict(PRESETS[params.preset])
    if params.num_beams:
        out["num_beams"] = params.num_beams
    if params.repetition_penalty:
        out["repetition_penalty"] = params.repetition_penalty
    if params.max_tokens:
        out["max_new_tokens"] = params.max_tokens
    if params.temperature >= 0:
        out["temperature"] = params.temperature
    return out


def decode_image(value: Any) -> Any:
    """The RGB picture of an `images` item's bytes, as every stage sees it
    (`stages.images.decode_image`: orientation, transparency on white, first frame); ValueError
    saying why not."""
    from PIL import Image

    from warren.stages.images import decode_image as decode

    data = (value or {}).get("bytes")
    if not data:
        raise ValueError("no image bytes")
    try:
        return decode(data)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(decode_error_words(exc)) from None


class Recaption(ModelOrEndpointStage):
    """Detailed captions from a VLM (in-process transformers or an OpenAI-compatible endpoint)."""

    name = "recaption"
    # 2: the local backend sees images through stages.images (composited, oriented).
    version = "2"
    Params = RecaptionParams
    resources = ModelOrEndpointStage.resources.replace(batch_size=32)
    adds = ("original_caption", *GEN_COLUMNS)

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._vlm = None

    def prompts(self) -> dict[str, Prompt]:
        return {"caption": load_prompt("detailed_caption", self.params.prompt_version or None)}

    def check_decoding(self) -> None:
        settings = decoding(self.params)
        if settings["num_beams"] < 1 or settings["max_new_tokens"] < 1:
            raise ValueError(f"{self.name}: num_beams and max_tokens must be >= 1")
        if self.params.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1")

    def client_config(self, **overrides: Any):
        overrides.setdefault("default_max_tokens", decoding(self.params)["max_new_tokens"])
        return super().client_config(**overrides)

    def request_params(self) -> dict[str, Any]:
        d = decoding(self.params)
        out: dict[str, Any] = {"temperature": d["temperature"], "max_tokens": d["max_new_tokens"]}
        if self.params.backend == "endpoint":
            if d["repetition_penalty"] != 1.0:
                out["extra_body"] = {"repetition_penalty": d["repetition_penalty"]}
            if d["temperature"] > 0:
                out["seed"] = self.params.seed
            return out
        out["num_beams"] = d["num_beams"]
        out["repetition_penalty"] = d["repetition_penalty"]
        if d["temperature"] > 0:
            out["seed"] = self.params.seed
        return out

    def setup(self) -> None:
        super().setup()  # the watchdog
        if self.params.backend == "transformers":
            from warren.stages.lm import load_vlm

            self._vlm = load_vlm(self.params.model, dtype=self.params.dtype)

    # --- the batch ------------------------------------------------------------------------------

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        prompt = self.prompts()["caption"]
        images = column_or_nulls(batch, "images")
        captions = column_or_nulls(batch, "caption")
        originals = column_or_nulls(batch, "original_caption")
        reasons: list[str | None] = [None] * n
        raws: list[str | None] = [None] * n
        usage = np.zeros((n, len(USAGE_TYPES)), dtype=np.int64)
        new_captions: list[str | None] = list(captions)

        todo: dict[int, bytes] = {}
        for i in range(n):
            items = images[i] or []
            if len(items) > 1:
                reasons[i] = f"{self.name}: more than one image ({len(items)})"
            elif not items or not (items[0] or {}).get("bytes"):
                reasons[i] = f"{self.name}: no image"
            else:
                todo[i] = items[0]["bytes"]

        if self.params.backend == "endpoint":
            replies = self._ask_endpoint(prompt, todo, reasons, usage)
        else:
            replies = self._generate_local(prompt, todo, reasons, usage)
        for i, (text, finish, error) in replies.items():
            try:
                if error is not None:
                    raise error
                if finish == "length" and self.params.keep_truncated:
                    finish = "stop"
                new_captions[i] = check_reply(text, finish)
            except BadReply as err:
                reasons[i] = f"{self.name}: {err}"
                raws[i] = text[:RAW_LIMIT] if text is not None else None

        kept_original = [
            o if o is not None else c for o, c in zip(originals, captions, strict=True)
        ]
        ok = [r is None for r in reasons]
        columns: dict[str, pa.Array] = {
            "caption": pa.array(new_captions, pa.string()),
            "original_caption": pa.array(kept_original, pa.string()),
            "gen_model": pa.array([self.gen_model()] * n, pa.string()),
            "gen_prompt": pa.array([prompt_ref(prompt)] * n, pa.string()),
            "gen_params": pa.array([self.gen_params_json()] * n, pa.string()),
            "gen_raw": pa.array(raws, pa.string()),
        }
        for j, (name, t) in enumerate(USAGE_TYPES.items()):
            columns[name] = pa.array(usage[:, j], type=t)
        return reject(put_columns(batch, columns), [not k for k in ok], [r or "" for r in reasons])

    def gen_model(self) -> str:
        if self._vlm is not None:
            return self._vlm.name
        return self.params.model

    def _ask_endpoint(
        self, prompt: Prompt, todo: dict[int, bytes], reasons: list, usage: np.ndarray
    ) -> dict[int, tuple[str | None, str | None, BadReply | None]]:
        rows, requests = [], []
        for i, data in todo.items():
            try:
                # The served model sees the picture every stage sees (see endpoint_image_bytes).
                data = endpoint_image_bytes(data)
                messages = prompt.render({"image": data, "image_mime": image_mime(data)})
            except PromptError as err:
                reasons[i] = f"{self.name}: undecodable image ({err})"
                continue
            except Exception as err:  # noqa: BLE001 - untrusted bytes: PIL raises many types
                reasons[i] = f"{self.name}: undecodable image ({decode_error_words(err)})"
                continue
            rows.append(i)
            requests.append(ChatRequest(messages=messages, params=self.request_params()))
        out = {}
        for i, result in zip(rows, self.ask(requests), strict=True):
            add_usage(usage, i, result)
            error = None if result.ok else self.failure(result)
            out[i] = (result.text, result.finish_reason, error)
        return out

    def _generate_local(
        self, prompt: Prompt, todo: dict[int, bytes], reasons: list, usage: np.ndarray
    ) -> dict[int, tuple[str | None, str | None, BadReply | None]]:
        if self._vlm is None:
            self.setup()
        decoded: dict[int, Any] = {}
        for i, data in todo.items():
            try:
                decoded[i] = decode_image({"bytes": data})
            except ValueError as err:
                reasons[i] = f"{self.name}: undecodable image ({err})"
        rows = sorted(decoded)
        out: dict[int, tuple[str | None, str | None, BadReply | None]] = {}
        step = self.params.batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            replies = generate_each(
                lambda images: self._vlm_generate(prompt, images), [decoded[i] for i in chunk]
            )
            replies = [(None, None, 0, 0, r) if isinstance(r, BadReply) else r for r in replies]
            for i, (text, finish, n_prompt, n_new, error) in zip(chunk, replies, strict=True):
                usage[i, 0] += n_prompt
                usage[i, 1] += n_new
                out[i] = (text, finish, error)
        return out

    def _vlm_generate(
        self, prompt: Prompt, images: Sequence[Any]
    ) -> list[tuple[str | None, str | None, int, int, BadReply | None]]:
        import torch

        from warren.stages.lm import decode_replies, generate_kwargs, stop_token_ids

        vlm = self._vlm
        assert vlm is not None
        d = decoding(self.params)
        text = vlm_prompt(vlm.processor, prompt)
        tok = vlm.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"  # decoder-only generation continues from the right end
        try:
            enc = vlm.processor(
                images=list(images), text=[text] * len(images), padding=True, return_tensors="pt"
            )
        finally:
            tok.padding_side = old_side
        enc = enc.to(vlm.device)
        if "pixel_values" in enc and vlm.module.dtype != torch.float32:
            enc["pixel_values"] = enc["pixel_values"].to(vlm.module.dtype)
        stop = stop_token_ids(vlm.module.generation_config, vlm.module.config, tok)
        kwargs = generate_kwargs(tok, stop, **d, seed=self.params.seed)
        with torch.inference_mode():
            ids = vlm.module.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        new = ids[:, width:].tolist()
        replies = decode_replies(tok, new, stop, d["max_new_tokens"])
        return [
            (reply, finish, int(n_prompt), n_new, None)
            for (reply, finish, n_new), n_prompt in zip(replies, prompt_lens, strict=True)
        ]


def vlm_prompt(processor: Any, prompt: Prompt) -> str:
    """The text of one recaption request for an in-process VLM: the prompt's instruction through
    the processor's chat template (with the system message when the template takes one), or
    LLaVA-1.5's format when the processor has no template."""
    instruction = prompt.user_text({})
    if getattr(processor, "chat_template", None):
        user = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": instruction}],
        }
        system = {"role": "system", "content": [{"type": "text", "text": prompt.system.strip()}]}
        for messages in ([system, user], [user]):
            try:
                return processor.apply_chat_template(messages, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - templates that reject a system turn raise anything
                continue
    token = getattr(processor, "image_token", None) or IMAGE_MARKER
    return FALLBACK_TEMPLATE.format(image=token, instruction=instruction)


__all__ = ["PRESETS", "Recaption", "RecaptionParams", "decoding", "vlm_prompt"]
