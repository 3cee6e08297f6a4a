"""Detect: find faces, level and crop them, keep the confident, large ones.

One source image can yield several face records. Faces are indexed by
detector score among all candidates (score > detect.candidate_score), so a
face keeps its sample_id when only the keep thresholds change. Every
candidate that is not kept, and every image without one, is a reject row.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import numpy as np
import pyarrow as pa

from facecap.config import DetectSettings, ImageLimits
from facecap.schema import FACE_SCHEMA, Reason, sample_id_for
from facecap.stages.align import aligned_crop, crop_side, real_extent
from facecap.records import SOURCE_IMAGE, SOURCE_PROBLEM
from facecap.stages.base import Chunk, Counters, Stage, StagePlan, rejected
from facecap.sources.images import decode_rgb, encode_jpeg, letterbox


class FaceDetector(Protocol):
    identity: str

    def detect(self, canvases: np.ndarray, min_score: float, nms_iou: float) -> list[list]: ...


def _to_source(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return values / np.tile(scale, values.shape[-1] // 2)


def _face_rows(image: dict, rgb: np.ndarray, detections: list, scale: np.ndarray, settings: DetectSettings,
               detector_id: str, kept: list[dict], rejects: list[dict], counters: Counters) -> None:
    h, w = rgb.shape[:2]
    base_reject = {"stage": "detect", "image_id": image["image_id"], "source": image["source"],
                   "source_offset": image["source_offset"]}
    if not detections:
        rejects.append({**base_reject, "reason": Reason.NO_FACE,
                        "detail": f"no detection above candidate_score={settings.candidate_score}"})
        return
    counters.extra["faces_found"] += len(detections)
    for index, det in enumerate(detections):
        box = _to_source(det.box.astype(np.float64), scale)
        box = np.clip(box, 0, [w, h, w, h])
        points = _to_source(det.landmarks.reshape(-1).astype(np.float64), scale).reshape(5, 2)
        sample_id = sample_id_for(image["image_id"], index)
        side = crop_side(box, settings.crop_margin)
        real_w, real_h = real_extent(box, settings.crop_margin, w, h)
        reason = None
        if det.score <= settings.min_score:
            reason, detail = Reason.LOW_SCORE, f"score {det.score:.4f} <= detect.min_score={settings.min_score}"
        elif min(real_w, real_h) < settings.min_face_px:
            # Only real source pixels count: padding past the image edge never makes a face pass.
            reason, detail = Reason.TOO_SMALL, (
                f"crop region holds {real_w:.0f}x{real_h:.0f} source px (side {side:.1f}px incl. padding) "
                f"< detect.min_face_px={settings.min_face_px}")
        if reason:
            rejects.append({**base_reject, "reason": reason, "detail": detail, "sample_id": sample_id,
                            "det_score": det.score, "bbox": box.tolist()})
            continue
        crop = aligned_crop(rgb, box, points, settings.crop_margin)
        kept.append({
            "sample_id": sample_id, "image_id": image["image_id"], "face_index": index,
            "image": encode_jpeg(crop.pixels, settings.jpeg_quality),
            "width": crop.side, "height": crop.side, "det_score": det.score,
            "bbox": box.tolist(), "landmarks": points.reshape(-1).tolist(), "crop_box": list(crop.crop_box),
            "align_angle": crop.angle, "pad_fraction": crop.pad_fraction, "detector": detector_id, "det_min_score": settings.min_score,
            "min_face_px": settings.min_face_px, "crop_margin": settings.crop_margin,
        })


def detect_faces(batches: Iterable[pa.RecordBatch | pa.Table], detector: FaceDetector, settings: DetectSettings,
                 limits: ImageLimits, counters: Counters) -> Iterator[Chunk]:
    """Image records in, face records and rejects out, `settings.batch_size` images per network call."""
    for table in batches:
        rows = table.to_pylist()
        for start in range(0, len(rows), settings.batch_size):
            group = rows[start : start + settings.batch_size]
            counters.rows_in += len(group)
            kept: list[dict] = []
            rejects: list[dict] = []
            decoded = []
            for image in group:
                if image.get(SOURCE_PROBLEM):
                    rgb, reason, detail = None, Reason.SOURCE_CHANGED, image[SOURCE_PROBLEM]
                else:
                    rgb, p = decode_rgb(image[SOURCE_IMAGE], limits)
                    reason, detail = p.reason, p.detail
                if rgb is None:
                    rejects.append({"stage": "detect", "image_id": image["image_id"], "source": image["source"],
                                    "source_offset": image["source_offset"], "reason": reason, "detail": detail})
                else:
                    decoded.append((image, rgb))
            if decoded:
                size = settings.input_size
                canvases = np.empty((len(decoded), size, size, 3), dtype=np.uint8)
                scales = [letterbox(rgb, size, canvases[i])[1] for i, (_, rgb) in enumerate(decoded)]
                results = detector.detect(canvases, settings.candidate_score, settings.nms_iou)
                for (image, rgb), detections, scale in zip(decoded, results, scales):
                    _face_rows(image, rgb, detections, scale, settings, detector.identity, kept, rejects, counters)
            yield counters.count(Chunk(kept=pa.Table.from_pylist(kept, schema=FACE_SCHEMA) if kept else None,
                                       rejected=rejected(rejects)))


class Detect(Stage):
    """Image records in, aligned face crops out: the only stage that writes image bytes."""

    name = "detect"
    version = "3"
    reads = ("image_id", "source", "source_offset", SOURCE_IMAGE, SOURCE_PROBLEM)
    batch_rows = 16  # decoded source images in flight: bounds memory on large photos
    keyed_sections = ("detect", "image")
    # Only what changes the records: the weights are in the key through the model identity.
    unkeyed = frozenset({"detect.device", "detect.threads", "detect.batch_size", "detect.weights",
                         "detect.weights_sha256"})
    priority = 1
    device_section = "detect"

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        from facecap.models.registry import detector_identity

        # Resolving the weights here fails the run before any work if they are missing.
        return StagePlan(True, detector_identity(cfg), info={
            "weights": cfg.detector_weights, "min_score": cfg.detect.min_score,
            "min_face_px": cfg.detect.min_face_px, "crop_margin": cfg.detect.crop_margin})

    def load(self) -> None:
        from facecap.models.registry import load_detector

        self.detector = load_detector(self.cfg)
        self.check_loaded("detector", self.detector.identity)

    def schema(self) -> pa.Schema:
        return FACE_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return detect_faces(records, self.detector, self.cfg.detect, self.cfg.image, counters)
