"""Attribute models: 40 CelebA attribute probabilities per face crop, behind one small interface.

Three backends, chosen with ``attributes.backend``:

- ``farl`` (the ``full`` profile's default): facer's FaRL ViT-B/16 CelebA-40
  classifier (``models/farl.py``), one ``.pt`` file: ``attributes.model``, else
  ``models.cache_dir/face_attribute.farl.celeba.pt`` (``facecap models fetch``
  puts it there). It scores (source image, 5 landmarks) pairs, aligned its own
  way, not the margin crop; its probabilities are facer's sigmoid outputs.
- ``classifier``: a transformers image classifier (ViT, ConvNeXt, ...) with a
  40-way multi-label head whose ``id2label`` names the CelebA attributes, e.g.
  the directory ``facecap train-attributes`` writes.
- ``zero-shot``: a CLIP-style dual encoder (``get_image_features`` /
  ``get_text_features``) scoring each attribute with a positive and a negative
  prompt (``facecap/data/attribute_prompts.json``, or ``attribute_prompts.json``
  inside the model directory).

Both give a raw logit per attribute, turned into a probability by the model's
calibration (``attribute_calibration.json`` next to the weights: per attribute
``p = sigmoid(scale * logit + bias)``, fitted on held-out data); without one,
the identity (classifier) or CLIP's own temperature (zero-shot) is used. A
zero-shot model without one is planned as ``calibration: uncalibrated``, and the
release's card and report say so: its scores are not probabilities.

No real attribute weights are shipped or tested with FaceCap: the build machines
reach no model hub. A user gets them by training on CelebA (``facecap
train-attributes``) or with a CLIP checkpoint (the ``full`` profile fetches
``openai/clip-vit-base-patch16`` from the Hugging Face hub on first use). Tests
run tiny randomly initialised models of both real architectures, whose outputs
mean nothing.

Only safetensors weights are loaded (``use_safetensors=True``): pickled
``.bin`` checkpoints are never unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError

if TYPE_CHECKING:
    from facecap.config import Config

from .cache_key import SelectedBy
from .weights import WeightsError, file_sha256

DEFAULT_ZERO_SHOT_MODEL = "openai/clip-vit-base-patch16"
CALIBRATION_FILE = "attribute_calibration.json"
CALIBRATION_FORMAT = "facecap.attribute_calibration/1"
PROMPTS_FILE = "attribute_prompts.json"
# What a hub snapshot needs; pickled formats (*.bin, *.pt, *.ckpt) are never fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# Files whose bytes decide the model's outputs, hashed into its identity.
_IDENTITY_SUFFIXES = (".safetensors",)
_IDENTITY_NAMES = ("config.json", CALIBRATION_FILE, PROMPTS_FILE)


class AttributeModel(Protocol):
    """What the annotate stage needs from a backend."""

    identity: str  # backend:name@sha256:<prefix>; part of stage keys and of every record

    def predict(self, images: Sequence) -> np.ndarray:
        """RGB PIL images (or HxWx3 uint8 arrays) -> float32 probabilities, shape (n, 40), CelebA order.

        farl takes (source RGB array, 5 landmarks) pairs instead and aligns each face itself.
        """
        ...


@dataclass(frozen=True)
class ModelLocation:
    backend: str
    ref: str  # what the user named: a local directory or a hub id
    path: Path  # the local directory holding the files (a hub snapshot for hub ids)


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref


def is_local_model(ref: str | None) -> bool:
    return bool(ref) and Path(ref).expanduser().is_dir()


def configured_model(cfg: Config) -> str | None:
    """The model reference the run uses: attributes.model, else the profile's default (None: none)."""
    if cfg.attributes.model:
        return cfg.attributes.model
    if cfg.profile == "full" and cfg.attributes.backend == "zero-shot":
        return DEFAULT_ZERO_SHOT_MODEL
    if cfg.profile == "full" and cfg.attributes.backend == "farl":
        return str(farl_default_path(cfg))
    return None


