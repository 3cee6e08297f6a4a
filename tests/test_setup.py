"""scripts/install_torch.sh, the torch step of scripts/setup.sh, on a fresh virtual environment.

PyTorch's index cannot be reached from here, so a PEP 503 index on 127.0.0.1 stands in for it
(a test double at that boundary), serving a stand-in torch wheel of the pinned version: a
package named torch with nothing in it, enough to prove which index the script asked and
what pip installed. pip's configuration files are ignored, so no local wheel or mirror helps.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = re.search(r"^torch==([^+\s]+)\+(\w+)", (ROOT / "requirements.lock").read_text(), re.M)


def stand_in_wheel(folder: Path, version: str) -> Path:
    """A valid wheel of a package named torch, `version`, holding one empty module."""
    dist = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": b"",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: facecap-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in {**files, f"{dist}/RECORD": record.encode()}.items():
            whl.writestr(name, data)
    return path


class Index:
    """A PEP 503 simple index on 127.0.0.1 serving the given wheels; counts the requests."""

    def __init__(self, wheels: list[Path]):
        self.requests: list[str] = []
        files = {w.name: w.read_bytes() for w in wheels}
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 (http.server naming)
                path = urllib.parse.unquote(self.path)
                index.requests.append(path)
                if path.rstrip("/") == "/simple/torch":
                    body = "".join(f'<a href="/files/{name}">{name}</a>\n' for name in files).encode()
                    ctype = "text/html"
                elif path.startswith("/files/") and path[7:] in files:
                    body, ctype = files[path[7:]], "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def install_torch(python: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "FACECAP_TORCH"))}
    clean.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh"), str(python)], env=clean,
                          capture_output=True, text=True, timeout=300)


def installed_torch(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.e2e
def test_the_pinned_cpu_build_comes_from_pytorchs_index_then_is_kept(venv, tmp_path):
    version, build = PINNED.group(1), PINNED.group(2)
    index = Index([stand_in_wheel(tmp_path, f"{version}+{build}"), stand_in_wheel(tmp_path, version)])
    try:
        first = install_torch(venv, FACECAP_TORCH_INDEX=index.url)
        assert first.returncode == 0, first.stderr
        assert f"installing torch {version}+{build}" in first.stdout
        assert installed_torch(venv) == f"{version}+{build}"  # the local-version build, not the PyPI-named one
        assert any(r.rstrip("/") == "/simple/torch" for r in index.requests)

        asked = len(index.requests)
        again = install_torch(venv, FACECAP_TORCH_INDEX=index.url)
        assert again.returncode == 0 and "already installed" in again.stdout
        assert len(index.requests) == asked, "an installed torch must not send setup to the network"
    finally:
        index.close()


@pytest.mark.e2e
def test_an_unreachable_index_fails_in_seconds_with_what_to_do(venv):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        done = install_torch(venv, FACECAP_TORCH="cu999", FACECAP_TORCH_INDEX=f"http://127.0.0.1:{port}/simple")
        took = time.monotonic() - started
    assert done.returncode == 1
    assert f"http://127.0.0.1:{port}/simple" in done.stderr and "FACECAP_TORCH=keep" in done.stderr
    assert took < 60, f"an unreachable index cost {took:.0f} s"


@pytest.mark.e2e
def test_keep_refuses_an_environment_without_the_pinned_torch(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    done = install_torch(tmp_path / "bare" / "bin" / "python", FACECAP_TORCH="keep")
    assert done.returncode == 1 and "FACECAP_TORCH=keep" in done.stderr and "none" in done.stderr
