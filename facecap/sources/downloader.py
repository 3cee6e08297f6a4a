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
Nothing here knows Prefect or Dask.
"""

from __future__ import annotations

import asyncio
import io
import ssl
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
OPTED_OUT = "opted_out"
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


def _buffered(pending: "deque[asyncio.Task]") -> int:
    """Bytes of finished downloads waiting behind a slower one (they are yielded in input order)."""
    return sum(len(t.result().data or b"") for t in pending if t.done() and not t.cancelled()
               and t.exception() is None)


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
            window = max(4 * self.settings.connections, 16)
            source = iter(urls)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window and _buffered(pending) < BUFFER_BYTES:
                    url = next(source, _END)
                    if url is _END:
                        exhausted = True
                        break
                    pending.append(loop.create_task(self.fetch(slots, url)))
                if not pending:
                    break
                head = pending[0]
                # Runs every task in the window until the oldest one is done.
                loop.run_until_complete(asyncio.wait({head}))
                pending.popleft()
                yield head.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
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
            headers={"User-Agent": s.user_agent, "Accept": "image/*,*/*;q=0.5"},
        )

    # -- one URL ----------------------------------------------------------------
    async def fetch(self, slots: "asyncio.Queue[httpx.AsyncClient]", url: str) -> Fetched:
        """Fetch one URL, retrying transient failures with exponential backoff."""
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            client = await slots.get()
            try:
                result = await self._attempt(client, url)
            finally:
                slots.put_nowait(client)
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

    async def _attempt(self, client: httpx.AsyncClient, url: str) -> Fetched:
        current, seen = url, {url}
        try:
            for _ in range(self.settings.max_redirects + 1):
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
            hits = sorted(set(robots_tag_directives(values, s.user_agent)) & self._directives)
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
