"""The chat client against a real HTTP server on 127.0.0.1 with scripted answers and faults."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fake_chat_server import FakeChatServer

from warren.stages.llm_client import (
    BUDGET_STOP,
    ChatRequest,
    ClientConfig,
    parse_retry_after,
    run_requests,
    run_requests_async,
    summarize,
)

SECRET = "sk-warren-test-7f3a9c1e5b2d4f60"


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], params={"max_tokens": 5})


def config_for(
    server: FakeChatServer, tmp_path: Path | None = None, **overrides: Any
) -> ClientConfig:
    settings: dict[str, Any] = dict(
        model="test-model",
        base_url=server.url,
        api_key_env="WARREN_TEST_LLM_KEY",
        max_concurrency=8,
        timeout_s=2.0,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        cache_dir=str(tmp_path / "cache") if tmp_path is not None else None,
    )
    settings.update(overrides)
    return ClientConfig(**settings)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("WARREN_TEST_LLM_KEY", SECRET)
    return SECRET


def gaps(server: FakeChatServer, content: str) -> list[float]:
    times = [entry["t"] for entry in server.log if entry["content"] == content]
    return [b - a for a, b in itertools.pairwise(times)]


def cached_files(tmp_path: Path) -> int:
    return len(list((tmp_path / "cache").glob("*/*.json")))


def test_retries_honour_retry_after_and_stay_within_backoff_bounds(tmp_path: Path) -> None:
    script = {"a": [("429", "0.3"), "ok"], "b": ["500", "500", "ok"]}
    with FakeChatServer(script=script) as server:
        config = config_for(server, tmp_path)
        results = run_requests([ask("a"), ask("b"), ask("c")], config, seed=0)

    assert [r.text for r in results] == ["answer to a", "answer to b", "answer to c"]
    assert [r.attempts for r in results] == [2, 3, 1]
    (wait_a,) = gaps(server, "a")
    assert 0.3 <= wait_a < 0.3 + 0.5  # Retry-After plus at most 10% of a 0.2 s backoff, plus slack
    first, second = gaps(server, "b")
    assert first < 0.05 + 0.3 and second < 0.1 + 0.3  # full jitter under base * 2**(n-1)
    summary = summarize(results, config)
    assert (summary.sent, summary.retries, summary.succeeded) == (6, 3, 3)
    assert summary.prompt_tokens == 18 and summary.completion_tokens == 15


def test_retry_after_accepts_seconds_milliseconds_and_http_dates() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 < parse_retry_after({"retry-after": later}) <= 5.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_stalled_response_times_out_and_is_retried_then_given_up(tmp_path: Path) -> None:
    script = {"slow": [("stall", 1.0), "ok"], "dead": [("stall", 1.0), ("stall", 1.0)]}
    with FakeChatServer(script=script) as server:
        config = config_for(server, tmp_path, timeout_s=0.3, max_attempts=2)
        start = time.monotonic()
        slow, dead = run_requests([ask("slow"), ask("dead")], config)
        elapsed = time.monotonic() - start

    assert slow.text == "answer to slow" and slow.attempts == 2
    assert dead.text is None and dead.attempts == 2 and "timed out" in dead.error
    assert elapsed < 0.3 * 2 + 0.1 + 0.6  # two time-outs, one backoff, slack; not the stalls


def test_rerun_sends_no_request_and_returns_identical_texts_from_cache(tmp_path: Path) -> None:
    requests = [ask(f"question {i}") for i in range(12)]
    with FakeChatServer() as server:
        config = config_for(server, tmp_path)
        first = run_requests(requests, config)
        sent = len(server.log)
        second = run_requests(requests, config)

    assert sent == 12 and len(server.log) == sent
    assert [r.text for r in second] == [r.text for r in first]
    assert all(r.cached and r.attempts == 0 for r in second) and not any(r.cached for r in first)
    assert [r.usage for r in second] == [r.usage for r in first]
    summary = summarize(second, config)
    assert (summary.cache_hits, summary.sent, summary.cost) == (12, 0, 0.0)


def test_identical_requests_in_one_run_are_sent_once(tmp_path: Path) -> None:
    with FakeChatServer() as server:
        results = run_requests([ask("same"), ask("other"), ask("same")], config_for(server))
    assert sorted(server.contents()) == ["other", "same"]
    assert results[0] == results[2] and results[0].text == "answer to same"


def test_budget_stop_keeps_done_results_and_rerun_requests_only_the_missing(
    tmp_path: Path,
) -> None:
    requests = [ask(f"question {i}") for i in range(10)]
    with FakeChatServer() as server:
        # Each request reserves 6 (prompt estimate) + 5 (max_tokens) = 11 tokens: four fit in 50.
        budgeted = config_for(server, tmp_path, max_total_tokens=50, max_concurrency=3)
        first = run_requests(requests, budgeted)
        done = {r.key for r in first if r.ok}
        assert len(done) == 4 and len(server.log) == 4
        assert all(r.error == BUDGET_STOP and r.attempts == 0 for r in first if not r.ok)
        assert cached_files(tmp_path) == 4
        summary = summarize(first, budgeted)
        assert (summary.succeeded, summary.budget_stopped, summary.prompt_tokens) == (4, 6, 24)

        second = run_requests(requests, config_for(server, tmp_path))

    asked_again = server.contents()[4:]
    missing = {f"question {i}" for i, r in enumerate(first) if not r.ok}
    assert sorted(asked_again) == sorted(missing)
    assert all(r.ok for r in second)
    assert {r.key for r in second if r.cached} == done


def test_cost_budget_stops_before_overspending(tmp_path: Path) -> None:
    with FakeChatServer() as server:
        config = config_for(
            server, tmp_path, max_cost=0.05, price_prompt_per_1k=1.0, price_completion_per_1k=2.0
        )
        results = run_requests([ask(f"q{i}") for i in range(10)], config)
    # Worst case per request: (4 * 1 + 5 * 2) / 1000 = 0.014 (prompt estimate of "q0": 4 tokens);
    # actual (6 * 1 + 5 * 2) / 1000 = 0.016: after three, 0.048 + 0.014 no longer fits in 0.05.
    summary = summarize(results, config)
    assert summary.cost <= 0.05 and summary.succeeded == 3 and summary.budget_stopped == 7


def test_cancelled_run_keeps_finished_responses_and_rerun_requests_only_the_missing(
    tmp_path: Path,
) -> None:
    requests = [ask(f"question {i}") for i in range(10)]
    with FakeChatServer(latency_s=0.1) as server:
        config = config_for(server, tmp_path, max_concurrency=2)

        async def killed() -> None:
            await asyncio.wait_for(run_requests_async(requests, config), timeout=0.35)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(killed())
        kept = cached_files(tmp_path)
        assert 2 <= kept < 10
        before = len(server.log)
        results = run_requests(requests, config)

    assert all(r.ok for r in results)
    assert sum(r.cached for r in results) == kept
    asked_again = server.contents()[before:]
    assert sorted(asked_again) == sorted(
        f"question {i}" for i, r in enumerate(results) if not r.cached
    )


def test_api_key_never_appears_in_results_summaries_errors_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="warren.stages.llm_client")
    script = {"boom": ["500", "500"], "denied": ["401"]}
    with FakeChatServer(script=script) as server:
        config = config_for(server, tmp_path, max_attempts=2)
        results = run_requests([ask("boom"), ask("denied"), ask("fine")], config)

    assert all(entry["auth"] == f"Bearer {SECRET}" for entry in server.log)  # it was sent
    boom, denied, fine = results
    assert boom.attempts == 2 and "HTTP 500" in boom.error and "[REDACTED]" in boom.error
    assert denied.attempts == 1 and "HTTP 401" in denied.error  # not retried
    assert fine.ok
    surfaced = repr(results) + repr(summarize(results, config)) + caplog.text
    assert "[REDACTED]" in caplog.text
    assert SECRET not in surfaced and SECRET[8:] not in surfaced
    assert not any(SECRET in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_missing_key_for_openai_is_a_clear_error_and_local_servers_need_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WARREN_TEST_LLM_KEY")
    with pytest.raises(RuntimeError, match="WARREN_TEST_LLM_KEY"):
        run_requests([ask("x")], ClientConfig(model="m", api_key_env="WARREN_TEST_LLM_KEY"))
    with FakeChatServer() as server:
        (result,) = run_requests([ask("x")], config_for(server))
    assert result.ok and server.log[0]["auth"] == "Bearer EMPTY"


def test_concurrency_bound_is_respected(tmp_path: Path) -> None:
    with FakeChatServer(latency_s=0.05) as server:
        results = run_requests(
            [ask(f"q{i}") for i in range(24)], config_for(server, max_concurrency=4)
        )
    assert all(r.ok for r in results)
    assert server.max_in_flight == 4


def test_requests_per_minute_limit_paces_sends() -> None:
    with FakeChatServer() as server:
        # 1200/min = 20/s with a one-second bucket: 20 at once, the next 10 over half a second.
        config = config_for(server, requests_per_minute=1200)
        start = time.monotonic()
        run_requests([ask(f"q{i}") for i in range(30)], config)
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 2.0


def test_tokens_per_minute_limit_paces_sends_and_corrects_from_usage() -> None:
    with FakeChatServer() as server:
        # Each request is estimated at 4 + 5 = 9 tokens before it is sent and corrected to the 11
        # the server reports after: 30 requests use 330 tokens, 220 of them from a full one-second
        # bucket at 13200/min = 220/s, so the rest take half a second (0.25 s without correction).
        config = config_for(server, tokens_per_minute=13200)
        start = time.monotonic()
        results = run_requests([ask(f"q{i:02d}") for i in range(30)], config)
        elapsed = time.monotonic() - start
    assert all(r.ok for r in results)
    assert 0.4 <= elapsed < 2.0


def test_run_requests_works_inside_a_running_event_loop() -> None:
    with FakeChatServer() as server:

        async def from_async_code() -> list[Any]:
            return run_requests([ask("x")], config_for(server))

        (result,) = asyncio.run(from_async_code())
    assert result.text == "answer to x"


@pytest.mark.parametrize("fault", ["truncated", "html", "nochoices"])
def test_malformed_200_reply_is_retried_like_a_5xx(tmp_path: Path, fault: str) -> None:
    with FakeChatServer(script={"q": [fault, fault, "ok"]}) as server:
        (result,) = run_requests([ask("q")], config_for(server, tmp_path), seed=0)
    assert result.ok and result.text == "answer to q" and result.attempts == 3
    assert server.contents() == ["q", "q", "q"]
    assert cached_files(tmp_path) == 1  # the good answer, not a broken one


@pytest.mark.parametrize("fault", ["truncated", "html", "nochoices"])
def test_malformed_200_reply_that_persists_is_named_an_endpoint_error(
    tmp_path: Path, fault: str
) -> None:
    with FakeChatServer(script={"q": [fault] * 3}) as server:
        config = config_for(server, tmp_path, max_attempts=3)
        (result,) = run_requests([ask("q")], config, seed=0)
    assert not result.ok and result.attempts == 3 and len(server.log) == 3
    expected = f"endpoint error: malformed JSON in 200 reply from {server.url}/chat/completions"
    assert result.error.startswith(expected + " after 3 tries ("), result.error
    assert SECRET not in result.error
    assert cached_files(tmp_path) == 0  # nothing paid for is cached as an answer
