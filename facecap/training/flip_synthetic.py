"""A small, learnable image-caption release for tests, smoke runs and the benchmark.

Each image shows one coloured shape on a noisy grey background at a random
position and size; its caption names the colour and the shape. The test split
has one face per colour (shapes vary), so its captions are unique and a model
that learns colour alone already retrieves far above chance; tiny random-init
models learn colour within a few dozen steps, shape much later. The `attributes`
column maps colour and shape onto CelebA names only so the attribute probe has
labels to fit: the names mean nothing here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# Stand-in labels for the probe (see the module docstring).
_COLOUR_ATTRIBUTES = {"red": "Smiling", "green": "Eyeglasses", "blue": "Male", "yellow": "Young",
                      "purple": "Smiling", "orange": "Eyeglasses", "white": "Male", "black": "Young"}
_SHAPE_ATTRIBUTES = {"circle": "Bangs", "square": "Wearing_Hat", "triangle": "Goatee"}


def classes() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def draw_sample(colour: str, shape: str, rng: random.Random, size: int = 48) -> bytes:
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (size, size, 3))
    base = np.clip(128 + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(base)
    draw = ImageDraw.Draw(im)
    side = rng.randint(size // 2, size - 8)
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    fill = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _rows(pairs: list[tuple[str, str]], rng: random.Random, prefix: str, size: int = 48) -> list[dict]:
    rows = []
    for i, (colour, shape) in enumerate(pairs):
        if True:
            image_id = hashlib.sha256(f"{prefix}:{colour}:{shape}:{i}".encode()).hexdigest()[:16]
            rows.append({
                "sample_id": f"{image_id}-00", "image_id": image_id,
                "image": draw_sample(colour, shape, rng, size),
                "caption": f"a {colour} {shape} on a grey background",
                "source_caption": f"{colour} {shape}",
                "attributes": [_COLOUR_ATTRIBUTES[colour], _SHAPE_ATTRIBUTES[shape]],
            })
    return rows


def write_synthetic_release(release_dir: str, train_per_class: int = 8, layout: str = "split-files", seed: int = 0,
                            row_group_size: int = 64, no_text_rows: int = 0, image_size: int = 48,
                            attributes: bool = True) -> dict:
    """Write RELEASE/data + release.json: train_per_class faces of every colour x shape, one test face per colour.

    layout: split-files (data/train-*, data/test-*), split-column (a `split` column) or unsplit (no split info).
    no_text_rows: extra train rows with an empty caption (the loader must skip and count them).
    """
    rng = random.Random(seed)
    train = _rows(classes() * train_per_class, rng, "train", image_size)
    test = _rows([(c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS)], rng, "test", image_size)
    if not attributes:  # a release curated with the attribute stage off
        for row in train + test:
            del row["attributes"]
    counts = {"train": len(train), "test": len(test), "no_text": no_text_rows}
    for row in _rows(classes()[:no_text_rows], rng, "notext"):
        train.append({**row, "caption": "", "source_caption": None})
    rng.shuffle(train)
    data = os.path.join(release_dir, "data")
    os.makedirs(data, exist_ok=True)

    def write(rows: list[dict], name: str, extra: dict | None = None) -> None:
        table = pa.Table.from_pylist([{**r, **(extra(r) if extra else {})} for r in rows])
        pq.write_table(table, os.path.join(data, name), row_group_size=row_group_size)

    if layout == "split-files":
        write(train, "train-00000.parquet")
        write(test, "test-00000.parquet")
    elif layout == "split-column":
        tagged = [{**r, "split": "train"} for r in train] + [{**r, "split": "test"} for r in test]
        write(tagged, "part-00000.parquet")
    elif layout == "unsplit":
        write(train + test, "part-00000.parquet")
    else:
        raise ValueError(f"unknown layout {layout}")
    manifest = {"records": len(train) + len(test), "synthetic": True, "layout": layout, "seed": seed}
    with open(os.path.join(release_dir, "release.json"), "w") as fh:
        json.dump(manifest, fh)
    return counts
