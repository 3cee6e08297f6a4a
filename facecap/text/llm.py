"""A general async client for OpenAI-compatible chat endpoints (what `vllm serve` exposes).

    client = LLMClient(cfg.llm, cache_dir="OUT/cache/llm")
    results = client.chat_many([[{"role": "user", "content": "..."}], ...])   # -> list[ChatResult]

- Many requests in flight: up to ``llm.concurrency`` per client, over pooled
  keep-alive connections (one event loop; ``chat_many`` runs it with
  ``asyncio.run``, so call it where no loop is running, e.g. in a Dask task;
  inside a running loop use ``await achat_many``).
- Each request has a timeout; timeouts, connection errors and HTTP 5xx are
  retried with exponential backoff (``llm.retries`` times). Other failures
  (4xx, a malformed reply) are returned at once as errors: retrying them would
  give the same answer.
- Replies are cached on disk, one small file per key, written atomically
  (temporary name + rename), so any number of worker processes can share the
  cache and a rerun of the same requests sends nothing. The key is
  sha256(messages + model + sampling settings + seed); the endpoint URL is not
  part of it (the same model behind another URL gives the same reply).
- The API key, if any, is read from the environment variable ``llm.api_key_env``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import httpx

from facecap.settings import ConfigError, LLMSettings

Messages = Sequence[dict]
POOL_SIZE = 8  # connections per httpx pool; concurrency is spread over ceil(concurrency / POOL_SIZE) pools


class LLMUnavailable(RuntimeError):
    """The endpoint kept failing (timeouts, connection errors, 5xx) after every retry."""


@dataclass(frozen=True)
class ChatResult:
    text: str | None = None
    error: str | None = None  # set when no reply text was obtained
    transient: bool = False  # the error was a timeout / connection error / 5xx that outlasted the retries
    cached: bool = False
    attempts: int = 0  # HTTP requests sent for this result (0 when cached)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0  # results without text
    max_in_flight: int = 0
    seconds: float = 0.0
    _in_flight: int = field(default=0, repr=False)


def check_endpoint(endpoint: str) -> str:
    """The endpoint's base URL without a trailing slash; a clear error for anything but http(s)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"llm.endpoint {endpoint!r} must be an http(s) URL such as http://vllm:8000/v1")
    return endpoint.rstrip("/")


