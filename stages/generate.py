"""Instruction generation through a chat endpoint: LLaVA-158K from captions, ALLaVA from images.

- `LlavaGenerate` ("llava_generate"): for each row, one of the LLaVA-158K prompt types
  (`conversation`, `detail`, `complex_reasoning`) drawn from the row id and `mix`, rendered from
  the row's `captions` (else `[caption]`) and `boxes` (else none). JSON answers become alternating
  human/gpt turns; a `detail` description is paired with one of `DETAIL_QUESTIONS`, picked by id.
- `AllavaGenerate` ("allava_generate"): for each row with exactly one image, three rounds, each
  one batched call: a detailed caption of the image, then a question from image + caption, then an
  answer from image + caption + question. As in ALLaVA's release (Caption and Instruct subsets),
  the detailed caption replaces `caption` (pretraining text; the previous one is kept in
  `source_caption`) and `conversations` holds the question/answer pair.

In both, "<image>\\n" starts the first human turn, exactly once. Every output row records
`gen_model`, `gen_prompt` (`<prompt id>#<sha256[:12]>`, several joined by ";") and `gen_params`
(canonical JSON of the API parameters sent; never a key or an endpoint), plus the usage behind it:
`gen_prompt_tokens`, `gen_completion_tokens` (int64, whether paid now or earlier and served from
the cache) and `gen_cache_hits` (int32, responses served from the cache), so run totals are a sum
over the output shards.

Rejected rows (the reason says why; `gen_raw` keeps the model's text when there was one):
`<stage>: malformed answer (...)`, `<stage>: refused (...)`, `<stage>: truncated (...)`,
`<stage>: empty answer (...)`, `<stage>: request failed (<error, key redacted>)`,
`<stage>: not done (budget)`, `<stage>: no caption`, `<stage>: no image`.

Limits and budget. The stage runs as ONE Ray actor (`concurrency = (1, 1)`) that sends the rows of
one batch concurrently and the batches one after another, so `max_concurrency`,
`requests_per_minute` and `tokens_per_minute` bound the whole stage, and the budget
(`max_total_tokens`, `max_cost`) is counted across all batches of one run of the stage (a resumed
run starts a fresh budget for the shards still to do). An endpoint is the bottleneck, not this
process, so one actor loses nothing but the tail of each batch.

After a budget stop, rows not sent are rejected `not done (budget)`, and the stage is complete as
far as the runner is concerned: re-running the same command does not retry them. Raise the budget
(`--llava_generate.max_total_tokens ...`): the parameters change, the stage recomputes, and every
response already paid for is read from the on-disk cache (`cache_dir`) without a request. The same
holds for any parameter change and for `--force`. Changing a prompt file also recomputes the
stage: the prompts' sha256 are part of its cache key. A reply that was rejected is cached like any
other, so a re-run rejects it again for free; to ask anew, change a request parameter
(`temperature`, `max_tokens`) or the `cache_dir`.

Nothing paid is lost: each answer is written to the on-disk cache the moment it arrives (not at
the end of a batch), and when the run's driver dies (kill -9, OOM) the stage's worker sends no
further request, waits for the answers in flight to be cached, and exits (`stages/watchdog.py`).

The API key is read from the environment variable named by `api_key_env` inside the worker; it is
never a parameter, so it reaches no manifest, and the client redacts it from every error text.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from warren.prompts import Prompt, PromptError, image_mime, load_prompt
from warren.stages.base import param
from warren.stages.generation_backend import (
    GEN_COLUMNS,
    USAGE_TYPES,
    ClientParams,
    GenerateStage,
    add_usage,
    column_or_nulls,
    prompt_ref,
)
from warren.stages.images import decode_error_words, endpoint_image_bytes
from warren.stages.llm_client import ChatRequest
from warren.stages.replies import (
    RAW_LIMIT,
    BadReply,
    check_reply,
    parse_json_qa,
    to_conversations,
)

LLAVA_TYPES = ("conversation", "detail", "complex_reasoning")
DEFAULT_MIX = "conversation=0.5,detail=0.25,complex_reasoning=0.25"
# Our own phrasings of "describe the image in detail" for `detail` answers (LLaVA used a list of
# the same kind); one is picked per row from its id, so a re-run writes the same question.
DETAIL_QUESTIONS = (
    "Describe this image in detail.",
    "What do you see in this picture? Please describe it thoroughly.",
    "Give a detailed description of the scene shown in the image.",
    "Can you walk me through everything that is happening in this photo?",
    "Write a rich, well-organised description of this image.",
    "Explain in detail what this image shows.",
)


# --- the draw -----------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """`"conversation=0.5,detail=0.25,complex_reasoning=0.25"` -> shares summing to 1.

    Weights need not sum to 1; types left out get none. ValueError names what is wrong.
    """
    shares: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in LLAVA_TYPES:
            raise ValueError(
                f"mix {text!r}: expected NAME=WEIGHT items with NAME in {', '.join(LLAVA_TYPES)}, "
                f"got {item!r}"
            )
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"mix {text!r}: weight of {name} is not a number") from None
        if not weight >= 0 or name in shares:
            raise ValueError(f"mix {text!r}: {name} repeated or with a negative weight")
        shares[name] = weight
    total = sum(shares.values())
    if total <= 0:
        raise ValueError(f"mix {text!r}: needs at least one positive weight")
    return {name: shares[name] / total for name in LLAVA_TYPES if shares.get(name, 0) > 0}


def _unit(seed: int, salt: str, row_id: str) -> float:
    """A uniform number in [0, 1) from (seed, salt, id): the same in every process and run."""
    digest = hashlib.sha256(f"{seed}\x1f{salt}\x1f{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def draw_type(row_id: str, mix: dict[str, float], seed: int = 0) -> str:
    """The prompt type of a row: a draw keyed by its id, so re-runs ask the same requests."""
    u = _unit(seed, "type", row_id)
    acc = 0.0
    names = list(mix)
    for name in names:
        acc += mix[name]
        if u < acc:
            return name
    return names[-1]  # u within rounding of 1.0


def detail_question(row_id: str, seed: int = 0) -> str:
    return DETAIL_QUESTIONS[int(_unit(seed, "detail", row_id) * len(DETAIL_QUESTIONS))]


# --- parsing ------------------------------------------------------------------------------------


def parse_llava_reply(
    prompt_type: str, text: str | None, finish_reason: str | None, row_id: str, seed: int = 0
) -> list[dict[str, str]]:
    """The conversation for one LLaVA reply, or BadReply."""
    text = check_reply(text, finish_reason)
    if prompt_type == "detail":
        return to_conversations([(detail_question(row_id, seed), text)])
    return to_conversations(parse_json_qa(text))


@dataclasses.dataclass(frozen=True)
class LlavaGenerateParams(ClientParams):
    mix: str = param(DEFAULT_MIX, "Shares of the prompt types, drawn per row from its id.")
    seed: int = param(0, "Seed of the per-row draws (prompt type, detail question).")
    conversation_version: int = param(0, "Version of prompt 'conversation' (0 = latest).")
    detail_version: int = param(0, "Version of prompt 'detail' (0 = latest).")
    complex_reasoning_version: int = param(0, "Version of prompt 'complex_reasoning' (0 = latest).")


@dataclasses.dataclass(frozen=True)
class AllavaGenerateParams(ClientParams):
    caption_version: int = param(0, "Version of prompt 'allava_caption' (0 = latest).")
    question_version: int = param(0, "Version of prompt 'allava_question' (0 = latest).")
    answer_version: int = param(0, "Version of prompt 'allava_answer' (0 = latest).")


# --- the stages ---------------------------------------------------------------------------------


class LlavaGenerate(GenerateStage):
    """LLaVA-158K instruction data (conversation, detail, complex reasoning) from captions + boxes."""

    name = "llava_generate"
    version = "1"
    Params = LlavaGenerateParams
    resources = GenerateStage.resources.replace(batch_size=64)

    def prompts(self) -> dict[str, Prompt]:
        p = self.params
        versions = {
            "conversation": p.conversation_version,
            "detail": p.detail_version,
            "complex_reasoning": p.complex_reasoning_version,
        }
        return {name: load_prompt(name, v or None) for name, v in versions.items()}

    def check_params(self) -> None:
        parse_mix(self.params.mix)
        super().check_params()

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        prompts = self.prompts()
        mix = parse_mix(p.mix)
        n = batch.num_rows
        ids = batch.column("id").to_pylist()
        captions_col, caption_col = (
            column_or_nulls(batch, "captions"),
            column_or_nulls(batch, "caption"),
        )
        boxes_col = column_or_nulls(batch, "boxes")
        conversations = column_or_nulls(batch, "conversations")
        reasons: list[str | None] = [None] * n
        raws: list[str | None] = [None] * n
        gen_prompt: list[str | None] = [None] * n
        usage = np.zeros((n, len(USAGE_TYPES)), dtype=np.int64)
        types: list[str] = [draw_type(i, mix, p.seed) for i in ids]

        requests, rows = [], []
        for i in range(n):
            captions = [c for c in (captions_col[i] or []) if c and c.strip()]
            if not captions and caption_col[i] and caption_col[i].strip():
                captions = [caption_col[i]]
            if not captions:
                reasons[i] = f"{self.name}: no caption"
                continue
            prompt = prompts[types[i]]
            gen_prompt[i] = prompt_ref(prompt)
            try:
                messages = prompt.render({"captions": captions, "boxes": boxes_col[i] or []})
            except PromptError as err:  # a box without numeric corners
                reasons[i] = f"{self.name}: bad boxes ({err})"
                continue
            requests.append(ChatRequest(messages=messages, params=self.request_params()))
            rows.append(i)

        for i, result in zip(rows, self.ask(requests), strict=True):
            add_usage(usage, i, result)
            try:
                if not result.ok:
                    raise self.failure(result)
                conversations[i] = parse_llava_reply(
                    types[i], result.text, result.finish_reason, ids[i], p.seed
                )
            except BadReply as err:
                reasons[i] = self.reason(err)
                raws[i] = (result.text or "")[:RAW_LIMIT] if result.text is not None else None
        return self.finish(
            batch,
            conversations=conversations,
            reasons=reasons,
            raws=raws,
            usage=usage,
            gen_prompt=gen_prompt,
        )


class AllavaGenerate(GenerateStage):
    """ALLaVA: detailed caption, then question, then answer, each written looking at the image."""

    name = "allava_generate"
    version = "2"  # 2: the model sees decode_image's picture (transparency composited)
    Params = AllavaGenerateParams
    # each request carries an image
    resources = GenerateStage.resources.replace(batch_size=16)
    adds = (*GEN_COLUMNS, "source_caption")

    def prompts(self) -> dict[str, Prompt]:
        p = self.params
        return {
            "caption": load_prompt("allava_caption", p.caption_version or None),
            "question": load_prompt("allava_question", p.question_version or None),
            "answer": load_prompt("allava_answer", p.answer_version or None),
        }

    def process(self, batch: pa.Table) -> pa.Table:
        prompts = self.prompts()
        n = batch.num_rows
        images = column_or_nulls(batch, "images")
        source_caption = column_or_nulls(batch, "caption")
        conversations = column_or_nulls(batch, "conversations")
        captions: list[str | None] = list(source_caption)
        reasons: list[str | None] = [None] * n
        raws: list[str | None] = [None] * n
        usage = np.zeros((n, len(USAGE_TYPES)), dtype=np.int64)
        ref = ";".join(prompt_ref(prompts[k]) for k in ("caption", "question", "answer"))

        context: dict[int, dict[str, Any]] = {}
        for i in range(n):
            found = [im for im in (images[i] or []) if im and im.get("bytes")]
            if len(images[i] or []) > 1:
                reasons[i] = f"{self.name}: more than one image ({len(images[i])})"
            elif not found:
                reasons[i] = f"{self.name}: no image"
            else:
                try:
                    # The model sees the picture every stage sees (see endpoint_image_bytes).
                    data = endpoint_image_bytes(found[0]["bytes"])
                    context[i] = {"image": data, "image_mime": image_mime(data)}
                except PromptError as err:
                    reasons[i] = f"{self.name}: unreadable image ({err})"
                except Exception as err:  # noqa: BLE001 - untrusted bytes: PIL raises many types
                    reasons[i] = f"{self.name}: unreadable image ({decode_error_words(err)})"

        for call in ("caption", "question", "answer"):
            rows = sorted(context)
            requests = [
                ChatRequest(messages=prompts[call].render(context[i]), params=self.request_params())
                for i in rows
            ]
            for i, result in zip(rows, self.ask(requests), strict=True):
                add_usage(usage, i, result)
                try:
                    if not result.ok:
                        raise self.failure(result)
                    text = check_reply(result.text, result.finish_reason)
                except BadReply as err:
                    where = f"{call}; {err.detail}" if err.detail else call
                    reasons[i] = f"{self.name}: {err.category} ({where})"
                    raws[i] = (result.text or "")[:RAW_LIMIT] if result.text is not None else None
                    del context[i]
                    continue
                context[i][call] = text

        for i, ctx in context.items():
            captions[i] = ctx["caption"]
            conversations[i] = to_conversations([(ctx["question"], ctx["answer"])])
        return self.finish(
            batch,
            conversations=conversations,
            reasons=reasons,
            raws=raws,
            usage=usage,
            gen_prompt=[ref if images[i] else None for i in range(n)],
            extra={
                "caption": pa.array(captions, type=pa.string()),
                "source_caption": pa.array(source_caption, type=pa.string()),
            },
        )


__all__ = [
    "DEFAULT_MIX",
    "DETAIL_QUESTIONS",
    "LLAVA_TYPES",
    "AllavaGenerate",
    "AllavaGenerateParams",
    "BadReply",
    "LlavaGenerate",
    "LlavaGenerateParams",
    "check_reply",
    "detail_question",
    "draw_type",
    "parse_json_qa",
    "parse_llava_reply",
    "parse_mix",
    "to_conversations",
]
