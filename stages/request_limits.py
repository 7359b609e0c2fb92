"""The chat client's limits: per-minute token buckets for requests and tokens, the token and cost
budget that stops cleanly, and when to retry (`Retry-After`, exponential backoff with full jitter).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import Any

from warren.stages.chat_request import ClientConfig

# The client's logger: its cache and budget messages stay where they were logged before.
log = logging.getLogger("warren.stages.llm_client")

# Token buckets hold this many seconds of their per-minute rate, so a fresh run starts at the
# limit's pace instead of firing a whole minute's allowance in one burst.
BUCKET_SECONDS = 1.0


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
