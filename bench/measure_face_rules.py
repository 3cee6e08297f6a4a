"""Measure the per-face rules' inputs on web-altered copies of the packaged photos (where the defaults come from).

Runs the real detector (RetinaFace mobilenet0.25, offline profile) with no pad rule and no quality rule on:
- web copies: random crops keeping 70-100 % of each side, rescales 0.4-1.6x, mirrors, JPEG re-encodes at
  quality 30-95;
- edge crops: the photo cut through a face's crop region, at a random point between the crop region's edge
  and 15 % into the face box (the face's eyes, nose and mouth stay in the photo);
- deliberately degraded copies: Gaussian blur (radius 1, 2, 4 px per 100 px of face box), darkened and
  brightened (gamma), and in-plane rotations of 15-40 degrees (alignment levels them: never a pose reject).
Prints, per kind of copy, the range and percentiles of pad_fraction, sharpness, |yaw|, |pitch|, luminance and
clipped share of the faces the detector keeps.

    .venv/bin/python bench/measure_face_rules.py [--copies 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from facecap.config import Config
from facecap.package_photos import photo
from facecap.records import in_memory_images
from facecap.schema import image_id_for
from facecap.stages.base import Counters
from facecap.stages.detect import FACE_SCHEMA, detect_faces
from facecap.stages.face_quality import measure_face
from facecap.sources.images import decode_rgb

PHOTOS = ("astronaut", "kafka", "group")


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def web_copy(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    kw, kh = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
    x0, y0 = rng.uniform(0, w * (1 - kw)), rng.uniform(0, h * (1 - kh))
    out = img.crop((int(x0), int(y0), int(x0 + w * kw), int(y0 + h * kh)))
    s = rng.uniform(0.4, 1.6)
    out = out.resize((max(1, int(out.width * s)), max(1, int(out.height * s))), Image.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def edge_crop(img: Image.Image, box: list[float], margin: float, rng: random.Random) -> Image.Image:
    """Cut the photo on one or two sides between the face's crop region edge and 15 % into its box."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top, right, bottom = 0.0, 0.0, float(img.width), float(img.height)
    sides = rng.sample(["left", "top", "right", "bottom"], rng.choice([1, 2]))
    if "left" in sides:
        left = max(0.0, rng.uniform(cx - side / 2, x1 + 0.15 * (x2 - x1)))
    if "right" in sides:
        right = min(float(img.width), rng.uniform(x2 - 0.15 * (x2 - x1), cx + side / 2))
    if "top" in sides:
        top = max(0.0, rng.uniform(cy - side / 2, y1 + 0.15 * (y2 - y1)))
    if "bottom" in sides:
        bottom = min(float(img.height), rng.uniform(y2 - 0.15 * (y2 - y1), cy + side / 2))
    return img.crop((int(left), int(top), int(right), int(bottom)))


def images_table(named: dict[str, bytes], cfg: Config) -> pa.Table:
    return in_memory_images(named, cfg.image, "mem://measure")


def detect(detector, named: dict[str, bytes], cfg: Config) -> list[dict]:
    """Kept faces with their source size and quality measures."""
    sizes = {n: Image.open(io.BytesIO(d)).size for n, d in named.items()}
    chunks = list(detect_faces([images_table(named, cfg)], detector, cfg.detect, cfg.image, Counters()))
    kept = [c.kept for c in chunks if c.kept is not None]
    faces = pa.concat_tables(kept).to_pylist() if kept else FACE_SCHEMA.empty_table().to_pylist()
    by_id = {image_id_for("mem://measure", n): n for n in named}
    out = []
    for f in faces:
        name = by_id[f["image_id"]]
        f["source_width"], f["source_height"] = sizes[name]
        rgb, _ = decode_rgb(f["image"], cfg.image)
        f.update(measure_face(rgb, f), name=name)
        out.append(f)
    return out


def landmark_reach(face: dict) -> float:
    """How far the farthest landmark lies past the face box, as a share of the box side (0: all inside)."""
    x1, y1, x2, y2 = face["bbox"]
    p = np.asarray(face["landmarks"]).reshape(5, 2)
    dx = np.maximum(np.maximum(x1 - p[:, 0], p[:, 0] - x2), 0) / max(x2 - x1, 1e-6)
    dy = np.maximum(np.maximum(y1 - p[:, 1], p[:, 1] - y2), 0) / max(y2 - y1, 1e-6)
    return float(max(dx.max(), dy.max()))


