"""A real HTTP server on 127.0.0.1 serving what the web serves image downloaders.

Used by the download tests and bench/bench_download.py. Paths:

  /img/<name>              a real image (see `images`), image/jpeg or image/png
  /slow/<seconds>/<name>   the image after a delay (timeouts; the bench's fixed latency)
  /flaky/<n>/<name>        503 for the first n requests of this path, then the image
  /status/<code>           that HTTP status
  /redirect/<n>/<name>     a chain of n redirects ending at /img/<name>
  /loop                    redirects to itself via /loop2
  /to/<url-quoted>         a 302 to any location (blocked addresses, file://)
  /html/<name>             the image's bytes served as text/html
  /noai/<name>             the image with X-Robots-Tag: noai
  /xrt/<quoted>/<name>     the image with one X-Robots-Tag header per "|"-separated part of <quoted>
  /tdm/<name>              the image with tdm-reservation: 1
  /noai-huge               X-Robots-Tag: noimageai on a 10 GB Content-Length, 1000 bytes sent
  /noai-hop/<name>         a 302 carrying X-Robots-Tag: noai, to /img/<name>
  /robots.txt              `robots` (None: 404), with HTTP status `robots_status`
  anything else under `delay` / `throttle_every`: every request waits `delay` s; every
                           throttle_every-th answers 429 with Retry-After: `retry_after`
  /big                     an oversized body without Content-Length
  /big-announced           Content-Length above any test limit (body never needed)
  /truncated               a JPEG cut in half
  /bomb                    a PNG whose header claims 100000 x 100000 pixels

Every request is counted per path (`requests`), timed per arrival (`arrivals`: (time, path)),
and the most requests it ever held at once is `max_in_flight`. A request is held from its arrival until
its answer starts: a client cannot have finished one before then, so two that overlap in that span were
both outstanding at the client. (Counting until the handler returns would also count the moment after the
client has its answer and sends its next request on another connection: a false overlap on a busy machine.)
"""

from __future__ import annotations

import http.server
import io
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from facecap.example_data import astronaut, bomb_png