def has_local_model(cfg: Config) -> bool:
    """Whether the configured model is on this machine (what turns annotate on in the offline profile)."""
    ref = configured_model(cfg)
    if cfg.attributes.backend == "farl":
        return bool(ref) and Path(ref).expanduser().is_file()
    return is_local_model(ref)


# --- farl: one .pt file ---------------------------------------------------------
def farl_default_path(cfg: Config) -> Path:
    from .farl import FARL_CELEBA_FILE

    return Path(cfg.models.cache_dir).expanduser() / FARL_CELEBA_FILE


def farl_weights_path(cfg: Config) -> Path:
    """The FaRL weights file the run uses; fails before any work, saying what to place where."""
    from .farl import FARL_CELEBA_URL

    ref = configured_model(cfg)
    if ref is None:
        raise ConfigError(
            "attributes.backend=farl in the offline profile needs attributes.model: the local path of facer's "
            f"FaRL CelebA-40 weights ({FARL_CELEBA_URL})")
    path = Path(ref).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"attributes.model={ref!r} is a directory, but attributes.backend=farl loads one .pt file (facer's "
            "face_attribute.farl.celeba.pt). For a model directory set attributes.backend=classifier or zero-shot.")
    if not path.is_file():
        given = "attributes.model" if cfg.attributes.model else "models.cache_dir"
        raise WeightsError(
            f"FaRL attribute weights (attributes.backend=farl) not found at {path} (from {given}). On a connected "
            f"host run `facecap models fetch --profile full` (or download {FARL_CELEBA_URL}) and place the file at "
            f"{path}, or set attributes.model to where it lies; or run with --profile offline (attributes are then "
            "not annotated).")
    return path.resolve()


def _farl_checked_identity(path: Path, pinned: str | None) -> str:
    """farl:<name>@sha256:<16 hex>; a file that differs from attributes.weights_sha256 is refused."""
    from .farl import _cached_sha256, farl_identity  # one hash per file version, shared with the loader

    if pinned:
        st = path.stat()
        actual = _cached_sha256(str(path), st.st_size, st.st_mtime_ns)
        if actual != pinned.strip().lower():
            raise WeightsError(
                f"FaRL weights {path} have sha256 {actual}, but attributes.weights_sha256 pins {pinned.strip()}: "
                "the file is not the one pinned (a different or damaged download). Fetch it again with "
                "`facecap models fetch --profile full`, or update attributes.weights_sha256 if this file is "
                "the one you mean to use.")
    return farl_identity(path)


def farl_model_identity(cfg: Config) -> str:
    return _farl_checked_identity(farl_weights_path(cfg), cfg.attributes.weights_sha256)


def locate_model(cfg: Config) -> ModelLocation:
    """Find the configured attribute model's files locally, fetching a hub id in the full profile.

    Fails with a WeightsError that says what to place where.
    """
    backend = cfg.attributes.backend
    if backend == "farl":
        raise ConfigError(
            "attributes.backend=farl loads one .pt file, not a model directory (use farl_weights_path); "
            "calibration and directory models need attributes.backend=zero-shot or classifier")
    ref = configured_model(cfg)
    if ref is None:
        if backend == "classifier":
            raise ConfigError(
                "attributes.backend=classifier needs attributes.model: a directory written by "
                "`facecap train-attributes` (or any transformers image classifier whose id2label names the 40 "
                "CelebA attributes). Or use attributes.backend=zero-shot, or --profile offline to run without "
                "attributes.")
        raise ConfigError("no attribute model configured: set attributes.model to a local directory")
    local = Path(ref).expanduser()
    if local.is_dir():
        return ModelLocation(backend, ref, local.resolve())
    if _looks_like_path(ref) or local.exists():
        raise WeightsError(
            f"attributes.model={ref!r} is not a directory. Point it at a directory holding config.json and "
            "*.safetensors (what save_pretrained writes, or what `facecap train-attributes` writes to OUT/model).")
    if not cfg.allow_downloads:
        raise WeightsError(
            f"attributes.model={ref!r} looks like a hub id, but the '{cfg.profile}' profile downloads nothing. "
            f"Download it elsewhere (`huggingface-cli download {ref} --local-dir DIR`), copy DIR here and set "
            "attributes.model=DIR, or use --profile full.")
    return ModelLocation(backend, ref, _hub_snapshot(ref, cfg))


