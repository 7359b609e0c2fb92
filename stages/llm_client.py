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
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warren.stages import watchdog

log = logging.getLogger(__name__)

BUDGET_STOP = "not done: budget"
# Local servers (vLLM, SGLang) started without --api-key accept any bearer token; the openai
# package refuses to build a client without one.
PLACEHOLDER_KEY = "EMPTY"
# Rough size of a prompt before the server tokenises it: ~4 characters per token for English
# text, and 765 tokens per image (OpenAI's price of a 1024x1024 high-detail image: 85 + 4 x 170).
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 765
# Token buckets hold this many seconds of their per-minute rate, so a fresh run starts at the
# limit's pace instead of firing a whole minute's allowance in one burst.
BUCKET_SECONDS = 1.0
RETRYABLE_STATUS = frozenset({408, 409, 429})


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


# --- cache --------------------------------------------------------------------------------------


class ResponseCache:
    """One JSON file per response under `root/ab/abcdef....json`, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        # 256 subfolders keep directories small when a run caches millions of responses.
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            # os.replace means no torn files from us; a damaged file is re-requested, not fatal.
            log.warning("ignoring unreadable cache entry %s: %s", key, err)
            return None
        return entry if entry.get("key") == key and "text" in entry else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"key": key, **entry}, f, ensure_ascii=False)
                f.flush()
                # The response is paid for: make it durable before it becomes visible.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# --- limits -------------------------------------------------------------------------------------


class TokenBucket:
    """Per-minute rate limiter. A take larger than the bucket waits for a full bucket, then
    drives the level negative, so one huge request is possible and the average rate still holds."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * BUCKET_SECONDS, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()  # FIFO: waiters are served in arrival order

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        async with self.lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def adjust(self, delta: float) -> None:
        """Give back (delta > 0) or charge (delta < 0) once the true size is known."""
        self._refill()
        self.level = min(self.capacity, self.level + delta)


class Budget:
    """Token and cost budget. A request reserves its worst case before it is sent and settles
    its actual usage after; when the worst case does not fit even with nothing in flight, the
    budget is spent and every later request is refused."""

    def __init__(self, config: ClientConfig) -> None:
        self.max_tokens = config.max_total_tokens
        self.max_cost = config.max_cost
        self.tokens = 0
        self.cost = 0.0
        self.reserved_tokens = 0
        self.reserved_cost = 0.0
        self.in_flight = 0
        self.spent = False
        self.changed = asyncio.Condition()

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost is not None

    def _fits(self, tokens: int, cost: float) -> bool:
        if (
            self.max_tokens is not None
            and self.tokens + self.reserved_tokens + tokens > self.max_tokens
        ):
            return False
        return self.max_cost is None or self.cost + self.reserved_cost + cost <= self.max_cost

    async def reserve(self, tokens: int, cost: float) -> bool:
        async with self.changed:
            while not self.spent:
                if self._fits(tokens, cost):
                    self.reserved_tokens += tokens
                    self.reserved_cost += cost
                    self.in_flight += 1
                    return True
                if self.in_flight == 0:
                    self.spent = True
                    log.warning(
                        "budget spent (%d tokens, cost %.4f): requests not yet sent are skipped",
                        self.tokens,
                        self.cost,
                    )
                    self.changed.notify_all()
                    break
                # Requests in flight usually use less than they reserved: wait for them.
                await self.changed.wait()
            return False

    async def settle(
        self, reserved_tokens: int, reserved_cost: float, tokens: int, cost: float
    ) -> None:
        async with self.changed:
            self.reserved_tokens -= reserved_tokens
            self.reserved_cost -= reserved_cost
            self.tokens += tokens
            self.cost += cost
            self.in_flight -= 1
            self.changed.notify_all()


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


# --- retries ------------------------------------------------------------------------------------


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def backoff_s(attempt: int, config: ClientConfig, rng: random.Random) -> float:
    """Full jitter (uniform up to an exponentially growing cap): spreads the retries of many
    workers that failed together instead of having them all return at once."""
    return rng.uniform(0.0, min(config.backoff_max_s, config.backoff_base_s * 2 ** (attempt - 1)))


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
