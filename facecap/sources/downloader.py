"""Download images from URLs: many requests in flight, every URL ends with a status.

`Downloader.iter_fetch(urls)` runs an asyncio event loop of its own (httpx
AsyncClient, `download.connections` requests in flight) and yields one
`Fetched` per URL in input order, so a shard written from it is the same
whatever order the responses came in. A bounded window of URLs (4 x
connections, and at most BUFFER_BYTES of finished bodies) is in flight at a
time: memory stays bounded by the window, not by the URL list.

What happens to each URL (first match wins; the status is a Reason string):
- not http(s) / no host: invalid_url; host resolves to a non-public address
  (loopback, private, link-local, metadata, ...): blocked_address, checked
  after DNS on every hop and connected to by the checked address only
  (facecap.netguard); unresolvable: dns; cannot connect: connect_error
- redirects are followed up to download.max_redirects (too_many_redirects),
  a URL seen twice is redirect_loop
- a path robots.txt disallows for our user agent: opted_out, never requested (on every hop);
  robots.txt is fetched once per site (scheme, host, port) and cached in memory per worker
  process for at most 24 h (download.respect_robots_txt; RFC 9309 rules, see RobotsRules):
  a 4xx (not 429) robots.txt allows everything, a 5xx or 429 disallows the whole site
  (opted_out), a network failure gives every URL of the site that failure's status
  (timeout, connect_error: retried by a later --retry-failed), without asking for it
- a response (the image's or a redirect hop's) whose headers opt it out: opted_out, with the
  directive and the header in the detail, decided on the headers before any body is read:
  X-Robots-Tag directives in download.optout_directives addressed to our user agent's product
  token or to every crawler (download.respect_noai), `tdm-reservation: 1`
  (download.respect_tdm_reservation); see docs/optouts.md
- HTTP status other than 200: http_<status> (http_404, http_503 ...)
- Content-Type that is not an image (text/html error pages): not_image
- more than image.max_bytes (Content-Length or counted while streaming) or a
  header claiming more than image.max_pixels (probed while streaming, before
  the rest is read): too_large
- no answer within download.timeout_s: timeout
- body not a readable image: decode_error / unsupported_format / empty_file
Transient failures (timeout, connect_error, 5xx, 429) are retried with
exponential backoff up to download.retries times; nothing else is retried.

Per host (download.domain_connections, download.domain_requests_per_s): a URL
waits for its host's turn before it takes one of the connections, so a busy or
paused host holds none; a 429/503 pauses its host for its Retry-After (at most
download.max_retry_after_s, past which its URLs end with that status unasked).
The limits count per Downloader (one shard). docs/optouts.md has the details.
Nothing here knows Prefect or Dask.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import re
import ssl
import threading
import time
import urllib.parse
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import httpx
from PIL import Image, ImageOps

from facecap import netguard
from facecap.settings import DownloadSettings, ImageLimits
from facecap.schema import Reason
from facecap.sources.images import probe

OK = "ok"
# The status of every opt-out the downloader honours (headers, robots.txt); the detail says which.
OPTED_OUT = Reason.OPTED_OUT
# Retried at once with backoff. DNS failures are not (NXDOMAIN rarely heals in
# seconds) but, like these, are retried by a later `--retry-failed` run.
RETRY_NOW = {Reason.TIMEOUT, Reason.CONNECT_ERROR, "http_429"}
INLINE_DECODE_PIXELS = 512 * 512  # decoded on the event loop; larger images in a thread
PROBE_AT = 64 * 1024
# Finished downloads held while an earlier URL is still in flight; past this, no new URL starts.
# Memory per worker stays below this plus connections x image.max_bytes (bodies being read).
BUFFER_BYTES = 256 * 2**20  # bytes after which the image header is probed (pixel bombs stop here)
_REDIRECTS = {301, 302, 303, 307, 308}
_BINARY_TYPES = {"application/octet-stream", "binary/octet-stream", "application/binary", ""}


_END = object()


def _body_size(task: asyncio.Task) -> int:
    return len(task.result().data or b"") if not task.cancelled() and task.exception() is None else 0


def retry_after_s(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


@dataclass
class _Domain:
    """One host's share of the downloader: requests at once, the next start the rate allows, a pause it asked for."""

    slots: asyncio.Semaphore | None
    next_at: float = 0.0
    paused_until: float = 0.0
    pause_status: str = "http_429"


