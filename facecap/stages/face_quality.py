"""Face quality: sharpness, head pose and exposure of every kept face, as columns, with optional reject rules.

A stage of its own right after detect, so the rules can be re-tuned without
running the detector again (this stage reads the crops detect wrote; the
measures cost 0.9 ms a face on 140-220 px crops, 11 ms on 1024 px ones, mostly
JPEG decoding).

- Sharpness: variance of the Laplacian of the face box's part of the aligned
  crop (grey, resized to ``WORK_SIDE`` px with area averaging). A fixed
  working size makes a rescaled copy of a photo score alike: kept faces are
  at least ~90 px across their box, so every face is shrunk, never enlarged.
- Pose: yaw, pitch and roll, estimated from the five landmarks (source px).
  Roll is the eye line's angle (alignment levels it). In the levelled frame,
  yaw comes from the nose's sideways offset from the eyes' midpoint and
  pitch from the nose's height between the eye line and the mouth line,
  against a frontal face's proportions (ArcFace's 5-point template) and a
  nose that stands half an eye distance in front of the eyes. An estimate:
  good for telling frontal, turned and profile faces apart, not a
  measurement in degrees.
- Exposure: mean luminance (Rec. 601 Y, 0..255) of the face box and the
  share of its pixels clipped to black (Y <= 5) or white (Y >= 250).

Black padding past the source image's edge is left out of all three: the
crop's pixels whose source point lies outside the image are masked.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field

from facecap.schema import Reason, keyed_schema
from facecap.settings import ImageLimits, Section
from facecap.sources.images import decode_rgb
from facecap.stages.base import FACE_REJECT_COLUMNS, Chunk, Counters, ReportSection, Stage, reject_row
from facecap.stages.base import rejected as reject_table

WORK_SIDE = 64  # px: the face box is resized to this before the Laplacian
DARK, BRIGHT = 5, 250  # Y at or below / at or above counts as clipped
# ArcFace's 112 x 112 five-point template: eyes at y 51.6, nose 71.7, mouth corners 92.3; eye distance 35.2.
FRONTAL_NOSE_HEIGHT = (71.74 - 51.59) / (92.28 - 51.59)  # nose between eye line (0) and mouth line (1)
NOSE_DEPTH = 0.5  # nose tip in front of the eye plane, in eye distances
FACE_HEIGHT = (92.28 - 51.59) / (73.53 - 38.29)  # eye line to mouth line, in eye distances


class FaceQualitySettings(Section):
    """Per-face quality measures (always computed) and their reject rules (each unset = no rule)."""

    min_sharpness: float | None = Field(
        30.0, ge=0, description="Reject a face (too_blurry) whose sharpness (variance of the Laplacian of its face "
                                "box, grey, at 64 x 64 px) is below this. Measured (bench/measure_face_rules.py): "
                                "359 web copies and edge crops of the packaged photos score 289 or more; a "
                                "Gaussian blur of 2 px per 100 px of face box 35 or more, of 4 px per 100 px 27 "
                                "or less.")
    max_yaw: float | None = Field(
        70.0, ge=0, le=90, description="Reject a face (extreme_pose) turned sideways more than this many degrees "
                                       "(estimated from the landmarks): near-profile faces, whose far eye and mouth "
                                       "corner the detector guesses. Web copies of the packaged photos: 54 or less.")
    max_pitch: float | None = Field(
        60.0, ge=0, le=90, description="Reject a face (extreme_pose) tilted up or down more than this many degrees "
                                       "(estimated from the landmarks). Web copies of the packaged photos: 39 or "
                                       "less.")
    min_luminance: float | None = Field(
        25.0, ge=0, le=255, description="Reject a face (badly_exposed) whose mean luminance (Y, 0..255) is below "
                                        "this. Web copies: 126 or more; darkened to gamma 5: 36 or more; dimmed "
                                        "to 15 % brightness: 21.")
    max_luminance: float | None = Field(
        240.0, ge=0, le=255, description="Reject a face (badly_exposed) whose mean luminance is above this. Web "
                                         "copies: 178 or less; brightened to gamma 0.2: 231 or less.")
    max_clipped_share: float | None = Field(
        0.5, ge=0, le=1, description="Reject a face (badly_exposed) more than this share of whose pixels are "
                                     "clipped to black or white. Web copies: 0.03 or less; darkened to gamma 5: "
                                     "0.42 or less; overexposed 2.5x: 0.63.")


class FaceQualityReason(Reason):
    TOO_BLURRY = "too_blurry"
    EXTREME_POSE = "extreme_pose"
    BADLY_EXPOSED = "badly_exposed"


QUALITY_FIELDS = [
    pa.field("sharpness", pa.float32(), nullable=False),
    pa.field("yaw", pa.float32(), nullable=False),
    pa.field("pitch", pa.float32(), nullable=False),
    pa.field("roll", pa.float32(), nullable=False),
    pa.field("luminance", pa.float32(), nullable=False),
    pa.field("clipped_share", pa.float32(), nullable=False),
]
QUALITY_SCHEMA = keyed_schema(QUALITY_FIELDS)


def head_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the five landmarks (left eye, right eye, nose, left and right mouth).

    Yaw is positive when the nose points to the image's right, pitch when it points down.
    """
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, nose, mouth = (p[0] + p[1]) / 2.0, p[2], (p[3] + p[4]) / 2.0
    dx, dy = p[1] - p[0]
    roll = math.degrees(math.atan2(dy, dx))
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = np.array([[c, -s], [s, c]])
    nose_l, mouth_l = rot @ (nose - eyes), rot @ (mouth - eyes)
    eye_dist = max(math.hypot(dx, dy), 1e-6)
    # Seen turned by yaw, the eyes' distance shrinks by cos(yaw) and the nose moves by depth * sin(yaw):
    # offset / eye distance = depth * tan(yaw).
    yaw = math.degrees(math.atan2(nose_l[0] / eye_dist, NOSE_DEPTH))
    height = mouth_l[1]
    if height <= 1e-6:  # mouth above the eye line: no frontal reading of the face
        return yaw, 90.0, roll
    t = nose_l[1] / height
    pitch = math.degrees(math.atan2((t - FRONTAL_NOSE_HEIGHT) * FACE_HEIGHT, NOSE_DEPTH))
    return yaw, pitch, roll