def _hub_snapshot(repo_id: str, cfg: Config) -> Path:
    """Download (once; later runs use the cache) the model's safetensors, configs and tokenizer files."""
    from huggingface_hub import snapshot_download

    cache = Path(cfg.models.cache_dir) / "huggingface"
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=HUB_FILES))
    except Exception as exc:  # network, auth, missing repo: all mean "the model cannot be had from here"
        raise WeightsError(
            f"The attribute model {repo_id!r} ({cfg.attributes.backend} backend) could not be fetched from the "
            f"Hugging Face hub into {cache}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            f"Download it on a machine with access (`huggingface-cli download {repo_id} --local-dir DIR`), copy "
            "DIR here and set attributes.model=DIR (--set attributes.model=DIR), or run with --profile offline "
            "(attributes are then not annotated).") from exc


@functools.lru_cache(maxsize=16)
def _dir_digest(path: str, stamp: tuple) -> str:
    files = sorted(p for p in Path(path).iterdir()
                   if p.is_file() and (p.suffix in _IDENTITY_SUFFIXES or p.name in _IDENTITY_NAMES))
    if not any(p.suffix == ".safetensors" for p in files):
        raise WeightsError(
            f"{path} holds no *.safetensors weights. Save the model with save_pretrained(safe_serialization=True); "
            "pickled .bin checkpoints are not loaded.")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def model_identity(location: ModelLocation) -> str:
    """backend:name@sha256:<16 hex> over the weights, config, calibration and prompts that decide the outputs."""
    path = location.path
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    digest = _dir_digest(str(path), stamp)
    if location.backend == "zero-shot" and not (path / PROMPTS_FILE).is_file():
        # The built-in prompts decide zero-shot outputs too.
        digest = hashlib.sha256((digest + _builtin_prompts_text()).encode()).hexdigest()
    name = location.ref if not is_local_model(location.ref) else path.name
    return f"{location.backend}:{name}@sha256:{digest[:16]}"


# --- calibration -------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Per attribute, p = sigmoid(scale * logit + bias). Stored as JSON next to the weights."""

    scale: np.ndarray  # (40,)
    bias: np.ndarray  # (40,)
    source: str = "identity"

    @classmethod
    def identity(cls, scale: float = 1.0) -> "Calibration":
        return cls(np.full(40, scale, np.float32), np.zeros(40, np.float32), "identity" if scale == 1 else "temperature")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = logits * self.scale + self.bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def to_json(self, **extra) -> dict:
        return {"format": CALIBRATION_FORMAT, "attributes": list(ATTRIBUTES), "scale": [float(x) for x in self.scale],
                "bias": [float(x) for x in self.bias], **extra}


def load_calibration(path: Path, default: Calibration) -> Calibration:
    file = path / CALIBRATION_FILE
    if not file.is_file():
        return default
    try:
        data = json.loads(file.read_text())
        if data.get("format") != CALIBRATION_FORMAT or list(data["attributes"]) != list(ATTRIBUTES):
            raise ValueError(f"format must be {CALIBRATION_FORMAT} with the 40 CelebA attributes in order")
        scale, bias = np.asarray(data["scale"], np.float32), np.asarray(data["bias"], np.float32)
        if scale.shape != (40,) or bias.shape != (40,) or not (np.isfinite(scale).all() and np.isfinite(bias).all()):
            raise ValueError("scale and bias must be 40 finite numbers each")
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{file} is not a valid attribute calibration: {exc}") from exc
    return Calibration(scale, bias, str(file))


# --- prompts -------------------------------------------------------------------
def _builtin_prompts_text() -> str:
    return resources.files("facecap.data").joinpath(PROMPTS_FILE).read_text()


