"""Chat-completions client for generation stages: concurrent, rate-limited, budgeted, cached.

Speaks the OpenAI chat API through the `openai` package's `AsyncOpenAI` to any compatible
endpoint (OpenAI, vLLM, SGLang; set `base_url`). One call, `run_requests(requests, config)`, sends
a list of `ChatRequest`s and returns one `Result` per request, in order:

- at most `max_concurrency` requests in flight, and at most `requests_per_minute` /
  `tokens_per_minute` (token buckets; tokens estimated before a call from `max_tokens` and the
  prompt, corrected after it from `usage`);
- retries with exponential backoff and full jitter on 429, 408, 409, 5xx, connection errors,
  time-outs and 200 replies that are not a chat completion (truncated or non-JSON body, no
  `choices`; named `endpoint error: malformed JSON in 200 reply from URL` when retries run out), honouring `Retry-After` (seconds or HTTP date) and `retry-after-ms`, up to
  `max_attempts` attempts of at most `timeout_s` each (the `openai` package's own retries are off);
- a budget (`max_total_tokens`, `max_cost` at per-1k prices) that stops cleanly: a request is sent
  only when its worst case fits in what is left, requests not sent come back with
  `error="not done: budget"`, everything completed is kept;
- a disk cache: one JSON file per response, keyed by the sha256 of canonical JSON of
  (model, messages, params), written atomically, so a killed run loses no paid response and a
  re-run sends no request that already has one. In a Ray worker, each send and its cache write
  pass `stages.watchdog.gate()`: once the run's driver is gone, nothing more is sent, and the
  process exits when every answer in flight is on disk.

The API key is read from the environment variable `api_key_env` at run time (never stored in the
config, which is pickled to Ray workers) and is redacted from every error text this module
surfaces or logs. `summarize(results, config)` adds up requests sent, cache hits, retries, tokens
and cost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

from warren.stages import watchdog
from warren.stages.chat_request import (
    BUDGET_STOP,
    CHARS_PER_TOKEN,
    IMAGE_TOKENS,
    PLACEHOLDER_KEY,
    ChatRequest,
    ClientConfig,
    Result,
    Summary,
    completion_cap,
    estimate_prompt_tokens,
    read_api_key,
    redact,
    summarize,
)
from warren.stages.request_limits import Budget, TokenBucket, backoff_s, parse_retry_after
from warren.stages.response_cache import ResponseCache

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})


class _Retryable(Exception):
    def __init__(
        self, message: str, retry_after: float | None = None, *, malformed: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # A 200 reply whose body is not a chat completion (a proxy's error page, a body cut off
        # mid-stream, JSON without `choices`): the server's fault, so retried like a 5xx.
        self.malformed = malformed


def _malformed_detail(response: Any) -> str | None:
    """Why a parsed 200 reply is not a usable chat completion, or None when it is one.

    With a body that is not JSON (`Content-Type: text/html`), the openai package returns the body
    as a `str`; with JSON that lacks fields it builds the model anyway (`choices=None`)."""
    if isinstance(response, (str, bytes)):
        head = " ".join(str(response[:80]).split())
        return f"body is not JSON: {head!r}"
    choices = getattr(response, "choices", None)
    if not choices:
        return "JSON without choices"
    if getattr(choices[0], "message", None) is None:
        return "choice without message"
    return None


# --- the client ---------------------------------------------------------------------------------


class ChatClient:
    """The async core. Use `async with ChatClient(config) as client: await client.run(reqs)`;
    the event loop that enters it is the one it serves."""

    def __init__(self, config: ClientConfig, *, seed: int | None = None) -> None:
        self.config = config
        self._key = read_api_key(config)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self.rng = random.Random(seed)
        self._openai: Any = None

    async def __aenter__(self) -> ChatClient:
        import openai

        # In a Ray worker: stop sending, and exit, once the run this worker serves is gone.
        watchdog.start()

        # max_retries=0: retries are ours, so that they share the budget, the rate limiter and
        # the attempt count, and honour Retry-After the same way for every endpoint.
        self._openai = openai.AsyncOpenAI(
            api_key=self._key,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._openai is not None:
            await self._openai.close()
            self._openai = None

    async def run(self, requests: Sequence[ChatRequest]) -> list[Result]:
        """One Result per request, in order. Identical requests are sent once."""
        if self._openai is None:
            raise RuntimeError("ChatClient.run needs `async with ChatClient(config) as client`")
        config = self.config
        keys = [r.key(config.model) for r in requests]
        unique: dict[str, ChatRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            unique.setdefault(key, request)
        slots = asyncio.Semaphore(config.max_concurrency)
        rpm = TokenBucket(config.requests_per_minute) if config.requests_per_minute else None
        tpm = TokenBucket(config.tokens_per_minute) if config.tokens_per_minute else None
        budget = Budget(config)
        tasks = {
            key: asyncio.ensure_future(self._one(key, request, slots, rpm, tpm, budget))
            for key, request in unique.items()
        }
        try:
            done = await asyncio.gather(*tasks.values())
        finally:
            # On cancellation, stop the siblings too; whatever finished is already on disk.
            for task in tasks.values():
                task.cancel()
        by_key = dict(zip(tasks, done, strict=True))
        return [by_key[key] for key in keys]

    async def _one(
        self,
        key: str,
        request: ChatRequest,
        slots: asyncio.Semaphore,
        rpm: TokenBucket | None,
        tpm: TokenBucket | None,
        budget: Budget,
    ) -> Result:
        config = self.config
        if self.cache is not None:
            entry = self.cache.get(key)
            if entry is not None:
                return Result(
                    key, entry["text"], entry.get("finish_reason"), entry.get("usage"),
                    cached=True, error=None, attempts=0,
                )  # fmt: skip
        prompt_est = estimate_prompt_tokens(request.messages)
        cap = completion_cap(request, config)
        est_tokens = prompt_est + cap
        est_cost = config.cost(prompt_est, cap)
        if budget.limited and not await budget.reserve(est_tokens, est_cost):
            return Result(key, None, None, None, cached=False, error=BUDGET_STOP, attempts=0)
        used_tokens, used_cost = 0, 0.0
        try:
            attempt = 0
            while True:
                attempt += 1
                # The slot is taken before the rate limiters so that sends, not just grants, are
                # paced; the watchdog's gate spans the send and the cache write, so a worker whose
                # run is gone sends nothing more and loses no answer it already paid for.
                async with slots:
                    if rpm is not None:
                        await rpm.take(1)
                    if tpm is not None:
                        await tpm.take(est_tokens)
                    async with watchdog.gate():
                        try:
                            text, finish_reason, usage = await self._attempt(
                                request, tpm, est_tokens
                            )
                        except _Retryable as err:
                            retry = err
                        except Exception as err:  # a 4xx the server will answer the same again
                            return self._failed(key, self._describe(err), attempt)
                        else:
                            used_tokens = usage.get("total_tokens", 0) if usage else est_tokens
                            used_cost = (
                                config.cost(
                                    usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                                )
                                if usage
                                else est_cost
                            )
                            if self.cache is not None:
                                # Written the moment it arrives, in a thread: fsync takes
                                # milliseconds, which would stall every request in flight on this
                                # event loop. A cancelled caller still lets the write finish.
                                await asyncio.to_thread(
                                    self.cache.put,
                                    key,
                                    {
                                        "model": request.model or config.model,
                                        "text": text,
                                        "finish_reason": finish_reason,
                                        "usage": usage,
                                    },
                                )
                            return Result(key, text, finish_reason, usage, False, None, attempt)
                err = retry
                if attempt >= config.max_attempts:
                    if err.malformed:
                        return self._failed(
                            key,
                            f"endpoint error: malformed JSON in 200 reply from "
                            f"{self._endpoint()} after {attempt} tries ({err})",
                            attempt,
                        )
                    return self._failed(key, f"gave up after {attempt} attempts: {err}", attempt)
                if err.retry_after is not None and err.retry_after > config.max_retry_after_s:
                    return self._failed(
                        key,
                        f"Retry-After {err.retry_after:.0f}s exceeds max_retry_after_s: {err}",
                        attempt,
                    )
                wait = backoff_s(attempt, config, self.rng)
                if err.retry_after is not None:
                    # Never earlier than the server asked; a little jitter on top so that the
                    # requests it refused together do not come back together.
                    wait = err.retry_after + wait * 0.1
                log.info("retry %d of %s in %.2fs: %s", attempt, key[:12], wait, err)
                await asyncio.sleep(wait)
        finally:
            if budget.limited:
                # Shielded: a cancelled run must still release its reservation for its siblings.
                await asyncio.shield(budget.settle(est_tokens, est_cost, used_tokens, used_cost))

    async def _attempt(
        self, request: ChatRequest, tpm: TokenBucket | None, est_tokens: int
    ) -> tuple[str, str | None, dict[str, int] | None]:
        """One HTTP request (the caller holds a slot and the rate limiters' grants)."""
        import openai

        config = self.config
        try:
            # The openai timeout bounds each read; wait_for bounds the whole request, so a
            # server that trickles bytes cannot hold a slot forever.
            response = await asyncio.wait_for(
                self._openai.chat.completions.create(
                    model=request.model or config.model,
                    messages=list(request.messages),
                    **request.params,
                ),
                timeout=config.timeout_s,
            )
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retryable(f"timed out after {config.timeout_s:g}s") from None
        except openai.APIConnectionError as err:
            raise _Retryable(self._describe(err)) from None
        except openai.APIStatusError as err:
            if err.status_code in RETRYABLE_STATUS or err.status_code >= 500:
                retry_after = parse_retry_after(getattr(err.response, "headers", None))
                raise _Retryable(self._describe(err), retry_after) from None
            raise
        except (json.JSONDecodeError, openai.APIResponseValidationError) as err:
            # A 200 whose JSON is cut off or broken: the openai package's parser raises
            # json.JSONDecodeError (APIResponseValidationError under strict validation).
            raise _Retryable(self._describe(err), malformed=True) from None
        bad = _malformed_detail(response)
        if bad is not None:
            raise _Retryable(bad, malformed=True)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else None
        if usage is not None:
            usage = {k: int(v) for k, v in usage.items() if isinstance(v, int)}
        if tpm is not None and usage and "total_tokens" in usage:
            tpm.adjust(est_tokens - usage["total_tokens"])
        choice = response.choices[0]
        return choice.message.content or "", choice.finish_reason, usage

    def _endpoint(self) -> str:
        base = str(self._openai.base_url) if self._openai is not None else self.config.base_url
        return f"{(base or '').rstrip('/')}/chat/completions"

    def _describe(self, err: BaseException) -> str:
        status = getattr(err, "status_code", None)
        prefix = f"HTTP {status}: " if status else ""
        return redact(f"{prefix}{type(err).__name__}: {err}", self._key)

    def _failed(self, key: str, message: str, attempts: int) -> Result:
        message = redact(message, self._key)
        log.warning("request %s failed: %s", key[:12], message)
        return Result(key, None, None, None, cached=False, error=message, attempts=attempts)


async def run_requests_async(
    requests: Sequence[ChatRequest], config: ClientConfig, *, seed: int | None = None
) -> list[Result]:
    """The async core of `run_requests`, for callers that already run an event loop."""
    async with ChatClient(config, seed=seed) as client:
        results = await client.run(requests)
    log.info("%s", summarize(results, config))
    return results


def run_requests(
    requests: Sequence[ChatRequest], config: ClientConfig, *, seed: int | None = None
) -> list[Result]:
    """Synchronous entry point, e.g. inside a Ray `map_batches` function or actor."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_requests_async(requests, config, seed=seed))
    # Called from inside a running loop (an async Ray actor, a notebook): asyncio.run cannot
    # nest, so run on a fresh loop in a worker thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run_requests_async(requests, config, seed=seed)).result()


__all__ = [
    "BUDGET_STOP",
    "CHARS_PER_TOKEN",
    "IMAGE_TOKENS",
    "PLACEHOLDER_KEY",
    "Budget",
    "ChatClient",
    "ChatRequest",
    "ClientConfig",
    "ResponseCache",
    "Result",
    "Summary",
    "TokenBucket",
    "backoff_s",
    "completion_cap",
    "estimate_prompt_tokens",
    "parse_retry_after",
    "read_api_key",
    "redact",
    "run_requests",
    "run_requests_async",
    "summarize",
]