def face_box_mask(crop_side: int, crop_box: list[float], angle: float, margin: float, width: int, height: int,
                  side: int = WORK_SIDE) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The face box's part of an aligned crop (x0, y0, x1, y1 in crop px), and which of its pixels, on a
    side x side grid, sample the source image (True) rather than black padding past its edge."""
    inner = crop_side / (1.0 + 2.0 * margin)
    lo = (crop_side - inner) / 2.0
    x0, x1 = int(round(lo)), max(int(round(lo + inner)), int(round(lo)) + 1)
    cx, cy = (crop_box[0] + crop_box[2]) / 2.0, (crop_box[1] + crop_box[3]) / 2.0
    a = math.radians(angle)
    half = crop_side / 2.0
    grid = x0 + (np.arange(side) + 0.5) * (x1 - x0) / side - half
    ox, oy = np.meshgrid(grid, grid)
    sx = cx + math.cos(a) * ox - math.sin(a) * oy
    sy = cy + math.sin(a) * ox + math.cos(a) * oy
    if not width or not height:  # source size unknown: nothing can be told apart as padding
        return (x0, x0, x1, x1), np.ones((side, side), dtype=bool)
    inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
    return (x0, x0, x1, x1), inside


def face_measures(rgb: np.ndarray, region: tuple[int, int, int, int], inside: np.ndarray) -> tuple[float, float, float]:
    """(sharpness, mean luminance, clipped share) of the face box region, on the masked working grid."""
    import cv2

    x0, y0, x1, y1 = region
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    side = inside.shape[0]
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    n = int(inside.sum())
    if n == 0:
        return 0.0, 0.0, 1.0
    values = small[inside]
    luminance = float(values.mean())
    clipped = float(((values <= DARK) | (values >= BRIGHT)).mean())
    lap = cv2.Laplacian(small, cv2.CV_32F, ksize=1)
    # The Laplacian at a padding edge is the edge, not the face: only pixels whose 3 x 3 neighbourhood is real.
    core = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0).astype(bool)
    core[0, :] = core[-1, :] = core[:, 0] = core[:, -1] = False
    sharpness = float(lap[core].var()) if core.sum() > 1 else 0.0
    return sharpness, luminance, clipped


def measure_face(rgb: np.ndarray, row: dict) -> dict:
    """Every quality column of one face from its aligned crop and its detect record."""
    region, inside = face_box_mask(rgb.shape[0], row["crop_box"], row["align_angle"], row["crop_margin"],
                                   row["source_width"], row["source_height"])
    sharpness, luminance, clipped = face_measures(rgb, region, inside)
    yaw, pitch, roll = head_pose(np.asarray(row["landmarks"]))
    return {"sharpness": round(sharpness, 3), "yaw": round(yaw, 2), "pitch": round(pitch, 2), "roll": round(roll, 2),
            "luminance": round(luminance, 2), "clipped_share": round(clipped, 4)}


def judge(m: dict, s: FaceQualitySettings) -> tuple[str, str] | None:
    """The first rule a face breaks, with a detail naming the value and the setting (None: kept).

    Exposure comes first: a dim face's Laplacian is small because its contrast is, not because it is blurred.
    """
    if s.min_luminance is not None and m["luminance"] < s.min_luminance:
        return FaceQualityReason.BADLY_EXPOSED, (f"luminance {m['luminance']:.1f} < face_quality.min_luminance="
                                                 f"{s.min_luminance:g}")
    if s.max_luminance is not None and m["luminance"] > s.max_luminance:
        return FaceQualityReason.BADLY_EXPOSED, (f"luminance {m['luminance']:.1f} > face_quality.max_luminance="
                                                 f"{s.max_luminance:g}")
    if s.max_clipped_share is not None and m["clipped_share"] > s.max_clipped_share:
        return FaceQualityReason.BADLY_EXPOSED, (f"clipped_share {m['clipped_share']:.4f} > "
                                                 f"face_quality.max_clipped_share={s.max_clipped_share:g}")
    if s.min_sharpness is not None and m["sharpness"] < s.min_sharpness:
        return FaceQualityReason.TOO_BLURRY, (f"sharpness {m['sharpness']:.2f} < face_quality.min_sharpness="
                                              f"{s.min_sharpness:g}")
    if s.max_yaw is not None and abs(m["yaw"]) > s.max_yaw:
        return FaceQualityReason.EXTREME_POSE, f"yaw {m['yaw']:.1f} deg, |yaw| > face_quality.max_yaw={s.max_yaw:g}"
    if s.max_pitch is not None and abs(m["pitch"]) > s.max_pitch:
        return FaceQualityReason.EXTREME_POSE, (f"pitch {m['pitch']:.1f} deg, |pitch| > face_quality.max_pitch="
                                                f"{s.max_pitch:g}")
    return None


def f32(value: float) -> str:
    # The columns are FLOAT: compared with a DOUBLE literal, a value kept at exactly the limit could exceed it.
    return f"CAST({value:g} AS FLOAT)"


def rule_sql(s: FaceQualitySettings) -> dict[str, str]:
    """Per rule that is set, the SQL condition a record breaking it meets (what the release checks count)."""
    out = {}
    if s.min_sharpness is not None:
        out["too_blurry"] = f"sharpness < {f32(s.min_sharpness)}"
    pose = [f"abs(yaw) > {f32(s.max_yaw)}" if s.max_yaw is not None else None,
            f"abs(pitch) > {f32(s.max_pitch)}" if s.max_pitch is not None else None]
    if any(pose):
        out["extreme_pose"] = " OR ".join(p for p in pose if p)
    exposure = [f"luminance < {f32(s.min_luminance)}" if s.min_luminance is not None else None,
                f"luminance > {f32(s.max_luminance)}" if s.max_luminance is not None else None,
                f"clipped_share > {f32(s.max_clipped_share)}" if s.max_clipped_share is not None else None]
    if any(exposure):
        out["badly_exposed"] = " OR ".join(e for e in exposure if e)
    return out


def measure_faces(batches: Iterable[pa.Table], settings: FaceQualitySettings, limits: ImageLimits,
                  counters: Counters) -> Iterator[Chunk]:
    """Face records in, their quality columns out; a face breaking a rule is a reject with the value."""
    for table in batches:
        counters.rows_in += table.num_rows
        kept, rejects = [], []
        for row in table.to_pylist():
            rgb, p = decode_rgb(row["image"], limits)
            if rgb is None:  # crops come from detect: a damaged shard, recorded and not raised
                rejects.append(reject_row("face_quality", row, p.reason, f"face crop: {p.detail}"))
                continue
            m = measure_face(rgb, row)
            broken = judge(m, settings)
            if broken:
                rejects.append(reject_row("face_quality", row, *broken))
            else:
                kept.append({"sample_id": row["sample_id"], **m})
        yield counters.count(Chunk(kept=pa.Table.from_pylist(kept, schema=QUALITY_SCHEMA) if kept else None,
                                   rejected=reject_table(rejects)))


class FaceQuality(Stage):
    """Aligned face crops in, sharpness, pose and exposure out; faces breaking a rule set are rejected."""

    name = "face_quality"
    version = "1"
    section, settings_model, section_after = "face_quality", FaceQualitySettings, "detect"
    output_fields, reasons = tuple(QUALITY_FIELDS), FaceQualityReason
    column_docs = {
        "sharpness": "variance of the Laplacian of the face box (grey, 64 x 64 px, padding left out); higher is "
                     "sharper",
        "yaw": "head turn left/right, degrees, estimated from the landmarks (+: nose toward the image's right)",
        "pitch": "head tilt up/down, degrees, estimated from the landmarks (+: nose down)",
        "roll": "eye line's angle in the source, degrees (the crop is levelled)",
        "luminance": "mean luminance of the face box, Rec. 601 Y, 0..255 (padding left out)",
        "clipped_share": "share of the face box's pixels clipped to black (Y <= 5) or white (Y >= 250)",
    }
    reads = FACE_REJECT_COLUMNS + ("image", "landmarks", "crop_box", "align_angle", "crop_margin", "source_width",
                                   "source_height")
    keyed_sections = ("face_quality", "image")
    priority = 2
    suite = "face_quality"

    @classmethod
    def quality_checks(cls, cfg) -> list:
        from facecap.quality.primitives import Check

        cols = ("sharpness", "yaw", "pitch", "luminance", "clipped_share")
        checks = [Check("face_quality_measured", "face_quality", "every face has its quality measures",
                        "count(*) FILTER (" + " OR ".join(f"{c} IS NULL" for c in cols) + ")", cols)]
        # Confirmations: the stage rejected every face breaking a rule, so these fail only on a bug.
        for reason, condition in rule_sql(cfg.face_quality).items():
            checks.append(Check(f"no_{reason}_kept", "face_quality", f"no kept face breaks the {reason} rule "
                                f"({condition})", f"count(*) FILTER ({condition})", cols))
        return checks

    def schema(self) -> pa.Schema:
        return QUALITY_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return measure_faces(records, self.cfg.face_quality, self.cfg.image, counters)


# --- report ----------------------------------------------------------------------------------------
HISTOGRAMS = {  # column -> (low, high, bins, label); fixed ranges, so the figures need no extra scan
    # Sharpness spans decades (blurred faces score ~10, web photos hundreds to thousands): binned by log10.
    "sharpness": (0.0, 4.0, 20, "log10 sharpness (variance of the Laplacian)"),
    "yaw": (-90.0, 90.0, 18, "yaw, degrees"),
    "pitch": (-90.0, 90.0, 18, "pitch, degrees"),
    "roll": (-90.0, 90.0, 18, "roll, degrees"),
    "luminance": (0.0, 255.0, 17, "mean luminance (Y)"),
    "clipped_share": (0.0, 1.0, 20, "clipped share"),
}
RULE_MARKS = {"sharpness": ("min_sharpness",), "yaw": ("max_yaw",), "pitch": ("max_pitch",),
              "luminance": ("min_luminance", "max_luminance"), "clipped_share": ("max_clipped_share",)}


class FaceQualityReport(ReportSection):
    """Histograms of the quality measures beside each rule's kept and rejected counts."""

    def aggregates(self, db) -> tuple[dict[str, str], dict[str, str]]:
        from facecap.quality.primitives import bin_expr

        exprs = {}
        for col, (lo, hi, bins, _) in HISTOGRAMS.items():
            if col in db.columns:
                value = "log10(greatest(sharpness, 1))" if col == "sharpness" else col
                exprs[f"fq_{col}_hist"] = f"histogram({bin_expr(value, lo, hi, bins)})"
                exprs[f"fq_{col}_median"] = f"median({col})"
        return exprs, {}

    def figures(self, db, agg) -> dict:
        from facecap.quality.primitives import hist

        if not agg.get("n_rows") or "fq_sharpness_hist" not in agg:
            return {}
        s = db.cfg.face_quality
        rejects: dict[str, int] = {}
        for row in db.info.get("funnel") or []:
            if row.get("stage") == "face_quality":
                rejects = {r: int(n) for r, n in (row.get("rejects") or {}).items()}
        rules = []
        for reason, condition in rule_sql(s).items():
            rules.append({"reason": reason, "rule": re.sub(r"CAST\((\S+) AS FLOAT\)", r"\1", condition),
                          "rejected": rejects.get(reason, 0)})
        fig = {"kept": int(agg["n_rows"]), "rules": rules, "measures": {}}
        for col, (lo, hi, bins, label) in HISTOGRAMS.items():
            if f"fq_{col}_hist" in agg:
                values = [getattr(s, m) for m in RULE_MARKS.get(col, ()) if getattr(s, m) is not None]
                if col in ("yaw", "pitch"):
                    values = [v for m in values for v in (-m, m)]
                marks = [round(math.log10(max(m, 1.0)), 4) for m in values] if col == "sharpness" else values
                median = agg.get(f"fq_{col}_median")
                fig["measures"][col] = {"label": label, "median": None if median is None else round(float(median), 3),
                                        "rule_at": marks, "rule_values": values, **hist(agg[f"fq_{col}_hist"], lo, hi, bins)}
        return {"face_quality": fig}

    def headline(self, fig) -> dict:
        f = fig.get("face_quality")
        if not f:
            return {}
        return {"faces rejected by quality rules": sum(r["rejected"] for r in f["rules"])}

    def html(self, report) -> str:
        from facecap.quality import svg
        from facecap.quality.primitives import table

        f = report["figures"].get("face_quality")
        if not f:
            return ""
        parts = ["<h3>Face quality</h3>",
                 table(["rule", "kept faces", "rejected"],
                       [[f"{r['reason']}: rejected when {r['rule']}", f["kept"], r["rejected"]] for r in f["rules"]]
                       or [["no quality rule set", f["kept"], 0]])]
        for m in f["measures"].values():
            mark = m["rule_at"][-1] if m["rule_at"] else None
            parts.append(svg.histogram(m["edges"], m["counts"], f"{m['label']} (median {m['median']}; the last bin "
                                       f"holds everything above)", mark=mark,
                                       mark_label=f"rule {m['rule_values'][-1]:g}" if mark is not None else ""))
        return "".join(parts)

    def gallery_columns(self, db) -> dict[str, str]:
        return {c: c for c in ("sharpness", "yaw") if c in db.columns}

    def gallery_html(self, face) -> str:
        if face.get("sharpness") is None:
            return ""
        return f' sharpness {face["sharpness"]:.0f}, yaw {face["yaw"]:.0f}&deg;<br>'


FaceQuality.report = FaceQualityReport()
