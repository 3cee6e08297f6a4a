"""Example sources built from photos that ship inside PyPI wheels, plus generated images.

The only real face photo is NASA's portrait of Eileen Collins that scikit-image
ships (``skimage.data.astronaut()``). Around it we build the cases a curation
run meets: rotated and multi-face images, a face too small to keep, non-face
photos and generated images, broken files, and all three source kinds
(folder with sidecars, WebDataset tar, Parquet with bytes and with paths).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ASTRONAUT_CAPTION = "Eileen Collins, NASA astronaut, in her orange launch and entry suit"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def exif_rotated(img: Image.Image) -> bytes:
    """Pixels stored rotated by 90 degrees with an EXIF tag saying how to turn them upright."""
    stored = img.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(stored, "JPEG", quality=92, exif=exif)


def generated(kind: str, size: tuple[int, int] = (480, 360), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "gradient":
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))
    if kind == "shapes":
        arr = np.full((h, w, 3), 235, np.uint8)
        for _ in range(12):
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            arr[y0 : y0 + rng.integers(10, 80), x0 : x0 + rng.integers(10, 80)] = rng.integers(0, 256, 3)
        return Image.fromarray(arr)
    raise ValueError(kind)


def face_images() -> dict[str, tuple[bytes, str]]:
    """name -> (encoded image, caption) for images that contain the astronaut's face."""
    face = astronaut()
    pair = Image.new("RGB", (face.width * 2, face.height))
    pair.paste(face, (0, 0))
    pair.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (face.width, 0))
    return {
        "astronaut.png": (_encode(face, "PNG"), ASTRONAUT_CAPTION),
        "astronaut_tilted.jpg": (_encode(face.rotate(20, resample=Image.BICUBIC, expand=True), "JPEG", quality=92),
                                 "the astronaut portrait, tilted"),
        "astronaut_pair.jpg": (_encode(pair, "JPEG", quality=92), "the astronaut portrait next to its mirror image"),
        "astronaut_exif.jpg": (exif_rotated(face), "the astronaut portrait stored sideways with an EXIF orientation"),
        "astronaut_small.jpg": (_encode(face.resize((160, 160)), "JPEG", quality=92), "a thumbnail: face too small"),
        "astronaut_webp.webp": (_encode(face, "WEBP", quality=90), "the astronaut portrait as WebP"),
    }


def non_face_images() -> dict[str, tuple[bytes, str]]:
    return {
        "coffee.png": (_encode(photo("coffee"), "PNG"), "a cup of coffee"),
        "rocket.jpg": (_encode(photo("rocket"), "JPEG", quality=90), "a rocket on the launch pad"),
        "noise.jpg": (_encode(generated("noise"), "JPEG", quality=90), "random noise"),
        "gradient.png": (_encode(generated("gradient"), "PNG"), "a colour gradient"),
        "shapes.png": (_encode(generated("shapes", seed=3), "PNG"), "coloured rectangles"),
    }


def broken_images() -> dict[str, tuple[bytes, str]]:
    jpeg = _encode(astronaut(), "JPEG", quality=90)
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "a JPEG cut short"),
        "empty.jpg": (b"", "an empty file"),
        "not_an_image.jpg": (b"this is a text file, not a JPEG\n" * 10, "text with an image ending"),
        "bomb.png": (bomb_png(), "a PNG header claiming 40000 x 40000 pixels"),
    }


def write_folder(root: Path, images: dict[str, tuple[bytes, str]], sidecar: str = "txt") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, caption) in images.items():
        (root / name).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        if sidecar == "txt":
            (root / f"{stem}.txt").write_text(caption + "\n")
        else:
            (root / f"{stem}.json").write_text(json.dumps({"caption": caption}))


def write_webdataset(path: Path, images: dict[str, tuple[bytes, str]]) -> None:
    """A tar in img2dataset's layout: key.jpg + key.txt + key.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, (name, (data, caption)) in enumerate(images.items()):
            key = f"{i:09d}"
            ext = name.rsplit(".", 1)[1]
            meta = json.dumps({"key": key, "caption": caption, "url": f"https://example.invalid/{name}",
                               "status": "success"}).encode()
            for member, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))


def write_parquet_bytes(path: Path, images: dict[str, tuple[bytes, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image": pa.array([d for d, _ in images.values()], pa.binary()),
        "caption": [c for _, c in images.values()],
        "name": list(images),
    })
    pq.write_table(table, path)


def write_parquet_paths(path: Path, images: dict[str, tuple[bytes, str]]) -> None:
    """Parquet holding paths (relative to the Parquet file) to images written beside it."""
    files = path.parent / "files"
    files.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in images.items():
        (files / name).write_bytes(data)
    table = pa.table({"image_path": [f"files/{n}" for n in images] + ["files/missing.jpg"],
                      "text": [c for _, c in images.values()] + ["a path that does not exist"]})
    pq.write_table(table, path)


def write_example_data(root: str | Path) -> dict[str, int]:
    """Write the example sources under root; returns the number of records per source."""
    root = Path(root)
    faces, others, broken = face_images(), non_face_images(), broken_images()
    write_folder(root / "folder", {**faces, **others, **broken})
    wds = {k: faces[k] for k in ("astronaut.png", "astronaut_pair.jpg")} | {"rocket.jpg": others["rocket.jpg"]}
    write_webdataset(root / "webdataset" / "00000.tar", wds)
    write_parquet_bytes(root / "parquet" / "bytes.parquet",
                        {k: faces[k] for k in ("astronaut_tilted.jpg", "astronaut_exif.jpg")} | {"noise.jpg": others["noise.jpg"]})
    write_parquet_paths(root / "paths" / "paths.parquet",
                        {"astronaut_webp.webp": faces["astronaut_webp.webp"], "coffee.png": others["coffee.png"]})
    return {"folder": len(faces) + len(others) + len(broken), "webdataset": len(wds), "parquet_bytes": 3,
            "parquet_paths": 3}
