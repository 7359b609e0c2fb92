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
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from warren.prompts import Prompt, PromptError, image_mime, load_prompt
from warren.stages import watchdog
from warren.stages.base import (
    BatchStage,
    Resources,
    param,
    params_to_dict,
    put_columns,
    reject,
    stable_hash,
)
from warren.stages.images import decode_error_words, endpoint_image_bytes
from warren.stages.llm_client import (
    BUDGET_STOP,
    ChatRequest,
    ClientConfig,
    Result,
    read_api_key,
    run_requests,
    summarize,
)
from warren.stages.schema import IMAGE_MARKER, KNOWN_TYPES

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
# Openings of replies that decline the task instead of doing it. Checked on the reply's start
# only: a description may well contain "I'm sorry" in a quoted sign.
_REFUSAL = re.compile(
    r"""^\W*(?:i['’]?m\s+sorry|i\s+am\s+sorry|sorry,|i\s+apologi[sz]e|as\s+an\s+ai\b
    |i\s*(?:can(?:['’]|no)?t|cannot|am\s+unable\s+to|['’]m\s+unable\s+to|am\s+not\s+able\s+to|won['’]?t)
     \s+(?:help|assist|provide|comply|do|describe|see|view|answer|fulfil|generate|write))""",
    re.IGNORECASE | re.VERBOSE,
)
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)
_RAW_LIMIT = 20_000  # characters of a bad reply kept in `gen_raw`: enough to see what went wrong

USAGE_TYPES: dict[str, pa.DataType] = {
    "gen_prompt_tokens": pa.int64(),
    "gen_completion_tokens": pa.int64(),
    "gen_cache_hits": pa.int32(),
}


class BadReply(ValueError):
    """A reply that cannot become a sample; `category` and `detail` make the rejection reason."""

    def __init__(self, category: str, detail: str = "") -> None:
        super().__init__(f"{category} ({detail})" if detail else category)
        self.category = category
        self.detail = detail


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


def check_reply(text: str | None, finish_reason: str | None) -> str:
    """The reply's text, stripped, or BadReply for a truncated, empty or refused reply."""
    if finish_reason == "length":
        raise BadReply("truncated", "finish_reason length; raise max_tokens")
    text = (text or "").strip()
    if not text:
        raise BadReply("empty answer", f"finish_reason {finish_reason}")
    if _REFUSAL.match(text):
        raise BadReply("refused", _excerpt(text))
    if IMAGE_MARKER in text:
        # The marker count must equal the number of images; a generated one would break that.
        raise BadReply("malformed answer", f"contains the {IMAGE_MARKER} marker")
    return text


