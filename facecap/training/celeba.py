"""CelebA-format attribute data: the official layout and Parquet mirrors, read lazily.

Official layout (what the CelebA site distributes)::

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt        count, the 40 names, then "000001.jpg  -1  1 ..." (1 / -1)
    ROOT/list_eval_partition.txt     "000001.jpg 0" (0 train, 1 validation, 2 test)

Parquet (the layout of public CelebA-with-attributes mirrors on the Hugging
Face hub): a file or a folder of files with an image column (bytes, or
``{bytes, path}`` structs as ``datasets`` writes them) and the 40 attribute
columns (bool, 0/1 or -1/1). A ``split``/``partition`` column is used when
present; otherwise a deterministic share of images, chosen by content hash, is
held out.

Labels are read up front (40 bytes per image); image bytes are read only when
an item is fetched, a Parquet row group at a time.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError

TRAIN, VALID, TEST = "train", "valid", "test"
_PARTITIONS = {"0": TRAIN, "1": VALID, "2": TEST, "train": TRAIN, "training": TRAIN, "valid": VALID,
               "validation": VALID, "val": VALID, "test": TEST}
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_bytes")
_SPLIT_COLUMNS = ("split", "partition", "eval_partition")


@dataclass
class CelebAData:
    """Images (lazily readable) and their 40 labels (0/1, CelebA order), with a split per image."""

    description: str
    labels: np.ndarray  # (n, 40) uint8
    splits: np.ndarray  # (n,) of TRAIN / VALID / TEST
    _read: object = field(repr=False)  # index -> encoded image bytes
    blocks: np.ndarray | None = None  # (n,) Parquet row group per image: shuffles stay within blocks

    def __len__(self) -> int:
        return len(self.labels)

    def image_bytes(self, index: int) -> bytes:
        return self._read(index)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def load_celeba(path: str | Path, held_out_fraction: float = 0.1) -> CelebAData:
    """Read CelebA-format data at `path` (either layout); ConfigError says what is wrong."""
    root = Path(path).expanduser()
    if celeba_layout(root) == "official":
        return _load_official(root)
    return _load_parquet(root, held_out_fraction)


def celeba_layout(path: str | Path) -> str:
    """"official" or "parquet" (without reading the data); ConfigError if neither."""
    root = Path(path).expanduser()
    if root.is_dir() and (root / "list_attr_celeba.txt").is_file():
        return "official"
    if root.is_file() and root.suffix == ".parquet" or root.is_dir() and any(root.rglob("*.parquet")):
        return "parquet"
    raise ConfigError(
        f"{root} is not CelebA-format data: expected either a folder with img_align_celeba/, "
        "list_attr_celeba.txt and list_eval_partition.txt (the official layout), or Parquet file(s) with an image "
        "column and the 40 attribute columns")


def _load_official(root: Path) -> CelebAData:
    attr_file, images = root / "list_attr_celeba.txt", root / "img_align_celeba"
    if not images.is_dir():
        raise ConfigError(f"{root}: img_align_celeba/ is missing (unpack img_align_celeba.zip there)")
    lines = attr_file.read_text().splitlines()
    try:
        count, names = int(lines[0].strip()), lines[1].split()
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"{attr_file}: first line must be the image count, second the 40 names") from exc
    if names != list(ATTRIBUTES):
        raise ConfigError(f"{attr_file}: the attribute names must be CelebA's 40, in CelebA order")
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 41 or any(v not in ("1", "-1") for v in parts[1:]):
            raise ConfigError(f"{attr_file}:{number}: expected a file name and 40 values of 1 or -1")
        files.append(parts[0])
        rows.append([v == "1" for v in parts[1:]])
    if len(files) != count:
        raise ConfigError(f"{attr_file}: header says {count} images, found {len(files)} rows")
    partition_file = root / "list_eval_partition.txt"
    if not partition_file.is_file():
        raise ConfigError(f"{root}: list_eval_partition.txt is missing (it defines the held-out split)")
    partition = dict(line.split()[:2] for line in partition_file.read_text().splitlines() if line.strip())
    missing = [f for f in files if f not in partition]
    if missing:
        raise ConfigError(f"{partition_file}: no partition for {len(missing)} image(s), e.g. {missing[0]}")
    splits = np.array([_PARTITIONS.get(partition[f], "?") for f in files])
    if (splits == "?").any():
        raise ConfigError(f"{partition_file}: partitions must be 0 (train), 1 (validation) or 2 (test)")

    return CelebAData(f"CelebA official layout at {root} ({len(files)} images)",
                      np.asarray(rows, dtype=np.uint8), splits, _FileImages(images, files))


class _FileImages:
    """Reads one image file by index (a class, not a closure: DataLoader workers receive it pickled)."""

    def __init__(self, folder: Path, files: list[str]):
        self.folder, self.files = folder, files

    def __call__(self, index: int) -> bytes:
        return (self.folder / self.files[index]).read_bytes()


def _label_values(column: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False)
    if values.dtype == bool:
        return values.astype(np.uint8)
    try:
        values = values.astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: column {name} must hold bool, 0/1 or -1/1 values") from exc
    if not np.isin(values, (-1, 0, 1)).all():
        raise ConfigError(f"{where}: column {name} must hold bool, 0/1 or -1/1 values")
    return (values == 1).astype(np.uint8)


class _ParquetImages:
    """Reads one image by global index, keeping the last row group's image column in memory."""

    def __init__(self, locations: list[tuple[Path, int, int]], column: str):
        self.locations, self.column = locations, column
        self._key, self._values = None, None

    def __call__(self, index: int) -> bytes:
        file, group, row = self.locations[index]
        if self._key != (file, group):
            table = pq.ParquetFile(file).read_row_group(group, columns=[self.column])
            self._values, self._key = table.column(0).to_pylist(), (file, group)
        value = self._values[row]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path") and (file.parent / value["path"]).is_file():
                return (file.parent / value["path"]).read_bytes()
            raise ConfigError(f"{file}: row group {group} row {row} has no image bytes")
        if isinstance(value, str):
            return (file.parent / value).read_bytes()
        return value

    def __getstate__(self):  # DataLoader workers get the index, not a cached row group
        return {"locations": self.locations, "column": self.column, "_key": None, "_values": None}