def summary(label: str, faces: list[dict]) -> None:
    if not faces:
        print(f"{label:<22} no faces kept")
        return
    cols = {"pad": [f["pad_fraction"] for f in faces], "sharp": [f["sharpness"] for f in faces],
            "|yaw|": [abs(f["yaw"]) for f in faces], "|pitch|": [abs(f["pitch"]) for f in faces],
            "lum": [f["luminance"] for f in faces], "clip": [f["clipped_share"] for f in faces]}
    parts = []
    for k, v in cols.items():
        a = np.array(v)
        parts.append(f"{k} {a.min():.3g}/{np.percentile(a, 50):.3g}/{a.max():.3g}")
    print(f"{label:<22} n={len(faces):<4} " + "  ".join(parts) + "   (min/median/max)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=40, help="web copies and edge crops per photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from facecap.models.registry import load_detector

    cfg = Config.model_validate({"profile": "offline", "detect": {"max_pad_fraction": None}})
    detector = load_detector(cfg)
    rng = random.Random(args.seed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for name in PHOTOS:
        img = photo(name).convert("RGB")
        originals = detect(detector, {name: jpeg(img, 95)}, cfg)
        groups["original"] += originals
        copies = {f"{name}-web{i}": jpeg(web_copy(img, rng), rng.randint(30, 95)) for i in range(args.copies)}
        groups["web copy"] += detect(detector, copies, cfg)
        edges = {}
        for i in range(args.copies):
            face = rng.choice(originals)
            cut = edge_crop(img, face["bbox"], cfg.detect.crop_margin, rng)
            if rng.random() < 0.5:
                cut = cut.transpose(Image.FLIP_LEFT_RIGHT)
            edges[f"{name}-edge{i}"] = jpeg(cut, rng.randint(60, 95))
        groups["edge crop"] += detect(detector, edges, cfg)
        box = max(originals, key=lambda f: f["bbox"][2] - f["bbox"][0])["bbox"]
        face_px = box[2] - box[0]
        for per100 in (1, 2, 4):
            blurred = img.filter(ImageFilter.GaussianBlur(per100 * face_px / 100))
            groups[f"blur {per100}px/100px"] += detect(detector, {f"{name}-blur{per100}": jpeg(blurred)}, cfg)
        for gamma, kind in ((3.0, "dark"), (5.0, "dark"), (0.33, "bright"), (0.2, "bright")):
            lut = [int(255 * (i / 255) ** gamma) for i in range(256)] * 3
            groups[f"{kind} (gamma {gamma})"] += detect(detector, {f"{name}-g{gamma}": jpeg(img.point(lut))}, cfg)
        for angle in (15, 25, 40):
            groups["rotated 15-40 deg"] += detect(detector, {f"{name}-r{angle}": jpeg(img.rotate(angle, expand=True))},
                                                  cfg)
    for label, faces in groups.items():
        summary(label, faces)
    edge = np.array([f["pad_fraction"] for f in groups["edge crop"]])
    web = np.array([f["pad_fraction"] for f in groups["web copy"] + groups["edge crop"]])
    print(f"edge crops: {len(edge)} faces kept, {np.mean(edge > 0):.0%} padded, pad p95 {np.percentile(edge, 95):.3f}, "
          f"max {edge.max():.3f}; web copies and edge crops together: mean pad {web.mean():.3f}")
    every = [f for faces in groups.values() for f in faces]
    reach = [landmark_reach(f) for f in every]
    print(f"landmarks past the face box, in box sides (the release check allows quality.landmark_tolerance): "
          f"max {max(reach):.3f} over {len(every)} faces")
    for limit in (0.25, 0.3, 0.35, 0.4):
        print(f"  detect.max_pad_fraction={limit}: rejects {int((edge > limit).sum())} of {len(edge)} edge-crop faces, "
              f"{int((web > limit).sum())} of {len(web)} web-copy and edge-crop faces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