def parse_json_qa(text: str) -> list[tuple[str, str]]:
    """`[{"question": ..., "answer": ...}, ...]` (optionally in a ``` fence) -> (q, a) pairs."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadReply("malformed answer", f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise BadReply("malformed answer", f"not a JSON list but {type(data).__name__}")
    if not data:
        raise BadReply("malformed answer", "empty list")
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise BadReply("malformed answer", f"item {i} is not an object")
        for key in ("question", "answer"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                raise BadReply("malformed answer", f"item {i} has no {key!r} string")
        pairs.append((item["question"].strip(), item["answer"].strip()))
    return pairs


def to_conversations(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Alternating human/gpt turns; "<image>\\n" goes in front of the first question only."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": (f"{IMAGE_MARKER}\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def parse_llava_reply(
    prompt_type: str, text: str | None, finish_reason: str | None, row_id: str, seed: int = 0
) -> list[dict[str, str]]:
    """The conversation for one LLaVA reply, or BadReply."""
    text = check_reply(text, finish_reason)
    if prompt_type == "detail":
        return to_conversations([(detail_question(row_id, seed), text)])
    return to_conversations(parse_json_qa(text))


def _excerpt(text: str, n: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= n else one_line[: n - 3] + "..."


def prompt_ref(prompt: Prompt) -> str:
    return f"{prompt.id}#{prompt.sha256[:12]}"


# --- parameters ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientParams:
    model: str = param("gpt-4o-mini", "Model name sent to the endpoint.")
    base_url: str = param(
        "", "OpenAI-compatible endpoint, e.g. http://host:8000/v1 for vLLM ('' = api.openai.com)."
    )
    api_key_env: str = param(
        "OPENAI_API_KEY",
        "Environment variable holding the API key (the key itself is never a parameter).",
    )
    cache_dir: str = param(
        "~/.cache/warren/llm",
        "On-disk response cache ('' = none); a re-run sends no request answered before. On a "
        "cluster, use a path every node shares.",
    )
    max_concurrency: int = param(16, "Requests in flight at once, for the whole stage.")
    requests_per_minute: float = param(0.0, "Request rate limit for the stage (0 = none).")
    tokens_per_minute: float = param(0.0, "Token rate limit for the stage (0 = none).")
    max_total_tokens: int = param(
        0, "Token budget of one run of the stage (0 = none); rows not sent: 'not done'."
    )
    max_cost: float = param(
        0.0, "Cost budget of one run of the stage, at the per-1k prices below (0 = none)."
    )
    price_prompt_per_1k: float = param(0.0, "Price of 1,000 prompt tokens (for max_cost).")
    price_completion_per_1k: float = param(0.0, "Price of 1,000 completion tokens (for max_cost).")
    temperature: float = param(0.7, "Sampling temperature.")
    max_tokens: int = param(1024, "Completion cap per request; a reply cut at it is rejected.")
    timeout_s: float = param(120.0, "Time limit of one attempt of one request, in seconds.")
    max_attempts: int = param(6, "Attempts per request (retries on 429, 5xx, time-outs).")


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


class _GenerateStage(BatchStage):
    """What both generators share: client config, budget across batches, output columns."""

    uses_model = True  # an actor: one per stage, holding the budget spent so far
    # waits on the network; leaves CPU for reading and writing shards
    resources = Resources(concurrency=(1, 1), num_cpus=0.5)
    summed_columns = ("gen_prompt_tokens", "gen_completion_tokens", "gen_cache_hits")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._spent_tokens = 0
        self._spent_cost = 0.0

    def prompts(self) -> dict[str, Prompt]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self) -> None:
        # A worker whose run is gone (driver killed) stops sending at once and exits once its
        # answers in flight are cached, instead of paying on until Ray notices.
        watchdog.start()

    def check_params(self) -> None:
        self.client_config()  # ClientConfig validates limits and budget
        self.prompts()  # PromptError (a ValueError) for a version that does not exist
        if self.params.max_tokens < 1:
            raise ValueError(f"{self.name}: max_tokens must be >= 1")

    @property
    def params_hash(self) -> str:
        # "latest" prompt versions and edited prompt files must change the cache key too.
        refs = sorted(prompt_ref(p) for p in self.prompts().values())
        return stable_hash(
            {"params": params_to_dict(self.params), "version": self.version, "prompts": refs}
        )

    def client_config(self, **overrides: Any) -> ClientConfig:
        p = self.params
        cache = os.path.expanduser(p.cache_dir) if p.cache_dir else None
        settings: dict[str, Any] = dict(
            model=p.model,
            base_url=p.base_url or None,
            api_key_env=p.api_key_env,
            max_concurrency=p.max_concurrency,
            requests_per_minute=p.requests_per_minute or None,
            tokens_per_minute=p.tokens_per_minute or None,
            max_attempts=p.max_attempts,
            timeout_s=p.timeout_s,
            max_total_tokens=p.max_total_tokens or None,
            max_cost=p.max_cost or None,
            price_prompt_per_1k=p.price_prompt_per_1k,
            price_completion_per_1k=p.price_completion_per_1k,
            default_max_tokens=p.max_tokens,
            cache_dir=cache,
        )
        settings.update(overrides)
        return ClientConfig(**settings)

    def request_params(self) -> dict[str, Any]:
        return {"temperature": self.params.temperature, "max_tokens": self.params.max_tokens}

    def gen_params_json(self) -> str:
        return json.dumps(self.request_params(), sort_keys=True, separators=(",", ":"))

    def ask(self, requests: Sequence[ChatRequest]) -> list[Result]:
        """Send one round concurrently, within what is left of this run's budget."""
        if not requests:
            return []
        # Raised here, in a batch, rather than in setup(): Ray reports an actor that failed to
        # start as "actor died" and hides this message, which names the variable to set.
        read_api_key(self.client_config())
        p = self.params
        overrides: dict[str, Any] = {}
        if p.max_total_tokens:
            overrides["max_total_tokens"] = p.max_total_tokens - self._spent_tokens
        if p.max_cost:
            overrides["max_cost"] = p.max_cost - self._spent_cost
        if any(v <= 0 for v in overrides.values()):
            return [Result("", None, None, None, False, BUDGET_STOP, 0) for _ in requests]
        config = self.client_config(**overrides)
        results = run_requests(requests, config)
        summary = summarize(results, config)
        self._spent_tokens += summary.prompt_tokens + summary.completion_tokens
        self._spent_cost += summary.cost
        return results

    def failure(self, result: Result) -> BadReply:
        if result.error == BUDGET_STOP:
            return BadReply("not done", "budget")
        return BadReply("request failed", result.error or "")

    def finish(
        self,
        batch: pa.Table,
        *,
        conversations: list[Any],
        reasons: list[str | None],
        raws: list[str | None],
        usage: np.ndarray,
        gen_prompt: list[str | None],
        extra: dict[str, pa.Array] | None = None,
    ) -> pa.Table:
        """The batch with the generated columns set and failed rows rejected."""
        n = batch.num_rows
        columns: dict[str, pa.Array] = {
            "conversations": pa.array(conversations, type=KNOWN_TYPES["conversations"]),
            "gen_model": pa.array([self.params.model] * n, type=pa.string()),
            "gen_prompt": pa.array(gen_prompt, type=pa.string()),
            "gen_params": pa.array([self.gen_params_json()] * n, type=pa.string()),
            "gen_raw": pa.array(raws, type=pa.string()),
        }
        for j, (name, t) in enumerate(USAGE_TYPES.items()):
            columns[name] = pa.array(usage[:, j], type=t)
        columns.update(extra or {})
        mask = [r is not None for r in reasons]
        return reject(put_columns(batch, columns), mask, [r or "" for r in reasons])

    def reason(self, err: BadReply) -> str:
        return f"{self.name}: {err}"


