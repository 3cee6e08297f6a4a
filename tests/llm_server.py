"""Test double for vLLM: a small OpenAI-compatible chat server on 127.0.0.1.

It stands in for `vllm serve` only at the HTTP boundary (no LLM can run here).
Replies are scripted from the last user message (the raw caption), so tests
decide what the "model" does: rewrite faithfully, omit a sentence, invent an
attribute, answer slowly, fail with a status, or hang past the client's
timeout. It counts requests per raw text and the most requests ever in flight.

    with FakeVLLM(behaviour) as server:      # server.url = "http://127.0.0.1:PORT/v1"
        ...
    behaviour(raw, n, body) -> Reply          # n: how many times this raw text was asked before
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    text: str | None = None
    status: int = 200
    delay: float = 0.0  # seconds before answering (longer than the client's timeout = a timeout)


def raw_of(body: dict) -> str:
    """The raw caption in the last user message (after the prompt template's 'Description:')."""
    content = [m for m in body.get("messages", []) if m.get("role") == "user"][-1]["content"]
    return re.sub(r"^\s*Description:\s*", "", content)


# Scripted rewrites. They edit the raw text the way a model might.
def faithful(raw: str) -> str:
    """Every attribute kept: sentences merged, words unchanged."""
    sentences = [s.strip().rstrip(".") for s in raw.split(". ") if s.strip()]
    return "; ".join(sentences) + "."


def omitting(raw: str) -> str:
    """The last sentence is dropped (its attributes are omitted)."""
    sentences = [s for s in raw.split(". ") if s.strip()]
    kept = sentences[:-1] or sentences
    return ". ".join(s.rstrip(".") for s in kept) + "."


def hallucinating(raw: str) -> str:
    """Everything kept, and a hat and a goatee invented."""
    return faithful(raw) + " The person also wears a hat and has a goatee."


ACTIONS: dict[str, Callable[[str], Reply]] = {
    "faithful": lambda raw: Reply(faithful(raw)),
    "omitting": lambda raw: Reply(omitting(raw)),
    "hallucinating": lambda raw: Reply(hallucinating(raw)),
    "500": lambda raw: Reply(status=500, text="internal error"),
    "503": lambda raw: Reply(status=503, text="overloaded"),
    "400": lambda raw: Reply(status=400, text="prompt too long"),
    "malformed": lambda raw: Reply(status=200, text=None),
    "timeout": lambda raw: Reply(faithful(raw), delay=3.0),
}


def always(action: str, delay: float = 0.0) -> Callable[[str, int, dict], Reply]:
    def behaviour(raw: str, n: int, body: dict) -> Reply:
        reply = ACTIONS[action](raw)
        reply.delay = max(reply.delay, delay)
        return reply

    return behaviour


def scripted(script: dict[str, list[str]], default: str = "faithful") -> Callable[[str, int, dict], Reply]:
    """Per raw text (or a substring of it), the action for its 1st, 2nd, ... request; the last repeats."""

    def behaviour(raw: str, n: int, body: dict) -> Reply:
        for needle, actions in script.items():
            if needle in raw:
                return ACTIONS[actions[min(n, len(actions) - 1)]](raw)
        return ACTIONS[default](raw)

    return behaviour


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default 5 drops connection bursts (64 clients connecting at once)


class FakeVLLM:
    """An OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models) on a free local port."""

    def __init__(self, behaviour: Callable[[str, int, dict], Reply] | None = None, model: str = "test-model"):
        self.behaviour = behaviour or always("faithful")
        self.model = model
        self.lock = threading.Lock()
        self.requests = 0  # chat requests received
        self.statuses: Counter = Counter()
        self.by_raw: Counter = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeVLLM":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server

            def setup(self) -> None:
                super().setup()
                # Headers and body go out as two writes; without this, Nagle's algorithm
                # holds the body for the client's delayed ACK (~40 ms a request).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: dict | str) -> None:
                data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": "not found"})
                    return
                raw = raw_of(body)
                with fake.lock:
                    n = fake.by_raw[raw]
                    fake.by_raw[raw] += 1
                    fake.requests += 1
                    fake.bodies.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    reply = fake.behaviour(raw, n, body)
                    if reply.delay:
                        time.sleep(reply.delay)
                    with fake.lock:
                        fake.statuses[reply.status] += 1
                    if reply.status != 200:
                        self._send(reply.status, {"error": {"message": reply.text or "error"}})
                    elif reply.text is None:
                        self._send(200, {"choices": []})  # malformed: no choices
                    else:
                        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": fake.model,
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": reply.text}}]})
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        return Handler


if __name__ == "__main__":
    # A stand-alone server for benchmarks (its own process, as vLLM would be):
    #   python tests/llm_server.py --latency 0.2      prints its URL, serves until killed
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI-compatible test server (vLLM stand-in)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--model", default="test-model")
    args = parser.parse_args()
    with FakeVLLM(always("faithful", delay=args.latency), model=args.model) as server:
        print(server.url, flush=True)
        threading.Event().wait()