def _tls_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def retry_now(status: str) -> bool:
    return status in RETRY_NOW or (status.startswith("http_5") and len(status) == 8)


@dataclass
class Fetched:
    """The outcome of one URL."""

    url: str
    status: str  # OK or a Reason
    data: bytes | None = None
    detail: str = ""
    final_url: str | None = None  # after redirects
    attempts: int = 1
    width: int | None = None
    height: int | None = None
    format: str | None = None
    resized_from: tuple[int, int] | None = None  # original size when download.resize_max_side shrank it
    content_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


class _Stop(Exception):
    """Ends one attempt with a status."""

    def __init__(self, status: str, detail: str = ""):
        super().__init__(detail)
        self.status, self.detail = status, detail


# X-Robots-Tag directives written "name: value": their name is not a user agent.
_VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


# -- robots.txt (RFC 9309) ---------------------------------------------------------------
ROBOTS_TTL_S = 24 * 3600  # RFC 9309 2.4: a cached robots.txt should not be used for more than 24 hours
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 2.5: at least 500 KiB are parsed; the rest is ignored
_ROBOTS_CACHE: dict[tuple, "RobotsRules"] = {}
_ROBOTS_LOCK = threading.Lock()  # ingest runs shards in threads of one worker process


def clear_robots_cache() -> None:
    with _ROBOTS_LOCK:
        _ROBOTS_CACHE.clear()


def _robots_pattern(value: str) -> re.Pattern:
    """A robots.txt path pattern: `*` matches any characters, a final `$` ends the path."""
    end = value.endswith("$")
    body = urllib.parse.unquote(value[:-1] if end else value)
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in body) + ("$" if end else ""), re.S)


@dataclass
class RobotsRules:
    """The rules of one site's robots.txt for one product token (RFC 9309).

    The groups naming the token (case-insensitive) are merged, else the `*` groups; the longest
    matching allow/disallow rule wins, allow on a tie; no matching rule allows. `blocked` stands for
    every path when the file could not be read (status, detail).
    """

    source: str
    rules: list[tuple[int, bool, re.Pattern, str]] = field(default_factory=list)  # (length, allow, pattern, line)
    blocked: tuple[str, str] | None = None
    fetched_at: float = field(default_factory=time.monotonic)

    @classmethod
    def parse(cls, source: str, text: str, token: str) -> "RobotsRules":
        groups: list[tuple[set[str], list[tuple[bool, str]]]] = []
        in_agents = False
        for raw in text.removeprefix("\ufeff").splitlines():  # files saved by Windows editors start with a BOM
            key, sep, value = raw.split("#", 1)[0].partition(":")
            key, value = key.strip().lower(), value.strip()
            if not sep:
                continue
            if key == "user-agent":
                if not in_agents:
                    groups.append((set(), []))
                    in_agents = True
                groups[-1][0].add(value.split("/")[0].strip().lower())
            elif key in ("allow", "disallow"):
                in_agents = False
                if groups and value:  # an empty Disallow matches nothing
                    groups[-1][1].append((key == "allow", value))
        named = [rules for agents, rules in groups if token in agents]
        chosen = named or [rules for agents, rules in groups if "*" in agents]
        rules = [(len(v), allow, _robots_pattern(v), f"{'Allow' if allow else 'Disallow'}: {v}")
                 for group in chosen for allow, v in group]
        return cls(source, rules)

    def verdict(self, path: str, token: str) -> tuple[str, str] | None:
        """(status, detail) when path must not be requested; None when it may."""
        if self.blocked:
            return self.blocked
        if path == "/robots.txt":
            return None
        path = urllib.parse.unquote(path)
        best = None
        for length, allow, pattern, line in self.rules:
            if pattern.match(path) and (best is None or (length, allow) > (best[0], best[1])):
                best = (length, allow, line)
        if best is None or best[1]:
            return None
        return OPTED_OUT, f"{self.source} disallows {path} for {token or '*'} ({best[2]})"


def agent_token(user_agent: str) -> str:
    """The product token crawlers are addressed by (robots.txt, X-Robots-Tag): "facecap" of "facecap/0.1 (...)"."""
    return user_agent.strip().split("/")[0].split()[0].lower() if user_agent.strip() else ""