MODEL_BACKENDS = ("transformers", "endpoint")


@dataclasses.dataclass(frozen=True)
class ModelOrEndpointParams(ClientParams):
    backend: str = param(
        "transformers", "transformers (a model in each actor) or endpoint (OpenAI-compatible API)."
    )
    batch_size: int = param(8, "Rows per generate call (transformers backend).")
    dtype: str = param("auto", "auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16.")
    seed: int = param(0, "Seed of sampled decoding (temperature > 0).")
    prompt_version: int = param(0, "Version of the stage's prompt (0 = latest).")


class _ModelOrEndpointStage(_GenerateStage):
    """A generation stage with two backends (`params.backend`): `transformers`, a model in every
    actor (a GPU each when the cluster has them; the runner gives none on a CPU-only cluster), or
    `endpoint`, one network-bound actor sending requests through the machinery above."""

    def default_resources(self) -> Resources:
        if self.params.backend == "transformers":
            return type(self).resources.replace(concurrency=None, num_cpus=1.0, num_gpus=1.0)
        return type(self).resources

    def check_params(self) -> None:
        if self.params.backend not in MODEL_BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {', '.join(MODEL_BACKENDS)}")
        self.check_decoding()
        if self.params.backend == "endpoint":
            self.client_config()
        self.prompts()

    def check_decoding(self) -> None:
        """Raise ValueError for decoding parameters that can never work."""

    def __getstate__(self) -> dict[str, Any]:
        # A model loaded on the driver (a test, a notebook) must not ride along to every worker:
        # each actor loads its own in setup().
        state = self.__dict__.copy()
        for loaded in ("_lm", "_vlm"):
            if loaded in state:
                state[loaded] = None
        return state


def generate_each(generate: Any, items: Sequence[Any]) -> list[Any]:
    """`generate(items)` (one result per item); when the batch raises, each item alone, and an
    item that raises alone gets `BadReply("generation failed", <error>)`, so one bad row does not
    take its batch mates down."""
    try:
        return list(generate(items))
    except Exception:  # noqa: BLE001 - isolate the item that breaks generation
        out: list[Any] = []
        for item in items:
            try:
                out.extend(generate([item]))
            except Exception as exc:  # noqa: BLE001 - any model error rejects its own row
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                out.append(BadReply("generation failed", detail))
        return out


def _column(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def _add_usage(usage: np.ndarray, i: int, result: Result) -> None:
    u = result.usage or {}
    usage[i, 0] += u.get("prompt_tokens", 0)
    usage[i, 1] += u.get("completion_tokens", 0)
    usage[i, 2] += int(result.cached)


class LlavaGenerate(_GenerateStage):
    """LLaVA-158K instruction data (conversation, detail, complex reasoning) from captions + boxes."""

    name = "llava_generate"
    version = "1"
    Params = LlavaGenerateParams
    resources = Resources(batch_size=64)

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
        captions_col, caption_col = _column(batch, "captions"), _column(batch, "caption")
        boxes_col = _column(batch, "boxes")
        conversations = _column(batch, "conversations")
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
            _add_usage(usage, i, result)
            try:
                if not result.ok:
                    raise self.failure(result)
                conversations[i] = parse_llava_reply(
                    types[i], result.text, result.finish_reason, ids[i], p.seed
                )
            except BadReply as err:
                reasons[i] = self.reason(err)
                raws[i] = (result.text or "")[:_RAW_LIMIT] if result.text is not None else None
        return self.finish(
            batch,
            conversations=conversations,
            reasons=reasons,
            raws=raws,
            usage=usage,
            gen_prompt=gen_prompt,
        )


class AllavaGenerate(_GenerateStage):
    """ALLaVA: detailed caption, then question, then answer, each written looking at the image."""

    name = "allava_generate"
    version = "2"  # 2: the model sees decode_image's picture (transparency composited)
    Params = AllavaGenerateParams
    # each request carries an image
    resources = Resources(batch_size=16)

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
        images = _column(batch, "images")
        source_caption = _column(batch, "caption")
        conversations = _column(batch, "conversations")
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
                _add_usage(usage, i, result)
                try:
                    if not result.ok:
                        raise self.failure(result)
                    text = check_reply(result.text, result.finish_reason)
                except BadReply as err:
                    where = f"{call}; {err.detail}" if err.detail else call
                    reasons[i] = f"{self.name}: {err.category} ({where})"
                    raws[i] = (result.text or "")[:_RAW_LIMIT] if result.text is not None else None
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