def load_prompts(path: Path | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Positive and negative prompts per attribute: the model directory's file, else the built-in one."""
    file = path / PROMPTS_FILE if path is not None else None
    text = file.read_text() if file is not None and file.is_file() else _builtin_prompts_text()
    where = str(file) if file is not None and file.is_file() else f"facecap/data/{PROMPTS_FILE}"
    data = json.loads(text)["attributes"]
    missing = [a for a in ATTRIBUTES if a not in data]
    if missing:
        raise WeightsError(f"{where} lacks prompts for {', '.join(missing)}")
    out = {}
    for name in ATTRIBUTES:
        pos, neg = data[name]["positive"], data[name]["negative"]
        pos, neg = ([pos] if isinstance(pos, str) else list(pos)), ([neg] if isinstance(neg, str) else list(neg))
        if not pos or not neg:
            raise WeightsError(f"{where}: {name} needs at least one positive and one negative prompt")
        out[name] = (pos, neg)
    return out


# --- backends ------------------------------------------------------------------
def _torch_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("attributes.device=cuda, but torch sees no CUDA device on this worker "
                          "(install a CUDA build of torch, or set attributes.device=cpu)")
    return torch.device(device)


def _as_pil(images: Sequence):
    from PIL import Image

    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]


def _features(output):
    """transformers 5 returns model outputs from get_*_features; older versions return the tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class ClassifierAttributeModel:
    """An image classifier with a 40-way sigmoid head (``problem_type=multi_label_classification``)."""

    def __init__(self, location: ModelLocation, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        _quiet_transformers()
        self.identity = model_identity(location)
        self.device = _torch_device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(location.path))
            self.model = AutoModelForImageClassification.from_pretrained(str(location.path), use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"cannot load an image classifier from {location.path}: {exc}") from exc
        labels = {int(k): v for k, v in self.model.config.id2label.items()}
        missing = [a for a in ATTRIBUTES if a not in labels.values()]
        if missing:
            raise WeightsError(
                f"{location.path}: the classifier's id2label does not name the CelebA attributes "
                f"(missing {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); train one with "
                "`facecap train-attributes`, or use attributes.backend=zero-shot for a CLIP model.")
        by_name = {v: k for k, v in labels.items()}
        self.columns = torch.tensor([by_name[a] for a in ATTRIBUTES])
        self.calibration = load_calibration(location.path, Calibration.identity())
        self.model.to(self.device).eval()

    def logits(self, images: Sequence) -> np.ndarray:
        import torch

        pixels = self.processor(images=_as_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels).logits
        return out[:, self.columns.to(out.device)].float().cpu().numpy()

    def predict(self, images: Sequence) -> np.ndarray:
        return self.calibration.apply(self.logits(images))


class ZeroShotAttributeModel:
    """A CLIP-style model: logit = temperature * (cos(image, positive) - cos(image, negative))."""

    def __init__(self, location: ModelLocation, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoProcessor

        _quiet_transformers()
        self.identity = model_identity(location)
        self.device = _torch_device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(str(location.path))
            self.model = AutoModel.from_pretrained(str(location.path), use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"cannot load a CLIP-style model and processor from {location.path}: {exc}") from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise WeightsError(f"{location.path} is a {type(self.model).__name__}, not a CLIP-style image-text model; "
                               "use attributes.backend=classifier for image classifiers")
        self.model.to(self.device).eval()
        prompts = load_prompts(location.path)
        positive = self._text_embeddings([prompts[a][0] for a in ATTRIBUTES])
        negative = self._text_embeddings([prompts[a][1] for a in ATTRIBUTES])
        self.direction = positive - negative  # (40, d): one dot product per attribute gives the pair's margin
        logit_scale = getattr(self.model, "logit_scale", None)
        temperature = float(logit_scale.detach().exp()) if logit_scale is not None else 100.0
        # Without a fitted calibration a prompt pair is CLIP's own two-way softmax.
        self.calibration = load_calibration(location.path, Calibration.identity(temperature))

    def _text_embeddings(self, groups: list[list[str]]):
        import torch

        texts = [t for group in groups for t in group]
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        out, start = [], 0
        for group in groups:  # an attribute with several prompts uses their mean direction
            out.append(torch.nn.functional.normalize(emb[start:start + len(group)].mean(0), dim=-1))
            start += len(group)
        return torch.stack(out)

    def logits(self, images: Sequence) -> np.ndarray:
        import torch

        pixels = self.processor.image_processor(images=_as_pil(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            emb = _features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            margins = emb @ self.direction.T
        return margins.cpu().numpy()

    def predict(self, images: Sequence) -> np.ndarray:
        return self.calibration.apply(self.logits(images))


BACKENDS = {"classifier": ClassifierAttributeModel, "zero-shot": ZeroShotAttributeModel}


def check_model_config(location: ModelLocation) -> None:
    """Fail before any work when the directory's config.json does not fit the backend (no weights are loaded)."""
    file = location.path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{file} is missing or not JSON: the model directory needs the config.json that "
                           "save_pretrained writes") from exc
    kind = config.get("model_type", "?")
    if location.backend == "zero-shot" and not ("text_config" in config and "vision_config" in config):
        raise ConfigError(f"attributes.model={location.ref} is a {kind} model, not a CLIP-style image-text model; "
                          "for an image classifier (e.g. from train-attributes) set attributes.backend=classifier")
    if location.backend == "classifier":
        names = set((config.get("id2label") or {}).values())
        missing = [a for a in ATTRIBUTES if a not in names]
        if missing:
            hint = ("; it looks like a CLIP-style model: set attributes.backend=zero-shot"
                    if "text_config" in config else "; train one with `facecap train-attributes`")
            raise ConfigError(f"attributes.model={location.ref} ({kind}): its id2label does not name the 40 CelebA "
                              f"attributes (missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})"
                              + hint)