def _load_parquet(root: Path, held_out_fraction: float) -> CelebAData:
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    labels, split_values, locations, blocks, image_column = [], [], [], [], None
    hashes: list[int] = []
    for file in files:
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        missing = [a for a in ATTRIBUTES if a not in names]
        if missing:
            raise ConfigError(f"{file}: missing attribute column(s) {', '.join(missing[:5])}"
                              f"{'...' if len(missing) > 5 else ''}; the 40 CelebA names are expected as columns")
        column = next((c for c in _IMAGE_COLUMNS if c in names), None)
        if column is None:
            raise ConfigError(f"{file}: no image column (one of {', '.join(_IMAGE_COLUMNS)})")
        image_column = image_column or column
        split_column = next((c for c in _SPLIT_COLUMNS if c in names), None)
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=list(ATTRIBUTES) + ([split_column] if split_column else []))
            labels.append(np.stack([_label_values(table.column(a), a, str(file)) for a in ATTRIBUTES], axis=1))
            n = table.num_rows
            if split_column:
                raw = [str(v).lower() for v in table.column(split_column).to_pylist()]
                bad = sorted({v for v in raw if v not in _PARTITIONS})
                if bad:
                    raise ConfigError(f"{file}: {split_column} values {bad[:3]} are not train/valid/test or 0/1/2")
                split_values.extend(_PARTITIONS[v] for v in raw)
            else:
                split_values.extend([None] * n)
                # The held-out choice depends on the image's content only: stable across file order and reruns.
                images = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
                for value in images:
                    data = value.get("bytes") if isinstance(value, dict) else value
                    digest = hashlib.blake2b(data if isinstance(data, bytes) else str(data).encode(), digest_size=8)
                    hashes.append(int.from_bytes(digest.digest(), "big"))
            locations.extend((file, group, row) for row in range(n))
            blocks.extend([_block_id(file, group)] * n)
    splits = np.empty(len(locations), dtype=object)
    hash_iter = iter(hashes)
    for i, value in enumerate(split_values):
        if value is None:
            value = VALID if (next(hash_iter) % 10_000) < held_out_fraction * 10_000 else TRAIN
        splits[i] = value
    block_ids = {b: i for i, b in enumerate(dict.fromkeys(blocks))}
    return CelebAData(f"CelebA Parquet at {root} ({len(locations)} images in {len(files)} file(s))",
                      np.concatenate(labels).astype(np.uint8) if labels else np.zeros((0, 40), np.uint8),
                      splits.astype(str), _ParquetImages(locations, image_column),
                      np.array([block_ids[b] for b in blocks]))


def _block_id(file: Path, group: int) -> str:
    return f"{file}#{group}"


def decode_image(data: bytes, max_pixels: int = 80_000_000):
    """Decode training image bytes to RGB, refusing oversized headers before any pixel is decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"{im.width}x{im.height} image exceeds image.max_pixels={max_pixels}")
        return im.convert("RGB")
