"""Safe image handling: look at the header before decoding any pixels.

A decompression bomb (a small file claiming a huge canvas) is rejected from
its header; a truncated or corrupt file is rejected when decoded. Nothing here
raises for bad input: callers get a reason and a detail to record.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from facecap.settings import ImageLimits
from facecap.schema import Reason

# Pillow's own bomb guard is a backstop; our limit (config) is checked first.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}
# Formats whose EXIF sits before the pixel data, so reading it decodes nothing.
# (PNG may put eXIf after IDAT; reading it there would decode the image.)
_HEADER_EXIF = {"JPEG", "MPO", "WEBP", "TIFF"}


def _orientation(im: Image.Image) -> int:
    return int(im.getexif().get(0x0112, 1)) if im.format in _HEADER_EXIF else 1


@dataclass(frozen=True)
class Probe:
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str | None = None  # set when the image is rejected
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def probe(data: bytes | None, limits: ImageLimits) -> Probe:
    """Check size, format and header dimensions (after EXIF orientation) without decoding pixels."""
    if not data:
        return Probe(reason=Reason.EMPTY_FILE, detail="0 bytes")
    if len(data) > limits.max_bytes:
        return Probe(reason=Reason.TOO_LARGE, detail=f"{len(data)} bytes > image.max_bytes={limits.max_bytes}")
    orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height, fmt = im.width, im.height, im.format or "unknown"
                if fmt in limits.formats and width * height <= limits.max_pixels:
                    orientation = _orientation(im)
    except Exception as exc:  # Pillow raises many types for garbage input
        return Probe(reason=Reason.DECODE_ERROR, detail=_error_detail(exc))
    if fmt not in limits.formats:
        return Probe(reason=Reason.UNSUPPORTED_FORMAT, detail=f"format {fmt} not in image.formats")
    if width <= 0 or height <= 0:
        return Probe(reason=Reason.DECODE_ERROR, detail=f"header says {width}x{height}")
    if width * height > limits.max_pixels:
        return Probe(
            reason=Reason.TOO_LARGE, detail=f"{width}x{height} pixels > image.max_pixels={limits.max_pixels}"
        )
    if orientation in _TRANSPOSED:
        width, height = height, width
    return Probe(width=width, height=height, format=fmt)


def _error_detail(exc: BaseException) -> str:
    """The decoder's message without object addresses (Pillow names its BytesIO "at 0x..."): rejects are reproducible."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")[:300]


def decode_rgb(data: bytes, limits: ImageLimits) -> tuple[np.ndarray | None, Probe]:
    """Decode to an upright RGB uint8 array, or return the reason it cannot be."""
    p = probe(data, limits)
    if not p.ok:
        return None, p
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if _orientation(im) != 1:
                    im = ImageOps.exif_transpose(im)
                rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:
        return None, Probe(reason=Reason.DECODE_ERROR, detail=_error_detail(exc))
    if rgb.shape[:2] != (p.height, p.width):
        return None, Probe(reason=Reason.DECODE_ERROR, detail=f"decoded {rgb.shape[1]}x{rgb.shape[0]}, header said {p.width}x{p.height}")
    return rgb, p


def letterbox(rgb: np.ndarray, size: int, canvas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit an image into a size x size canvas (top-left, zero padding, never upscaled).

    Fills `canvas` (e.g. one slot of a batch array) when given. Returns the
    canvas and the (x, y) scale from source to canvas pixels.
    """
    h, w = rgb.shape[:2]
    scale = min(size / w, size / h, 1.0)
    if scale < 1.0:
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR, reducing_gap=2.0))
    if canvas is None:
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
    else:
        canvas.fill(0)
    canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
    return canvas, np.array([rgb.shape[1] / w, rgb.shape[0] / h], dtype=np.float32)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()
