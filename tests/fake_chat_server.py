"""A chat-completions endpoint on 127.0.0.1 with scripted answers and faults, for the client's
tests and benchmarks/generate.py."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# 200 replies that are not a chat completion: (body, headers, content type).
MALFORMED: dict[str, tuple[bytes, dict[str, str], str]] = {
    "truncated": (
        b'{"id": "chatcmpl-test", "object": "chat.completion", "choi',
        {},
        "application/json",
    ),
    "html": (b"<html><body><h1>502 Bad Gateway</h1></body></html>", {}, "text/html"),
    "nochoices": (b'{"id": "chatcmpl-test", "object": "chat.completion"}', {}, "application/json"),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default listen backlog (5) drops connections when 64 clients connect at once.
    request_queue_size = 256


class FakeChatServer:
    """A `/v1/chat/completions` endpoint in a thread.

    `script` maps a request's last message content to the answers for its successive requests:
    "ok", "500" (the body echoes the Authorization header, as careless proxies do), "401",
    ("429", retry_after_header), ("stall", seconds), or a 200 reply that is not a completion, as
    overloaded proxies and gateways send: "truncated" (JSON cut in the middle), "html" (an error page
    served as text/html) or "nochoices" (valid JSON without `choices`). Unscripted requests get "ok",
    or a 429 with probability `rate_429`. Every request is logged with its arrival time, and the largest number
    of requests in flight at once is recorded; `answered` lists the completions it generated.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        script: dict[str, list[Any]] | None = None,
        rate_429: float = 0.0,
        retry_after: str = "0.2",
        seed: int = 0,
    ) -> None:
        self.latency_s = latency_s
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.rate_429 = rate_429
        self.retry_after = retry_after
        self.rng = random.Random(seed)
        self.log: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []  # the 200 completions it generated (paid)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        # A short poll interval makes shutdown quick: tests start many servers.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def contents(self) -> list[str]:
        with self.lock:
            return [entry["content"] for entry in self.log]

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_answer(self, content: str) -> Any:
        queue = self.script.get(text_of(content))
        if queue:
            return queue.pop(0)
        if self.rate_429 and self.rng.random() < self.rate_429:
            return ("429", self.retry_after)
        return "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
            # Headers and body go out in two writes; with Nagle's algorithm on, the body waits for
            # the client's delayed ACK (~40 ms on Linux). Real servers (uvicorn) set TCP_NODELAY.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self,
                status: int,
                body: dict[str, Any] | bytes,
                headers: dict[str, str],
                content_type: str = "application/json",
            ) -> None:
                blob = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(blob)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(blob)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    server.log.append({"content": content, "t": time.monotonic(), "auth": auth})
                    answer = server._next_answer(content)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.latency_s)
                    kind = answer[0] if isinstance(answer, tuple) else answer
                    if kind == "429":
                        error = {"error": {"message": "rate limited", "type": "rate_limit"}}
                        self._send(429, error, {"Retry-After": answer[1]})
                    elif kind in ("500", "401"):
                        message = f"cannot serve request with Authorization: {auth}"
                        self._send(int(kind), {"error": {"message": message}}, {})
                    elif kind in MALFORMED:
                        self._send(200, *MALFORMED[kind])
                    else:
                        if kind == "stall":
                            time.sleep(answer[1])
                        completion = f"answer to {text_of(content)}"
                        with server.lock:
                            # Paid: an endpoint bills an answer it generated, whether or not
                            # the client is still there to read it.
                            server.answered.append({"content": content, "t": time.monotonic()})
                        usage = {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
                        reply = {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": completion},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": usage,
                        }
                        self._send(200, reply, {})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: expected for stalls
                finally:
                    with server.lock:
                        server.in_flight -= 1

        return Handler


Reply = tuple[int, str, str]  # HTTP status, text, finish_reason


class ScriptedChatServer(FakeChatServer):
    """FakeChatServer whose replies come from `reply(messages) -> (status, text, finish_reason)`,
    so answers can be JSON, refusals or truncations chosen by what the request says."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], Reply]) -> None:
        self.reply = reply
        self.auth: list[str] = []
        super().__init__()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                with server.lock:
                    server.log.append({"content": json.dumps(content), "t": 0.0})
                    server.auth.append(self.headers.get("Authorization", ""))
                status, text, finish = server.reply(body["messages"])
                if status != 200:
                    payload: dict[str, Any] = {"error": {"message": text}}
                else:
                    payload = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": finish,
                            }
                        ],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                    }
                blob = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

        return Handler


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
