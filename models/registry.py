"""Model identities and per-process model caches.

A worker process loads each model once and keeps it for every task it runs;
the identity (name + weights hash) goes into stage keys and into every record.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from . import catalog
from .cache_key import SelectedBy
from .retinaface import RetinaFaceDetector
from .retinaface_torch import TorchRetinaFaceDetector, is_torch_checkpoint
from .weights import Weights, resolve

if TYPE_CHECKING:
    from facecap.config import Config

Detector = RetinaFaceDetector | TorchRetinaFaceDetector


def detector_weights(cfg: Config) -> Weights:
    """Resolve the configured detector's weights, or fail saying what to place where.

    The full profile's default (RetinaFace ResNet-50) comes from the pinned
    catalog entry: cached and verified in models.cache_dir, downloaded (URL,
    then mirror) when missing. detect.weights overrides it with any path or URL.
    """
    entry = catalog.default_detector_entry(cfg)
    if entry is not None:
        return catalog.ensure_weights(entry, cfg)
    return resolve(
        catalog.detector_weights_source(cfg),
        cache_dir=cfg.models.cache_dir,
        allow_download=cfg.allow_downloads,
        allow_addresses=cfg.models.allow_addresses,
        max_bytes=cfg.models.max_download_bytes,
        sha256=cfg.detect.weights_sha256,
        what=f"{catalog.detector_model(cfg)} weights",
    )


def detector_identity(cfg: Config, weights: Weights | None = None) -> str:
    weights = weights or detector_weights(cfg)
    return f"{catalog.detector_model(cfg)}@sha256:{weights.sha256[:16]}"


def make_detector(cfg: Config, weights: Weights, device: str = "cpu", threads: int | None = None) -> Detector:
    """The runner for these weights: torch for a .pth state dict, onnxruntime for an ONNX export."""
    identity = detector_identity(cfg, weights)
    if is_torch_checkpoint(weights.data, weights.origin):
        backbone = catalog.detector_model(cfg).removeprefix("retinaface-")
        return TorchRetinaFaceDetector(weights.path or weights.data, backbone, identity, device=device,
                                       threads=threads)
    return RetinaFaceDetector(weights.data, identity, device=device, threads=threads)


@functools.lru_cache(maxsize=4)
def _cached_detector(selected: SelectedBy, device: str, threads: int | None) -> Detector:
    cfg = selected.cfg
    detector = make_detector(cfg, detector_weights(cfg), device=device, threads=threads)
    detector.warm_up(cfg.detect.input_size, cfg.detect.batch_size)
    return detector


def load_detector(cfg: Config, threads: int | None = None) -> Detector:
    """The process-wide detector for this config (loaded on first use), keyed by the settings that choose it."""
    selected = SelectedBy(cfg, (cfg.profile, cfg.detect.model_dump_json(), cfg.models.model_dump_json()))
    return _cached_detector(selected, cfg.detect.device, threads or cfg.detect.threads)