def robots_tag_directives(values: list[str], user_agent: str) -> list[str]:
    """The X-Robots-Tag directives (lower case) that apply to `user_agent`.

    Each header value is a comma list; "otherbot: noindex, nofollow" addresses both directives to
    otherbot until another agent is named; a value that names none addresses every crawler.
    """
    token, found = agent_token(user_agent), []
    for value in values:
        target = None
        for part in value.replace(";", ",").split(","):
            name, sep, rest = part.partition(":")
            name = name.strip().lower()
            if sep and name and name not in _VALUED_DIRECTIVES and not any(c.isspace() for c in name):
                target, name = name, rest.partition(":")[0].strip().lower()
            if name and (target is None or target == token):
                found.append(name)
    return found


@dataclass
class Downloader:
    settings: DownloadSettings
    limits: ImageLimits
    extra_allow: list[str] = field(default_factory=list)  # e.g. models.allow_addresses

    def __post_init__(self) -> None:
        self.networks = netguard.allow_networks(
            list(self.settings.allow_addresses) + list(self.extra_allow), "download.allow_addresses")
        self._resolved: dict[tuple[str, int], list[str] | netguard.GuardError] = {}
        self._directives = {d.strip().lower() for d in self.settings.optout_directives}
        self._agent = self.settings.agent()
        self._token = agent_token(self._agent)
        self._robots: dict[tuple, asyncio.Future] = {}  # robots.txt fetches in flight on this loop
        self._domains: dict[str, _Domain] = {}

    # -- the synchronous face: used by ingest ---------------------------------
    def iter_fetch(self, urls: Iterable[str]) -> Iterator[Fetched]:
        """Fetch every URL, many at a time; yield results in input order."""
        loop = asyncio.new_event_loop()
        pending: deque[asyncio.Task] = deque()
        clients: list[httpx.AsyncClient] = []
        try:
            # One single-connection client per request slot, handed out through a queue: httpcore's shared
            # pool rescans every connection on each request, which cost more CPU than the downloads at
            # 32+ connections (bench/bench_download.py); a slot keeps its keep-alive connection.
            tls = _tls_context()  # one for all slots: loading the CA bundle per client costs ~20 ms each
            clients = [self._client(tls) for _ in range(self.settings.connections)]
            slots: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
            for client in clients:
                slots.put_nowait(client)
            # A wide window: URLs waiting for their site's turn (per-domain limits, Retry-After) hold no
            # slot, so the other sites' URLs behind them keep the slots busy; bodies stay under BUFFER_BYTES.
            window = max(32 * self.settings.connections, 256)
            buffered = [0]  # bytes of finished downloads still in the window
            sizes: dict[asyncio.Task, int] = {}

            def finished(task: asyncio.Task) -> None:
                if task in live:
                    sizes[task] = _body_size(task)
                    buffered[0] += sizes[task]

            live: set[asyncio.Task] = set()

            source = iter(urls)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window and buffered[0] < BUFFER_BYTES:
                    url = next(source, _END)
                    if url is _END:
                        exhausted = True
                        break
                    task = loop.create_task(self.fetch(slots, url))
                    task.add_done_callback(finished)
                    live.add(task)
                    pending.append(task)
                if not pending:
                    break
                head = pending[0]
                # Runs every task in the window until the oldest one is done.
                loop.run_until_complete(asyncio.wait({head}))
                pending.popleft()
                live.discard(head)  # its done callback, if it has not run yet, counts nothing
                buffered[0] -= sizes.pop(head, 0)
                yield head.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            unfinished = [f for f in self._robots.values() if not f.done()]
            for future in unfinished:
                future.cancel()
            if unfinished:
                loop.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
            self._robots.clear()
            for client in clients:
                loop.run_until_complete(client.aclose())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _client(self, tls: ssl.SSLContext) -> httpx.AsyncClient:
        s = self.settings
        return httpx.AsyncClient(
            verify=tls,
            follow_redirects=False,  # every hop is checked by us (netguard)
            timeout=httpx.Timeout(s.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            trust_env=False,  # a proxy from the environment would bypass the address check
            headers={"User-Agent": self._agent, "Accept": "image/*,*/*;q=0.5"},
        )

    # -- one URL ----------------------------------------------------------------
    async def fetch(self, slots: "asyncio.Queue[httpx.AsyncClient]", url: str) -> Fetched:
        """Fetch one URL, retrying transient failures with exponential backoff."""
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            result = await self._attempt(slots, url)
            result.attempts = attempt + 1
            if result.ok or not retry_now(result.status) or attempt + 1 == attempts:
                break
            await asyncio.sleep(self.settings.backoff_s * 2 ** attempt)
        if result.ok and (self.settings.decode_check or self.settings.resize_max_side):
            if (result.width or 0) * (result.height or 0) <= INLINE_DECODE_PIXELS:
                self._decode(result)  # under a millisecond: cheaper than a thread hop on a busy machine
            else:
                # Large images: a thread, so the event loop keeps downloading meanwhile.
                await asyncio.to_thread(self._decode, result)
        return result

    @contextlib.asynccontextmanager
    async def _turn(self, slots: "asyncio.Queue[httpx.AsyncClient]", url: str):
        """A client for one request to url's host, once the host's limits allow one (then a free slot).

        The host's turn comes first: a URL waiting on a busy or paused site holds no slot.
        """
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        domain = self._domains.get(host)
        if domain is None:
            limit = self.settings.domain_connections
            domain = self._domains[host] = _Domain(asyncio.Semaphore(limit) if limit else None)
        if domain.slots:
            await domain.slots.acquire()
        try:
            loop = asyncio.get_running_loop()
            while True:
                now = loop.time()
                if domain.paused_until - now > self.settings.max_retry_after_s:
                    raise _Stop(domain.pause_status, f"{host} asked (Retry-After) to wait "
                                                     f"{domain.paused_until - now:.0f} s more, over "
                                                     f"download.max_retry_after_s={self.settings.max_retry_after_s}")
                start = max(domain.paused_until, domain.next_at)
                if start <= now:
                    break
                await asyncio.sleep(start - now)
            if self.settings.domain_requests_per_s:
                domain.next_at = now + 1 / self.settings.domain_requests_per_s
            client = await slots.get()
            try:
                yield client
            finally:
                slots.put_nowait(client)
        finally:
            if domain.slots:
                domain.slots.release()

    def _pause(self, url: str, response: httpx.Response) -> None:
        """A 429/503 pauses its whole host: Retry-After seconds, or the first retry delay without one."""
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        domain = self._domains.get(host)
        if domain is None:
            return
        wait = retry_after_s(response.headers.get("retry-after"))
        until = asyncio.get_running_loop().time() + (self.settings.backoff_s if wait is None else wait)
        if until > domain.paused_until:
            domain.paused_until, domain.pause_status = until, f"http_{response.status_code}"

    async def _attempt(self, slots: "asyncio.Queue[httpx.AsyncClient]", url: str) -> Fetched:
        current, seen = url, {url}
        try:
            for _ in range(self.settings.max_redirects + 1):
                if self.settings.respect_robots_txt:
                    await self._robots_check(slots, current)
                async with self._turn(slots, current) as client:
                    async with asyncio.timeout(self.settings.timeout_s):
                        nxt = await self._hop(client, url, current)
                if isinstance(nxt, Fetched):
                    return nxt
                if nxt in seen:
                    return Fetched(url, Reason.REDIRECT_LOOP, detail=f"{current} redirects back to {nxt}")
                seen.add(nxt)
                current = nxt
            return Fetched(url, Reason.TOO_MANY_REDIRECTS,
                           detail=f"more than download.max_redirects={self.settings.max_redirects} redirects")
        except _Stop as stop:
            return Fetched(url, stop.status, detail=stop.detail[:500], final_url=current)
        except (TimeoutError, httpx.TimeoutException):
            return Fetched(url, Reason.TIMEOUT, detail=f"no complete answer within {self.settings.timeout_s} s",
                           final_url=current)
        except httpx.HTTPError as exc:
            # Reset connections, protocol errors mid-body: the network, not the URL.
            return Fetched(url, Reason.CONNECT_ERROR, detail=f"{type(exc).__name__}: {exc}"[:500], final_url=current)
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:  # URLs httpx cannot even express
            return Fetched(url, Reason.INVALID_URL, detail=f"{type(exc).__name__}: {exc}"[:500], final_url=current)
        except Exception as exc:  # one odd URL or server must not fail the shard; the detail says what happened
            return Fetched(url, Reason.CONNECT_ERROR, detail=f"unexpected {type(exc).__name__}: {exc}"[:500],
                           final_url=current)

    async def _addresses(self, url: str) -> list[str]:
        """Checked addresses of url's host, resolved once per host and Downloader (one shard).

        LAION shards hit the same hosts many times; one lookup each also keeps
        every request to a host on the addresses that were checked.
        """
        try:
            target = netguard.parse_target(url)
        except netguard.GuardError as exc:
            raise _Stop(exc.reason, str(exc)) from None
        key = (target.host, target.port)
        if key not in self._resolved:
            try:
                self._resolved[key] = await netguard.checked_addresses_async(url, self.networks,
                                                                             "download.allow_addresses")
            except netguard.GuardError as exc:
                self._resolved[key] = exc
        found = self._resolved[key]
        if isinstance(found, netguard.GuardError):
            raise _Stop(found.reason, str(found))
        return found

    async def _robots_check(self, slots: "asyncio.Queue[httpx.AsyncClient]", current: str) -> None:
        """Stops when current's site's robots.txt disallows it; fetches that robots.txt once per site."""
        await self._addresses(current)  # a blocked or unresolvable host stops here, before any request
        parts = urllib.parse.urlsplit(current)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port, self._token)
        with _ROBOTS_LOCK:
            rules = _ROBOTS_CACHE.get(key)
        if rules is None or time.monotonic() - rules.fetched_at > ROBOTS_TTL_S:
            future = self._robots.get(key)
            if future is None or (future.done() and rules is not None):  # none yet, or the cached one expired
                origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
                future = self._robots[key] = asyncio.ensure_future(self._fetch_robots(slots, origin))
            rules = await asyncio.shield(future)  # one URL giving up must not cancel its site's fetch
            with _ROBOTS_LOCK:
                _ROBOTS_CACHE[key] = rules
        stop = rules.verdict((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), self._token)
        if stop:
            raise _Stop(*stop)

    async def _fetch_robots(self, slots: "asyncio.Queue[httpx.AsyncClient]", origin: str) -> RobotsRules:
        """The site's robots.txt as rules: retried like a download, redirects followed (each hop guarded)."""
        source = f"{origin}/robots.txt"
        for attempt in range(self.settings.retries + 1):
            try:
                return await self._robots_attempt(slots, source)
            except (TimeoutError, httpx.TimeoutException):
                failure = (Reason.TIMEOUT, f"robots.txt {source} did not answer within {self.settings.timeout_s} s; "
                                           "not requested (RFC 9309: an unreachable robots.txt disallows all)")
            except httpx.HTTPError as exc:
                failure = (Reason.CONNECT_ERROR, f"robots.txt {source} unreachable ({type(exc).__name__}: {exc}); "
                                                 "not requested (RFC 9309: an unreachable robots.txt disallows all)")
            except _Stop as stop:
                return RobotsRules(source, blocked=(OPTED_OUT, f"robots.txt {source} could not be read "
                                                               f"({stop.status}: {stop.detail}); RFC 9309: disallow all"))
            if attempt < self.settings.retries:
                await asyncio.sleep(self.settings.backoff_s * 2 ** attempt)
        return RobotsRules(source, blocked=(failure[0], failure[1][:400]))

    async def _robots_attempt(self, slots: "asyncio.Queue[httpx.AsyncClient]", source: str) -> RobotsRules:
        current = source
        for _ in range(max(5, self.settings.max_redirects) + 1):  # RFC 9309 2.3.1.2: at least five hops
            addresses = await self._addresses(current)
            async with self._turn(slots, current) as client, asyncio.timeout(self.settings.timeout_s):
                response = await client.send(netguard.pinned(client, current, addresses[0]), stream=True)
                try:
                    status = response.status_code
                    if status in _REDIRECTS and response.headers.get("location"):
                        current = urllib.parse.urljoin(current, response.headers["location"])
                        continue
                    if status == 200:
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) >= ROBOTS_MAX_BYTES:
                                break
                        text = bytes(body[:ROBOTS_MAX_BYTES]).decode("utf-8", errors="replace")
                        return RobotsRules.parse(source, text, self._token)
                finally:
                    await response.aclose()
            if 400 <= status < 500 and status != 429:
                return RobotsRules(source)  # "unavailable": no rules, everything allowed
            return RobotsRules(source, blocked=(OPTED_OUT, f"robots.txt {source} answered HTTP {status}; "
                                                           "RFC 9309: the site is disallowed while it errors"))
        return RobotsRules(source, blocked=(OPTED_OUT, f"robots.txt {source}: too many redirects; RFC 9309: "
                                                       "disallow all"))

    async def _hop(self, client: httpx.AsyncClient, url: str, current: str) -> Fetched | str:
        """One request. Returns the result, or the next URL of a redirect."""
        addresses = await self._addresses(current)
        response, last_error = None, None
        for address in addresses:
            try:
                response = await client.send(netguard.pinned(client, current, address), stream=True)
                break
            except httpx.ConnectError as exc:
                last_error = exc
        if response is None:
            raise _Stop(Reason.CONNECT_ERROR, f"cannot connect to {current}: {last_error}")
        try:
            if response.status_code in (429, 503):
                self._pause(current, response)
            if response.status_code < 400:
                self._check_optout(response, current, url)
            if response.status_code in _REDIRECTS and response.headers.get("location"):
                return urllib.parse.urljoin(current, response.headers["location"])
            if response.status_code != 200:
                raise _Stop(f"http_{response.status_code}", f"HTTP {response.status_code} from {current}")
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (content_type.startswith("image/") or content_type in _BINARY_TYPES):
                raise _Stop(Reason.NOT_IMAGE, f"Content-Type {content_type}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.limits.max_bytes:
                raise _Stop(Reason.TOO_LARGE, f"Content-Length {length} > image.max_bytes={self.limits.max_bytes}")
            data = await self._read_body(response)
        finally:
            await response.aclose()
        p = probe(data, self.limits)
        if not p.ok:
            raise _Stop(p.reason, p.detail or "")
        return Fetched(url, OK, data=data, final_url=current, width=p.width, height=p.height, format=p.format,
                       content_type=content_type or None)

    def _check_optout(self, response: httpx.Response, current: str, url: str) -> None:
        """An opted_out stop when the response's headers reserve it; only headers are read, never the body."""
        s = self.settings
        hop = f" at {current}" if current != url else ""
        if response.status_code in _REDIRECTS:
            hop += f" (on its {response.status_code} redirect)"
        elif current != url:
            hop += " (reached by redirect)"
        if s.respect_noai:
            values = response.headers.get_list("x-robots-tag")
            hits = sorted(set(robots_tag_directives(values, self._agent)) & self._directives)
            if hits:
                raise _Stop(OPTED_OUT, f"X-Robots-Tag directive {', '.join(hits)}{hop}; "
                                       f"header: {' | '.join(values)}"[:400])
        if s.respect_tdm_reservation:
            values = [v.strip() for v in response.headers.get_list("tdm-reservation")]
            if "1" in values:
                policy = response.headers.get("tdm-policy")
                raise _Stop(OPTED_OUT, f"tdm-reservation: 1{hop}" + (f"; tdm-policy: {policy}" if policy else ""))

    async def _read_body(self, response: httpx.Response) -> bytes:
        buf = bytearray()
        header_checked = False
        async for chunk in response.aiter_bytes():
            buf += chunk
            if len(buf) > self.limits.max_bytes:
                raise _Stop(Reason.TOO_LARGE, f"body exceeds image.max_bytes={self.limits.max_bytes} (stopped reading)")
            if not header_checked and len(buf) >= PROBE_AT:
                header_checked = True
                p = probe(bytes(buf), self.limits)  # a partial file: only a pixel-count verdict is final
                if p.reason == Reason.TOO_LARGE:
                    raise _Stop(Reason.TOO_LARGE, f"{p.detail} (stopped reading)")
        return bytes(buf)

    def _decode(self, result: Fetched) -> None:
        """Decode once (truncated bodies fail here, not in detect); shrink huge images if configured."""
        max_side = self.settings.resize_max_side
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(result.data)) as im:
                    im.load()
                    if max_side and max(im.size) > max_side:
                        original = im.size
                        rgb = ImageOps.exif_transpose(im).convert("RGB")  # re-encoding drops EXIF
                        rgb.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
                        out = io.BytesIO()
                        rgb.save(out, format="JPEG", quality=self.settings.resize_quality)
                        result.data = out.getvalue()
                        result.resized_from = original
                        p = probe(result.data, self.limits)
                        result.width, result.height, result.format = p.width, p.height, p.format
        except Exception as exc:  # Pillow raises many types for corrupt data
            result.status, result.data, result.width, result.height = Reason.DECODE_ERROR, None, None, None
            result.detail = f"{type(exc).__name__}: {exc}"[:300]
