"""Throughput of the chat client against a local endpoint with a fixed latency.

    python benchmarks/generate.py --requests 2000 --concurrency 64 --latency 0.2

Starts the tests' `FakeChatServer` (tests/fake_chat_server.py) in a separate process, so that the
server's threads do not share the client's GIL, and sends `requests` distinct chat requests
through `run_requests` (with `--cache`, also into a fresh disk cache). The ceiling is
concurrency / latency requests per second (320 for 64 and 0.2 s); the script prints the achieved
rate and its share of that ceiling, first with every request answered, then with `--rate-429` of
the answers a 429 carrying `Retry-After: --retry-after` seconds (each such request pays at least
one extra latency plus the wait, so its expected ceiling is lower; that expectation is printed
too). A bare httpx client at the same concurrency against the same server is the baseline: what
this machine and a Python server allow any client, and each rate is also given as its share.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from warren.stages.llm_client import ChatRequest, ClientConfig, run_requests, summarize


def _tests_module(name: str) -> ModuleType:
    """A helper module of the test suite (tests/NAME.py), loaded from its file: the suite is not
    installed, and the benchmarks do not edit sys.path."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tests" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the helpers import each other by bare name
        spec.loader.exec_module(module)
    return sys.modules[name]


def serve(
    latency: float, rate_429: float, retry_after: float, urls: mp.Queue, stop: mp.Event
) -> None:
    FakeChatServer = _tests_module("fake_chat_server").FakeChatServer

    with FakeChatServer(
        latency_s=latency, rate_429=rate_429, retry_after=f"{retry_after:g}", seed=0
    ) as server:
        urls.put(server.url)
        stop.wait()
        urls.put((len(server.log), server.max_in_flight))


def run_once(args: argparse.Namespace, rate_429: float) -> float:
    cache_root = ""
    ctx = mp.get_context("spawn")
    urls, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(args.latency, rate_429, args.retry_after, urls, stop))
    proc.start()
    try:
        url = urls.get(timeout=30)
        cache_root = tempfile.mkdtemp(prefix="warren-bench-cache-")
        config = ClientConfig(
            model="bench",
            base_url=url,
            api_key_env="WARREN_BENCH_KEY_UNSET",
            max_concurrency=args.concurrency,
            max_attempts=8,
            timeout_s=10.0,
            cache_dir=cache_root if args.cache else None,
        )
        requests = [
            ChatRequest([{"role": "user", "content": f"describe image {i}"}], {"max_tokens": 64})
            for i in range(args.requests)
        ]
        start = time.perf_counter()
        results = run_requests(requests, config, seed=0)
        elapsed = time.perf_counter() - start
        stop.set()
        served, max_in_flight = urls.get(timeout=30)
    finally:
        stop.set()
        proc.join(timeout=30)
        shutil.rmtree(cache_root, ignore_errors=True)
    summary = summarize(results, config)
    ceiling = args.concurrency / args.latency
    rate = len(results) / elapsed
    print(f"429 share {rate_429:.0%}: {len(results)} requests in {elapsed:.2f}s")
    print(f"  achieved {rate:.1f} req/s = {rate / ceiling:.1%} of the {ceiling:.0f} req/s limit")
    if rate_429:
        # A 429'd request holds its slot for one latency, then waits Retry-After off-slot, then
        # needs another latency: the slot-time ceiling drops by the share of extra latencies.
        extra = summary.retries / len(results)
        print(f"  slot-time ceiling with {extra:.1%} retried: {ceiling / (1 + extra):.0f} req/s")
    print(
        f"  succeeded {summary.succeeded}, failed {summary.failed}, sent {summary.sent}, "
        f"retries {summary.retries}, server saw {served}, max in flight {max_in_flight}"
    )
    return rate


def bare_httpx_rate(args: argparse.Namespace) -> float | None:
    """Requests/s of a bare httpx client (no retries, no cache, no openai) against the same fault-free
    server at the same concurrency: what this machine and server allow any Python client."""
    try:
        import httpx
    except ImportError:
        return None
    ctx = mp.get_context("spawn")
    urls, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(args.latency, 0.0, args.retry_after, urls, stop))
    proc.start()
    try:
        url = urls.get(timeout=30)

        async def go() -> float:
            slots = asyncio.Semaphore(args.concurrency)
            limits = httpx.Limits(max_connections=args.concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits) as client:

                async def one(i: int) -> None:
                    async with slots:
                        body = {"model": "bench", "messages": [{"role": "user", "content": f"{i}"}]}
                        (await client.post("/chat/completions", json=body)).json()

                start = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(args.requests)))
                return args.requests / (time.perf_counter() - start)

        return asyncio.run(go())
    finally:
        stop.set()
        proc.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer")
    parser.add_argument("--rate-429", type=float, default=0.05, help="share answered 429")
    parser.add_argument("--retry-after", type=float, default=0.2, help="seconds, in the 429s")
    parser.add_argument(
        "--cache", action="store_true", help="write every response to a fresh disk cache"
    )
    args = parser.parse_args()
    baseline = bare_httpx_rate(args)
    if baseline is not None:
        ceiling = args.concurrency / args.latency
        print(
            f"baseline, bare httpx client, no faults: {baseline:.1f} req/s = "
            f"{baseline / ceiling:.1%} of the {ceiling:.0f} req/s limit (this machine and server)"
        )
    for rate_429 in (0.0, args.rate_429):
        rate = run_once(args, rate_429)
        if baseline:
            print(f"  = {rate / baseline:.1%} of the bare httpx baseline")


if __name__ == "__main__":
    main()