def astronaut_jpeg() -> bytes:
    buf = io.BytesIO()
    astronaut().save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generated_png(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class FixtureServer:
    images: dict[str, bytes]
    big_size: int = 512 * 1024
    base: str = ""
    requests: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    robots: str | None = None
    robots_status: int = 200
    robots_delay: float = 0.0
    delay: float = 0.0
    throttle_every: int = 0
    retry_after: str = "1"
    arrivals: list = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    throttled: list = field(default_factory=list)  # times 429s were sent

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests[path]


def _handler(srv: FixtureServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        # Headers and body go out in separate writes: with Nagle's algorithm on, the body waits for
        # the client's delayed ACK (~40 ms per response), which the benchmark would blame on the client.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None,
                  length: bool = True) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _image(self, name: str, **kw) -> None:
            data = srv.images.get(name)
            if data is None:
                self._send(404, b"not found", "text/plain")
                return
            ctype = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            self._send(200, data, kw.pop("ctype", ctype), **kw)

        def _redirect(self, location: str) -> None:
            self._send(302, b"", "text/plain", {"Location": location})

        def do_GET(self):  # noqa: N802 (http.server naming)
            with srv.lock:
                srv.in_flight += 1
                srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            self._held = True
            try:
                self._get()
            finally:
                self._release()

        def _release(self) -> None:
            if getattr(self, "_held", False):
                self._held = False
                with srv.lock:
                    srv.in_flight -= 1

        def send_response(self, code, message=None):
            self._release()  # the answer starts: from here the client may finish this request
            super().send_response(code, message)

        def _get(self):
            path = self.path
            with srv.lock:
                srv.requests[path] += 1
                seen = srv.requests[path]
                srv.arrivals.append((time.monotonic(), path))
                total = len(srv.arrivals)
            if path == "/robots.txt":
                time.sleep(srv.robots_delay)
                if srv.robots is None:
                    self._send(404, b"not found", "text/plain")
                else:
                    self._send(srv.robots_status, srv.robots.encode(), "text/plain")
                return
            if srv.delay:
                time.sleep(srv.delay)
            if srv.throttle_every and total % srv.throttle_every == 0:
                with srv.lock:
                    srv.throttled.append(time.monotonic())
                self._send(429, b"slow down", "text/plain", {"Retry-After": srv.retry_after})
                return
            parts = urllib.parse.urlsplit(path).path.strip("/").split("/")  # ?n=1 makes distinct URLs
            head = parts[0]
            if head == "img":
                self._image(parts[1])
            elif head == "slow":
                time.sleep(float(parts[1]))
                self._image(parts[2])
            elif head == "flaky":
                if seen <= int(parts[1]):
                    self._send(503, b"busy", "text/plain")
                else:
                    self._image(parts[2])
            elif head == "status":
                self._send(int(parts[1]), b"status", "text/plain")
            elif head == "redirect":
                left = int(parts[1])
                self._redirect(f"/redirect/{left - 1}/{parts[2]}" if left > 1 else f"/img/{parts[2]}")
            elif head == "loop":
                self._redirect("/loop2")
            elif head == "loop2":
                self._redirect("/loop")
            elif head == "to":
                self._redirect(urllib.parse.unquote(parts[1]))
            elif head == "html":
                self._image(parts[1], ctype="text/html; charset=utf-8")
            elif head == "noai":
                self._image(parts[1], headers={"X-Robots-Tag": "noai, noimageai"})
            elif head == "xrt":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                for value in urllib.parse.unquote(parts[1]).split("|"):
                    self.send_header("X-Robots-Tag", value)
                data = srv.images[parts[2]]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif head == "tdm":
                self._image(parts[1], headers={"tdm-reservation": "1", "tdm-policy": "https://example.org/policy.json"})
            elif head == "noai-hop":
                self._send(302, b"", "text/plain", {"Location": f"/img/{parts[1]}", "X-Robots-Tag": "noai"})
            elif head == "big":
                self._send(200, b"\xff\xd8\xff" + b"\x00" * srv.big_size, length=False)
            elif head == "noai-huge":  # opted out by header: the 10 GB body must never be waited for
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("X-Robots-Tag", "noimageai")
                self.send_header("Content-Length", str(10 * 2**30))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(srv.images["astronaut.jpg"][:1000])
                self.close_connection = True
            elif head == "big-announced":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10 * 2**30))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
            elif head == "truncated":
                data = srv.images["astronaut.jpg"]
                self._send(200, data[: len(data) // 2])
            elif head == "bomb":
                self._send(200, bomb_png(100_000, 100_000), "image/png")
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


class ServerThread:
    """Start/stop a FixtureServer on an ephemeral 127.0.0.1 port (context manager)."""

    def __init__(self, images: dict[str, bytes], host: str = "127.0.0.1", **kw):
        self.state = FixtureServer(images=images, **kw)
        self.httpd = http.server.ThreadingHTTPServer((host, 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        self.state.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FixtureServer:
        self.thread.start()
        return self.state

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def default_images() -> dict[str, bytes]:
    images = {"astronaut.jpg": astronaut_jpeg()}
    for i in range(4):
        images[f"gen{i}.png"] = generated_png(i)
    return images


if __name__ == "__main__":  # python tests/http_fixture_server.py [HOSTS]: serve until Ctrl-C (for trying the CLI)
    # HOSTS > 1: one server per loopback address 127.0.0.1, 127.0.0.2, ... (a list spread over many sites)
    import contextlib

    hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    with contextlib.ExitStack() as stack:
        images = default_images()
        bases = [stack.enter_context(ServerThread(images, host=f"127.0.0.{i + 1}")).base for i in range(hosts)]
        print(f"serving on {' '.join(bases)}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
