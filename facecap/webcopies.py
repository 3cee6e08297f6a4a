"""Web copies of real photos with ground truth: what the web does to a photo, and where each face went.

``web_copies(n, seed)`` makes ``n`` altered JPEG copies of six real photos
that ship in packages (``facecap.package_photos``: the astronaut, Kafka's
portrait, insightface's six-person group photo; scikit-image's coffee, rocket
and cat photos, which hold no human face), round robin. Each copy applies a
seeded random mix of: a crop to 60-100 % a side that keeps a chosen face, or
a crop that puts that face against the image edge (the aligned crop then runs
past the image and is padded); a rotation up to +-10 degrees; a mirror; a
rescale 0.5-2x; colour jitter (brightness, contrast, saturation +-20 %); and a
JPEG re-encode at quality 60-95 (every copy).

Every geometric step is an affine map of source pixels, composed as the copy
is made, so each original face box is carried into the copy: the returned
boxes are where each person's face lies in the copy (the transformed box's
bounding rectangle, clipped to the copy). ``label_faces`` matches detected
boxes to them, so a benchmark or a test knows which person each detected
face is. The people of the group photo are six distinct persons: a
near-duplicate method must never put two of them together.

Copies are deterministic: copy ``i`` depends only on ``(seed, i)``, so
``web_copies(10, s)`` is the first ten of ``web_copies(600, s)``.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

# Face boxes (x1, y1, x2, y2, source pixels) in the original photos, as RetinaFace mobilenet0.25 (the offline
# detector) finds them at score > 0.99; the group photo's people are numbered in the detector's order.
FACE_BOXES: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {
    "astronaut": [("astronaut", (177.8, 56.8, 272.9, 177.2))],
    "kafka": [("kafka", (185.8, 68.2, 283.3, 192.5))],
    "group": [
        ("group-0", (464.8, 263.6, 573.7, 407.8)),
        ("group-1", (742.8, 343.5, 842.1, 471.0)),
        ("group-2", (51.3, 261.9, 168.3, 401.2)),
        ("group-3", (272.7, 149.2, 374.9, 278.3)),
        ("group-4", (902.4, 57.1, 1010.6, 201.1)),
        ("group-5", (1128.3, 273.9, 1225.4, 401.2)),
    ],
    "coffee": [], "rocket": [], "chelsea": [],
}
PHOTOS = tuple(FACE_BOXES)
PERSONS = tuple(p for faces in FACE_BOXES.values() for p, _ in faces)

Box = tuple[float, float, float, float]
WebCopy = tuple[str, bytes, list[tuple[str, Box]]]


@lru_cache(maxsize=None)
def original(name: str) -> Image.Image:
    """The original photo, RGB."""
    if name in ("astronaut", "kafka", "group"):
        from facecap import package_photos

        return package_photos.photo(name).convert("RGB")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _apply(img: Image.Image, forward: np.ndarray, size: tuple[int, int], fill: tuple[int, int, int]) -> Image.Image:
    """The image under the affine map `forward` (3x3, old pixel -> new pixel), on a canvas of `size`."""
    inverse = np.linalg.inv(forward)
    coeffs = tuple(inverse[:2].reshape(-1))
    return img.transform(size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=fill)


def _map_box(m: np.ndarray, box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    corners = np.array([[x1, y1, 1], [x2, y1, 1], [x1, y2, 1], [x2, y2, 1]], float) @ m.T
    return np.r_[corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()]


def _crop_window(rng: np.random.Generator, w: int, h: int, face: np.ndarray, edge: bool) -> tuple[int, int, int, int]:
    """A crop keeping `face` (its box in the current image): 60-100 % a side, or with the face on one edge."""
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    fx1, fy1, fx2, fy2 = face
    cw, ch = max(cw, min(w, int(fx2 - fx1) + 2)), max(ch, min(h, int(fy2 - fy1) + 2))
    # Any window position that keeps the face box inside (when the window is large enough for it).
    lo_x, hi_x = max(0, math.ceil(fx2) - cw), min(w - cw, int(fx1))
    lo_y, hi_y = max(0, math.ceil(fy2) - ch), min(h - ch, int(fy1))
    x0 = int(rng.integers(min(lo_x, hi_x), max(lo_x, hi_x) + 1))
    y0 = int(rng.integers(min(lo_y, hi_y), max(lo_y, hi_y) + 1))
    if edge:
        # The face box meets the cut: from 5 % of its side outside it to 10 % inside it.
        side = int(rng.integers(4))
        span = (fx2 - fx1) if side < 2 else (fy2 - fy1)
        shift = rng.uniform(-0.05, 0.10) * span
        if side == 0:
            x0 = int(np.clip(fx1 + shift, 0, w - 1))
        elif side == 1:
            x0 = int(np.clip(fx2 - shift - cw, 0, w - cw))
            cw = min(cw, int(fx2 - shift) - x0)
        elif side == 2:
            y0 = int(np.clip(fy1 + shift, 0, h - 1))
        else:
            y0 = int(np.clip(fy2 - shift - ch, 0, h - ch))
            ch = min(ch, int(fy2 - shift) - y0)
    cw, ch = max(1, min(cw, w - x0)), max(1, min(ch, h - y0))
    return x0, y0, x0 + cw, y0 + ch


def web_copy(i: int, seed: int = 0) -> WebCopy:
    """Copy number `i`: (name, JPEG bytes, [(person_id, face box in the copy), ...])."""
    photo = PHOTOS[i % len(PHOTOS)]
    rng = np.random.default_rng([seed, i])
    img = original(photo)
    faces = FACE_BOXES[photo]
    m = np.eye(3)  # original pixel -> current pixel
    ops = []
    w, h = img.size
    target = faces[int(rng.integers(len(faces)))][1] if faces else (w * .4, h * .4, w * .6, h * .6)

    if rng.random() < 0.3:
        angle = math.radians(rng.uniform(-10, 10))
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ rot.T
        nw, nh = int(math.ceil(np.ptp(corners[:, 0]))), int(math.ceil(np.ptp(corners[:, 1])))
        step = np.array([[1, 0, -corners[:, 0].min()], [0, 1, -corners[:, 1].min()], [0, 0, 1]]) @ rot
        fill = tuple(int(v) for v in rng.choice([0, 255], 1).repeat(3))
        img, m, (w, h) = _apply(img, step, (nw, nh), fill), step @ m, (nw, nh)
        ops.append("rotate")
    crop = rng.random()
    if crop < 0.55:
        edge = crop < 0.25
        x0, y0, x1, y1 = _crop_window(rng, w, h, _map_box(m, target), edge)
        img = img.crop((x0, y0, x1, y1))
        m = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ m
        w, h = img.size
        ops.append("edge" if edge else "crop")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        m = np.array([[-1, 0, w], [0, 1, 0], [0, 0, 1]]) @ m
        ops.append("mirror")
    if rng.random() < 0.6:
        scale = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        m = np.diag([nw / w, nh / h, 1.0]) @ m
        w, h = nw, nh
        ops.append("scale")
    if rng.random() < 0.3:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.8, 1.2))
        ops.append("colour")
    quality = int(rng.integers(60, 96))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    boxes = []
    for person, box in faces:
        b = _map_box(m, box)
        clipped = np.clip(b, 0, [w, h, w, h])
        if (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) > 0:
            boxes.append((person, tuple(float(v) for v in clipped)))
    name = f"{photo}_{i:04d}_{'-'.join(ops + [f'q{quality}'])}"
    return name, buf.getvalue(), boxes


def web_copies(n: int, seed: int = 0) -> list[WebCopy]:
    """`n` web copies of the six photos (round robin): [(name, JPEG bytes, [(person_id, box), ...]), ...]."""
    return [web_copy(i, seed) for i in range(n)]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def label_faces(detected: Sequence[Sequence[float]], truth: Sequence[tuple[str, Box]],
                min_iou: float = 0.3) -> list[str | None]:
    """The person of each detected box (best IoU first, each person once), or None for no match.

    A rotation inflates a carried box (its bounding rectangle), so the match
    asks for a modest IoU; the people of one photo are far apart, so it never
    has to choose between two of them.
    """
    scores = [(iou(d, box), i, person) for i, d in enumerate(detected) for person, box in truth]
    labels: list[str | None] = [None] * len(detected)
    taken = set()
    for score, i, person in sorted(scores, key=lambda t: -t[0]):
        if score < min_iou or labels[i] is not None or person in taken:
            continue
        labels[i] = person
        taken.add(person)
    return labels


def detect_copies(copies: Sequence[WebCopy], cfg=None):
    """Run the detect stage's code (the configured detector: offline, RetinaFace mobilenet0.25) on `copies`.

    Returns (faces, rejects by reason): `faces` is detect's output table for the
    copies' kept faces plus `source`, `source_offset` and a `person` column (label_faces; null when a face
    matches no carried box). Each copy's name is its image_id.
    """
    import pyarrow as pa

    from facecap.config import Config
    from facecap.models.registry import load_detector
    from facecap.records import SOURCE_IMAGE
    from facecap.stages.base import Counters
    from facecap.stages.detect import detect_faces

    cfg = cfg or Config.model_validate({"profile": "offline"})
    detector = load_detector(cfg)
    rows = [{"image_id": name, "source": "webcopies", "source_offset": name, SOURCE_IMAGE: data}
            for name, data, _ in copies]
    truth = {name: faces for name, _, faces in copies}
    kept, rejects = [], {}
    for chunk in detect_faces([pa.Table.from_pylist(rows)], detector, cfg.detect, cfg.image, Counters()):
        if chunk.kept is not None:
            kept.append(chunk.kept)
        if chunk.rejected is not None:
            for reason in chunk.rejected.column("reason").to_pylist():
                rejects[reason] = rejects.get(reason, 0) + 1
    if not kept:
        raise RuntimeError("the detector kept no face in the copies")
    faces = pa.concat_tables(kept)
    persons: list[str | None] = [None] * faces.num_rows
    by_image: dict[str, list[int]] = {}
    for i, image_id in enumerate(faces.column("image_id").to_pylist()):
        by_image.setdefault(image_id, []).append(i)
    boxes = faces.column("bbox").to_pylist()
    for image_id, rows_of in by_image.items():
        for i, person in zip(rows_of, label_faces([boxes[i] for i in rows_of], truth[image_id])):
            persons[i] = person
    # What ingest adds to a real record (the copy's name stands for its file name).
    faces = faces.append_column("source", pa.array(["webcopies"] * faces.num_rows, pa.string()))
    faces = faces.append_column("source_offset", faces.column("image_id"))
    return faces.append_column("person", pa.array(persons, pa.string())), rejects


def pair_scores(persons: Sequence[str | None], clusters: Sequence[int]) -> dict:
    """Pair recall and precision of `clusters` (a label per face) against `persons` (None: not scored).

    A true pair is two faces of one person; a predicted pair, two faces in one
    cluster. Counted per (cluster, person) cell, so it is linear in the faces.
    """
    from collections import Counter

    scored = [(c, p) for c, p in zip(clusters, persons) if p is not None]
    pairs = lambda counts: sum(k * (k - 1) // 2 for k in counts.values())  # noqa: E731
    same_person = pairs(Counter(p for _, p in scored))
    same_cluster = pairs(Counter(c for c, _ in scored))
    true_pos = pairs(Counter(scored))
    merged = {}
    for c, p in scored:
        merged.setdefault(c, set()).add(p)
    return {"faces": len(scored), "persons": len({p for _, p in scored}),
            "clusters": len({c for c, _ in scored}), "true_pairs": true_pos,
            "false_pairs": same_cluster - true_pos, "missed_pairs": same_person - true_pos,
            "pair_recall": true_pos / same_person if same_person else None,
            "pair_precision": true_pos / same_cluster if same_cluster else None,
            "mixed_clusters": sum(len(p) > 1 for p in merged.values()),
            "unlabelled_faces": sum(p is None for p in persons)}