class LLMClient:
    """Chat completions against one OpenAI-compatible endpoint, with concurrency, retries and a cache."""

    def __init__(self, settings: LLMSettings, cache_dir: str | os.PathLike[str] | None = None,
                 api_key: str | None = None):
        if not settings.endpoint:
            raise ConfigError("llm.endpoint is not set: set it to an OpenAI-compatible base URL "
                              "(e.g. --set llm.endpoint=http://localhost:8000/v1)")
        self.settings = settings
        self.base_url = check_endpoint(settings.endpoint)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.api_key = api_key if api_key is not None else os.environ.get(settings.api_key_env) or None
        self.stats = ClientStats()
        self._tls_context: ssl.SSLContext | None = None

    # -- requests and keys ------------------------------------------------------
    def sampling(self, seed: int | None = None) -> dict:
        body = {"model": self.settings.model, "temperature": self.settings.temperature,
                "top_p": self.settings.top_p, "max_tokens": self.settings.max_tokens}
        if seed is not None:
            body["seed"] = seed
        return body

    def cache_key(self, messages: Messages, seed: int | None = None) -> str:
        blob = json.dumps({"messages": list(messages), **self.sampling(seed)}, sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["text"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent (or unreadable: then it is asked again and rewritten)

    def _cache_put(self, key: str, text: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique temporary name in the same folder, then an atomic rename: two
        # processes writing one key both leave a complete file (same content).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"text": text, "model": self.settings.model, "written_at": time.time()}, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- calls ----------------------------------------------------------------
    def chat_many(self, conversations: Sequence[Messages], seeds: Sequence[int | None] | None = None,
                  on_result: Callable[[int, ChatResult], None] | None = None) -> list[ChatResult]:
        """Send every conversation (concurrently) and return their results in order."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.achat_many(conversations, seeds, on_result))
        raise RuntimeError("LLMClient.chat_many was called inside a running event loop; use await achat_many")

    def chat(self, messages: Messages, seed: int | None = None) -> ChatResult:
        return self.chat_many([messages], [seed])[0]

    async def achat_many(self, conversations: Sequence[Messages], seeds: Sequence[int | None] | None = None,
                         on_result: Callable[[int, ChatResult], None] | None = None) -> list[ChatResult]:
        started = time.perf_counter()
        seeds = list(seeds) if seeds is not None else [None] * len(conversations)
        if len(seeds) != len(conversations):
            raise ValueError("seeds must have one entry per conversation")
        results: list[ChatResult | None] = [None] * len(conversations)
        # Identical requests in one call are sent once.
        by_key: dict[str, list[int]] = {}
        for i, (messages, seed) in enumerate(zip(conversations, seeds)):
            by_key.setdefault(self.cache_key(messages, seed), []).append(i)
        todo = []
        for key, indexes in by_key.items():
            text = self._cache_get(key)
            if text is not None:
                self.stats.cache_hits += len(indexes)
                for i in indexes:
                    results[i] = ChatResult(text=text, cached=True)
                    if on_result:
                        on_result(i, results[i])
            else:
                todo.append((key, indexes))
        if todo:
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            workers = min(self.settings.concurrency, len(todo))
            # httpcore's pool looks at every connection on every request event, so
            # one pool of 64 connections spends more CPU than the requests; several
            # small pools keep that cost flat (bench/bench_captions.py).
            pools = [httpx.AsyncClient(base_url=self.base_url, headers=headers, verify=self._tls(),
                                       limits=httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE),
                                       timeout=httpx.Timeout(self.settings.timeout_s))
                     for _ in range(-(-workers // POOL_SIZE))]
            queue = iter(todo)

            async def worker(http: httpx.AsyncClient) -> None:
                # `workers` of these pull requests until none are left: at most
                # `concurrency` in flight, and never more than a pool's size per pool.
                for key, indexes in queue:
                    first = indexes[0]
                    result = await self._request(http, conversations[first], seeds[first])
                    if result.ok:
                        self._cache_put(key, result.text)
                    else:
                        self.stats.errors += len(indexes)
                    for i in indexes:
                        results[i] = result
                        if on_result:
                            on_result(i, result)

            try:
                await asyncio.gather(*(worker(pools[k // POOL_SIZE]) for k in range(workers)))
            finally:
                for http in pools:
                    await http.aclose()
        self.stats.seconds += time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _tls(self) -> ssl.SSLContext:
        # One TLS context for all pools and calls: loading the CA bundle costs ~40 ms each time.
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context()
        return self._tls_context

    async def _request(self, http: httpx.AsyncClient, messages: Messages, seed: int | None) -> ChatResult:
        body = {"messages": list(messages), **self.sampling(seed)}
        attempts = 0
        while True:
            attempts += 1
            self.stats.requests += 1
            self.stats._in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats._in_flight)
            try:
                response = await http.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                error = f"timeout after {self.settings.timeout_s}s"
            except httpx.TransportError as exc:
                error = f"connection error: {type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return self._parse(response, attempts)
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code < 500:
                    return ChatResult(error=error, attempts=attempts)
            finally:
                self.stats._in_flight -= 1
            if attempts > self.settings.retries:
                return ChatResult(error=f"{error} ({attempts} attempts)", transient=True, attempts=attempts)
            self.stats.retries += 1
            delay = min(self.settings.backoff_s * 2 ** (attempts - 1), self.settings.max_backoff_s)
            # Jitter spreads retries of many requests that failed together.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    @staticmethod
    def _parse(response: httpx.Response, attempts: int) -> ChatResult:
        try:
            text = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ChatResult(error=f"malformed reply: {response.text[:300]}", attempts=attempts)
        if not isinstance(text, str):
            return ChatResult(error="malformed reply: message content is not text", attempts=attempts)
        return ChatResult(text=text.strip(), attempts=attempts)

    def served_models(self, timeout_s: float = 10.0) -> list[str]:
        """The model names the endpoint serves (GET /models); a clear error if it does not answer."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = httpx.get(f"{self.base_url}/models", headers=headers, timeout=timeout_s)
            response.raise_for_status()
            return [m["id"] for m in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"llm.endpoint {self.base_url} did not answer GET /models ({type(exc).__name__}: "
                              f"{exc}). Start the server (e.g. vllm serve {self.settings.model}) or unset "
                              "llm.endpoint to keep the grammar's captions.") from exc
