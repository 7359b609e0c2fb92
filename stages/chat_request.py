"""What a chat-completions request is, and what comes back: the client's configuration, one
request, one result, the summary of a run of them, the API key (read from the environment, redacted
from every text) and the size estimates a budget is reserved from.

The client that sends them is stages/llm_client.py; its cache, rate limits, budget and retry
timing are stages/response_cache.py and stages/request_limits.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

BUDGET_STOP = "not done: budget"
# Local servers (vLLM, SGLang) started without --api-key accept any bearer token; the openai
# package refuses to build a client without one.
PLACEHOLDER_KEY = "EMPTY"
# Rough size of a prompt before the server tokenises it: ~4 characters per token for English
# text, and 765 tokens per image (OpenAI's price of a 1024x1024 high-detail image: 85 + 4 x 170).
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 765


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Endpoint, limits, retries, budget and cache of one run. Holds no secret."""

    model: str
    base_url: str | None = None  # None: api.openai.com (or OPENAI_BASE_URL)
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 16
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_attempts: int = 6
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A Retry-After longer than this fails the request instead of parking a Ray task for it.
    max_retry_after_s: float = 300.0
    max_total_tokens: int | None = None
    max_cost: float | None = None
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    # Completion size assumed for the rate limiter and the budget when a request sets no
    # max_tokens; set max_tokens on requests when a budget must be a hard cap.
    default_max_tokens: int = 1024
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("requests_per_minute", "tokens_per_minute", "max_cost"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.max_total_tokens is not None and self.max_total_tokens <= 0:
            raise ValueError(f"max_total_tokens must be > 0 or None, got {self.max_total_tokens}")
        if self.max_cost is not None and not (
            self.price_prompt_per_1k or self.price_completion_per_1k
        ):
            raise ValueError("max_cost needs price_prompt_per_1k and/or price_completion_per_1k")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.price_prompt_per_1k
            + completion_tokens * self.price_completion_per_1k
        ) / 1000.0


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: messages plus API parameters (temperature, max_tokens, seed, ...).

    `model` overrides the config's model. `params` go to `chat.completions.create` as keyword
    arguments (use `extra_body` for server-specific ones such as vLLM's `top_k`).
    """

    messages: Sequence[dict[str, Any]]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str | None = None

    def key(self, default_model: str) -> str:
        """sha256 of canonical JSON of (model, messages, params): the cache file name."""
        blob = json.dumps(
            {
                "model": self.model or default_model,
                "messages": list(self.messages),
                "params": self.params,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Result:
    """What became of one request. `error` is None on success; `attempts` is 0 for cache hits."""

    key: str
    text: str | None
    finish_reason: str | None
    usage: dict[str, int] | None
    cached: bool
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class Summary:
    requests: int
    succeeded: int
    failed: int
    budget_stopped: int
    cache_hits: int
    sent: int  # HTTP requests sent, retries included
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost: float  # of the requests sent in this run; cache hits cost nothing


def summarize(results: Sequence[Result], config: ClientConfig) -> Summary:
    """Totals over results; tokens and cost count fresh responses only (cache hits were paid)."""
    fresh = [r for r in results if not r.cached]
    prompt = sum((r.usage or {}).get("prompt_tokens", 0) for r in fresh)
    completion = sum((r.usage or {}).get("completion_tokens", 0) for r in fresh)
    return Summary(
        requests=len(results),
        succeeded=sum(r.ok for r in results),
        failed=sum(not r.ok and r.error != BUDGET_STOP for r in results),
        budget_stopped=sum(r.error == BUDGET_STOP for r in results),
        cache_hits=sum(r.cached for r in results),
        sent=sum(r.attempts for r in fresh),
        retries=sum(max(r.attempts - 1, 0) for r in fresh),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=config.cost(prompt, completion),
    )


# --- secrets ------------------------------------------------------------------------------------

_BEARER = re.compile(r"(Bearer\s+)[^\s'\",}]+", re.IGNORECASE)


def redact(text: str, secret: str | None) -> str:
    """`text` without the API key: the key itself and any bearer token a server echoed back."""
    if secret and secret != PLACEHOLDER_KEY:
        text = text.replace(secret, "[REDACTED]")
    return _BEARER.sub(r"\1[REDACTED]", text)


def read_api_key(config: ClientConfig) -> str:
    key = os.environ.get(config.api_key_env, "")
    if key:
        return key
    if config.base_url is None:
        raise RuntimeError(
            f"no API key: set the environment variable {config.api_key_env} "
            "(or give base_url for a local server that needs none)"
        )
    return PLACEHOLDER_KEY


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    chars, images = 0, 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    chars += len(part.get("text", ""))
                elif part.get("type") in ("image_url", "input_image"):
                    images += 1
    # A few tokens per message for the role and chat-template markers.
    return chars // CHARS_PER_TOKEN + images * IMAGE_TOKENS + 4 * len(messages)


def completion_cap(request: ChatRequest, config: ClientConfig) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        if request.params.get(name) is not None:
            return int(request.params[name])
    return config.default_max_tokens
