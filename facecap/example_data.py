"""Example sources built from photos that ship inside PyPI packages, plus generated images.

The people are the real photos of facecap.package_photos: NASA's portrait of
Eileen Collins (scikit-image), Franz Kafka's 1923 portrait, insightface's
six-person group photo, and its 112 px aligned face of Tom Hanks (a face too
small to keep). Their captions read like web alt-text: some about the face,
some noisy (HTML entities, camera file names, stock-site boilerplate), some
not about a face at all, so the FLIP-80M text path has something to keep, to
clean and to reject. Around them we build the cases a curation run meets:
copies of one photo in several containers, rotated, mirrored, rescaled and
multi-face images, non-face photos and generated images, broken files, and all
three source kinds (folder with sidecars, WebDataset tar, Parquet with bytes
and with paths). New records are appended to each container, so the offsets
of the older ones stay put.
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

ASTRONAUT_CAPTION = "Eileen Collins, NASA astronaut, smiling in her orange launch and entry suit"
# Distinct people whose faces the example data keeps (astronaut 1, Kafka 1, the group photo 6); Tom Hanks'
# 112 px face is too small to keep.
DISTINCT_PEOPLE = 8


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
    """A scikit-image sample photo (coffee, rocket...): the example data's non-face photos."""
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def _rescaled(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((round(img.width * factor), round(img.height * factor)), Image.LANCZOS)


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
                                 "NASA Space Shuttle mission STS-93 crew photo, 1999"),  # not about a face
        "astronaut_pair.jpg": (_encode(pair, "JPEG", quality=92), "the astronaut portrait next to its mirror image"),
        "astronaut_exif.jpg": (exif_rotated(face), "DSC01234.JPG"),  # a camera file name: nothing left once cleaned
        "astronaut_small.jpg": (_encode(face.resize((160, 160)), "JPEG", quality=92), "a thumbnail: face too small"),
        "astronaut_webp.webp": (_encode(face, "WEBP", quality=90), "the astronaut portrait as WebP"),
    }


def people_images() -> dict[str, tuple[bytes, str]]:
    """name -> (encoded image, alt-text) for the other people's photos, as the web serves them."""
    from facecap.package_photos import photo as packaged, photo_bytes

    group = packaged("group")
    return {
        "kafka.jpg": (photo_bytes("kafka"),
                      "Franz Kafka portrait, 1923: the writer with dark eyes and slicked-back hair | Stock Photo"),
        "kafka_small.jpg": (_encode(_rescaled(packaged("kafka"), 0.85), "JPEG", quality=80),
                            "&lt;b&gt;Franz Kafka&lt;/b&gt; black and white portrait photo, serious expression "
                            "- IMG_0412.jpg"),
        "group.jpg": (photo_bytes("group"), "Smiling colleagues: six friends pose for a group photo, happy faces"
                                            "&amp;nbsp;\\n Royalty Free Stock Photo"),
        "group_mirror.jpg": (_encode(group.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=85),
                             "Team building day at the office, summer 2019"),  # six faces, alt-text not about them
        "hanks.png": (photo_bytes("hanks"), "Tom Hanks headshot"),  # 112 px: too small to keep
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
    faces, others, broken, people = face_images(), non_face_images(), broken_images(), people_images()
    folder = {**faces, **others, **broken} | {k: people[k] for k in ("kafka.jpg", "group.jpg", "hanks.png")}
    write_folder(root / "folder", folder)
    wds = ({k: faces[k] for k in ("astronaut.png", "astronaut_pair.jpg")} | {"rocket.jpg": others["rocket.jpg"]}
           | {"kafka_small.jpg": people["kafka_small.jpg"]})
    write_webdataset(root / "webdataset" / "00000.tar", wds)
    parquet = ({k: faces[k] for k in ("astronaut_tilted.jpg", "astronaut_exif.jpg")} | {"noise.jpg": others["noise.jpg"]}
               | {"group_mirror.jpg": people["group_mirror.jpg"]})
    write_parquet_bytes(root / "parquet" / "bytes.parquet", parquet)
    write_parquet_paths(root / "paths" / "paths.parquet",
                        {"astronaut_webp.webp": faces["astronaut_webp.webp"], "coffee.png": others["coffee.png"]})
    return {"folder": len(folder), "webdataset": len(wds), "parquet_bytes": len(parquet), "parquet_paths": 3}
