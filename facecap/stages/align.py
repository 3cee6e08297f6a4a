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
    pad_fraction: float  # share of the crop's pixels that lie outside the source image (black)

    @property
    def side(self) -> int:
        return self.pixels.shape[0]


def crop_side(box: np.ndarray, margin: float) -> float:
    """Side of the square crop region: the face box's longer side grown by `margin` on each side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)


def real_extent(box: np.ndarray, margin: float, width: int, height: int) -> tuple[float, float]:
    """Width and height, in source pixels, of the part of the crop region that lies inside the image.

    The crop region is the square of side `crop_side` centred on the face box
    (`crop_box`, before levelling). Where it runs past the image, the crop is
    padded black; those pixels are not counted.
    """
    side = crop_side(box, margin)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    inside_w = min(cx + side / 2.0, width) - max(cx - side / 2.0, 0.0)
    inside_h = min(cy + side / 2.0, height) - max(cy - side / 2.0, 0.0)
    return max(0.0, inside_w), max(0.0, inside_h)


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
    pad = _outside_share(coeffs, out, rgb.shape[1], rgb.shape[0])
    return AlignedCrop(np.asarray(pixels), tuple(float(v) for v in crop_box), float(angle), pad)


def _outside_share(coeffs: tuple[float, ...], out: int, width: int, height: int) -> float:
    """Share of output pixels whose source point (pixel centre) falls outside the image.

    Sampled on a grid of at most 256 x 256 output pixels: exact for crops up
    to 256 px, within a fraction of a percent above.
    """
    step = max(1, -(-out // 256))
    grid = np.arange(0, out, step, dtype=np.float64) + 0.5
    ox, oy = np.meshgrid(grid, grid)
    a, b, c, d, e, f = coeffs
    sx, sy = a * ox + b * oy + c, d * ox + e * oy + f
    outside = (sx < 0) | (sx >= width) | (sy < 0) | (sy >= height)
    return round(float(outside.mean()), 4)
