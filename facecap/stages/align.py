"""Face alignment: level the eyes and cut the face region at source resolution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AlignedCrop:
    pixels: np.ndarray  # RGB uint8, side x side
    crop_box: tuple[float, float, float, float]  # axis-aligned region before rotation, source pixels
    angle: float  # degrees; positive means the eye line rose to the right (image y axis points down)

    @property
    def side(self) -> int:
        return self.pixels.shape[0]


def crop_side(box: np.ndarray, margin: float) -> float:
    """Side of the square crop region: the face box's longer side grown by `margin` on each side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle of the line from the left eye to the right eye (image coordinates), in degrees."""
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def aligned_crop(rgb: np.ndarray, box: np.ndarray, landmarks: np.ndarray, margin: float) -> AlignedCrop:
    """Rotate the face upright about its box centre and cut a square region, no resize.

    Each output pixel samples the source through one affine map, so only the
    crop is computed, never a rotated copy of the whole image. Parts of the
    region outside the source image are black.
    """
    side = crop_side(box, margin)
    out = max(1, round(side))
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    angle = eye_angle(landmarks)
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    half = out / 2.0
    # source = centre + R(angle) @ (output - half): the output's x axis follows the eye line.
    coeffs = (cos, -sin, cx - cos * half + sin * half, sin, cos, cy - sin * half - cos * half)
    pixels = Image.fromarray(rgb).transform((out, out), Image.AFFINE, coeffs, resample=Image.BICUBIC)
    crop_box = (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)
    return AlignedCrop(np.asarray(pixels), tuple(float(v) for v in crop_box), float(angle))