def attribute_identity(cfg: Config) -> str:
    """The identity of the configured model (fetching a hub id in the full profile); errors say what to do."""
    return plan_attribute_model(cfg)[0]


UNCALIBRATED = "uncalibrated"


def plan_attribute_model(cfg: Config) -> tuple[str, str]:
    """(identity, calibration) of the configured model, resolved before any work; errors say what to do.

    calibration: "fitted" (an attribute_calibration.json next to the weights),
    "uncalibrated" (zero-shot without one: CLIP's own two-way softmax, whose
    near-0/1 scores are not probabilities), or "sigmoid" (a classifier's own
    outputs, farl's included).
    """
    if cfg.attributes.backend == "farl":
        return farl_model_identity(cfg), "sigmoid"
    location = locate_model(cfg)
    check_model_config(location)
    identity = model_identity(location)
    fitted = load_calibration(location.path, None) is not None  # an invalid file fails here, before any work
    if fitted:
        return identity, "fitted"
    return identity, UNCALIBRATED if location.backend == "zero-shot" else "sigmoid"


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=4)
def _cached_model(selected: SelectedBy, threads: int | None) -> AttributeModel:
    cfg = selected.cfg
    a = cfg.attributes
    _set_threads(threads)
    if a.backend == "farl":
        from .farl import FarlAttributes

        return FarlAttributes(farl_weights_path(cfg), a.device, a.batch_size)
    return BACKENDS[a.backend](locate_model(cfg), a.device)


def load_attribute_model(cfg: Config, threads: int | None = None, expect: str | None = None) -> AttributeModel:
    """The process-wide attribute model for this config (loaded once per worker process).

    Keyed by what selects the model only, so a threshold change reuses the loaded model.
    With `expect` (the identity the run planned), a cached model whose files have
    changed since it was loaded (e.g. a new calibration) is loaded again.
    """
    a = cfg.attributes
    key = (cfg.profile, a.backend, a.model, a.device, cfg.models.model_dump_json())
    if a.backend == "farl":
        # The pin is checked on every worker too; the hash is cached per file version.
        _farl_checked_identity(farl_weights_path(cfg), a.weights_sha256)
        key += (a.batch_size,)
    model = _cached_model(SelectedBy(cfg, key), threads)
    if expect is not None and model.identity != expect:
        _cached_model.cache_clear()
        model = _cached_model(SelectedBy(cfg, key), threads)
    return model
