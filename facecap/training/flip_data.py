"""Stream a release's train or test split into FLIP batches.

Where the split comes from, first match wins:
1. split files: ``RELEASE/data/train-*.parquet`` / ``test-*.parquet``;
2. a ``split`` column in ``RELEASE/data/*.parquet``;
3. a deterministic hash of ``image_id`` (the source image), so the faces of one
   image never straddle train and test; the test share is
   ``quality.test_fraction``.
If the release has no Parquet data, WebDataset tars under RELEASE (``*.tar``,
``key.jpg`` + ``key.txt``/``key.json``) are read, split by a ``train``/``test``
prefix in the tar name, else by the same hash of the key.

Text: ``caption`` if the release has it (captions issue), else
``source_caption``; rows without text are skipped and counted.

Nothing holds the split in memory: a Parquet row group (or a tar) is the unit
read. The epoch order is fixed by (seed, epoch): row groups in a shuffled order,
rows shuffled inside each. Batch *b* of that order always holds the same
samples and the same augmentation (its random generator is seeded by seed,
epoch and b), whichever worker builds it. Rank ``b % world`` trains on global
batch b; within a rank, DataLoader workers take turns, which is the order the
DataLoader returns them in. So a position is just (epoch, batches done), and
resuming at it reproduces the rest of the epoch exactly. The price: every
worker reads the text column of every row group (cheap) and the image column of
the row groups its batches touch.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError, ImageLimits
from facecap.schema import image_bytes
from facecap.sources.images import probe

TEXT_COLUMNS = ("caption", "source_caption")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# ViT's default preprocessing (google/vit-*): scale to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def in_test_split(image_id: str, test_fraction: float) -> bool:
    """Deterministic split by source image: the same id always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


def release_fingerprint(release_dir: str) -> str:
    """Content hash of a release: release.json plus the names and sizes of its data files (cheap, no data read)."""
    digest = hashlib.sha256()
    manifest = os.path.join(release_dir, "release.json")
    if os.path.isfile(manifest):
        with open(manifest, "rb") as fh:
            digest.update(fh.read())
    for path in _data_files(release_dir) + _tar_files(release_dir):
        digest.update(f"{os.path.relpath(path, release_dir)}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _data_files(release_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(release_dir, "data", "*.parquet")))


def _tar_files(release_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(release_dir, "**", "*.tar"), recursive=True))


@dataclass(frozen=True)
class Piece:
    """The unit read at once: one Parquet row group, or one tar."""

    path: str
    row_group: int  # -1 for a tar
    split_by: str  # "file" (the whole piece is in the split), "column", "hash"


@dataclass
class SplitStats:
    rows: int = 0  # rows of this split with text
    no_text: int = 0  # rows of this split skipped because they have no caption
    text_column: str | None = None
    split_source: str = ""  # how the split was decided
    has_attributes: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReleaseSplit:
    """The pieces and row filter that make one split of a release."""

    def __init__(self, release_dir: str, split: str, test_fraction: float):
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, not {split!r}")
        self.release_dir = release_dir
        self.split = split
        self.test_fraction = test_fraction
        if not os.path.isdir(release_dir):
            raise ConfigError(f"{release_dir} is not a directory: give a release directory (OUT/release of curate)")
        files = _data_files(release_dir)
        self.format = "parquet" if files else "webdataset"
        self.pieces: list[Piece] = []
        self.stats = SplitStats()
        if files:
            named = [f for f in files if os.path.basename(f).startswith(("train-", "test-"))]
            if named:
                chosen = [f for f in named if os.path.basename(f).startswith(f"{split}-")]
                self.stats.split_source = "split files"
                split_by = "file"
            else:
                chosen = files
                schema = pq.read_schema(files[0])
                split_by = "column" if "split" in schema.names else "hash"
                self.stats.split_source = ("split column" if split_by == "column"
                                           else f"hash of image_id (test share {test_fraction})")
            schema = pq.read_schema(chosen[0]) if chosen else pq.read_schema(files[0])
            self.text_column = next((c for c in TEXT_COLUMNS if c in schema.names), None)
            if self.text_column is None or "image" not in schema.names:
                raise ConfigError(f"{release_dir}/data has no image and caption/source_caption columns: "
                                  "is it a FaceCap release?")
            self.has_attributes = "attributes" in schema.names or "attribute_probs" in schema.names
            self.id_column = "image_id" if "image_id" in schema.names else "sample_id"
            for path in chosen:
                for rg in range(pq.ParquetFile(path).num_row_groups):
                    self.pieces.append(Piece(path, rg, split_by))
        else:
            tars = _tar_files(release_dir)
            if not tars:
                raise ConfigError(f"{release_dir} holds no data/*.parquet and no WebDataset *.tar: "
                                  "give a release directory (OUT/release of curate)")
            named = [t for t in tars if os.path.basename(t).startswith(("train", "test"))]
            if named:
                self.pieces = [Piece(t, -1, "file") for t in named if os.path.basename(t).startswith(split)]
                self.stats.split_source = "split tar names"
            else:
                self.pieces = [Piece(t, -1, "hash") for t in tars]
                self.stats.split_source = f"hash of sample key (test share {test_fraction})"
            self.text_column = "txt"
            self.has_attributes = False
            self.id_column = "key"
        self.stats.text_column = self.text_column
        self.stats.has_attributes = self.has_attributes

    # -- reading -----------------------------------------------------------
    def _keep(self, piece: Piece, ids: list, splits: list | None) -> np.ndarray:
        if piece.split_by == "file":
            return np.ones(len(ids), dtype=bool)
        if piece.split_by == "column":
            return np.array([s == self.split for s in splits], dtype=bool)
        want_test = self.split == "test"
        return np.array([in_test_split(str(i), self.test_fraction) == want_test for i in ids], dtype=bool)

    def valid_rows(self, piece: Piece) -> tuple[np.ndarray, int]:
        """Row numbers of the piece that are in this split and have text; and how many in-split rows had none."""
        if piece.row_group < 0:
            samples = list(_tar_samples(piece.path, with_images=False))
            ids = [s["key"] for s in samples]
            texts = [s.get("txt") for s in samples]
            keep = self._keep(piece, ids, None)
        else:
            cols = [self.text_column, self.id_column] + (["split"] if piece.split_by == "column" else [])
            table = pq.ParquetFile(piece.path).read_row_group(piece.row_group, columns=cols)
            texts = table.column(self.text_column).to_pylist()
            ids = table.column(self.id_column).to_pylist()
            splits = table.column("split").to_pylist() if piece.split_by == "column" else None
            keep = self._keep(piece, ids, splits)
        has_text = np.array([bool(t and t.strip()) for t in texts], dtype=bool)
        return np.flatnonzero(keep & has_text), int((keep & ~has_text).sum())

    def read_rows(self, piece: Piece, rows: np.ndarray, with_attributes: bool = False) -> list[dict[str, Any]]:
        """The image bytes, text and id (and attribute labels) of the given rows of a piece."""
        if piece.row_group < 0:
            wanted = set(int(r) for r in rows)
            by_row = {i: s for i, s in enumerate(_tar_samples(piece.path, with_images=True)) if i in wanted}
            return [{"image": by_row[int(r)].get("image"), "text": by_row[int(r)]["txt"],
                     "sample_id": by_row[int(r)]["key"]} for r in rows]
        cols = ["image", self.text_column, "sample_id"]
        schema_names = pq.ParquetFile(piece.path).schema_arrow.names
        attr_col = None
        if with_attributes:
            attr_col = "attributes" if "attributes" in schema_names else (
                "attribute_probs" if "attribute_probs" in schema_names else None)
            if attr_col:
                cols.append(attr_col)
        table = pq.ParquetFile(piece.path).read_row_group(piece.row_group, columns=cols)
        table = table.take(pa.array(rows, type=pa.int64()))
        out = []
        images = [image_bytes(v) for v in table.column("image").to_pylist()]
        texts = table.column(self.text_column).to_pylist()
        ids = table.column("sample_id").to_pylist()
        attrs = table.column(attr_col).to_pylist() if attr_col else [None] * len(ids)
        for image, text, sid, attr in zip(images, texts, ids, attrs):
            row = {"image": image, "text": text, "sample_id": sid}
            if attr_col:
                row["labels"] = attribute_labels(attr, attr_col)
            out.append(row)
        return out

    def count(self) -> SplitStats:
        """Rows with text in this split (reads only the text and id columns)."""
        rows = no_text = 0
        for piece in self.pieces:
            valid, skipped = self.valid_rows(piece)
            rows += len(valid)
            no_text += skipped
        self.stats.rows, self.stats.no_text = rows, no_text
        return self.stats


def attribute_labels(value, column: str) -> list[float]:
    """40 binary labels in CelebA order from the kept attribute names, or from probabilities (> 0.5)."""
    if value is None:
        return [float("nan")] * len(ATTRIBUTES)
    if column == "attributes":
        names = set(value)
        return [1.0 if a in names else 0.0 for a in ATTRIBUTES]
    return [1.0 if p > 0.5 else 0.0 for p in value]


def _tar_samples(path: str, with_images: bool) -> Iterator[dict[str, Any]]:
    """WebDataset samples of a tar in member order: key, txt (caption), image bytes."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            key, _, ext = name.rpartition(".")
            ext = "." + ext.lower()
            if current is None or current["key"] != key:
                if current is not None:
                    yield current
                current = {"key": key, "txt": None}
            if ext == ".txt":
                current["txt"] = tar.extractfile(member).read().decode("utf-8", "replace")
            elif ext == ".json" and current["txt"] is None:
                try:
                    meta = json.loads(tar.extractfile(member).read())
                    current["txt"] = meta.get("caption") or meta.get("text")
                except (ValueError, AttributeError):
                    pass
            elif ext in IMAGE_EXTENSIONS and with_images:
                current["image"] = tar.extractfile(member).read()
    if current is not None:
        yield current


# -- image preprocessing -------------------------------------------------
def load_image(data: bytes | None, size: int, limits: ImageLimits, rng: random.Random | None,
               augment: bool) -> np.ndarray | None:
    """Decode (bounded by image limits), optionally random-resized-crop and flip, resize to size x size.

    Returns float32 CHW normalised to [-1, 1], or None for an image that cannot be decoded.
    """
    if not probe(data, limits).ok:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                # JPEG draft decoding at reduced scale: a 1000 px crop for a 224 px input decodes 4x faster.
                im.draft("RGB", (size * 2, size * 2))
                im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception:
        return None
    if augment and rng is not None:
        im = _random_resized_crop(im, size, rng)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return ((arr - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)


def _random_resized_crop(im: Image.Image, size: int, rng: random.Random,
                         scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return im.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
    return im.resize((size, size), Image.Resampling.BICUBIC)


# -- the dataset -----------------------------------------------------------
@dataclass
class LoaderPosition:
    """Where training is in the data: epoch and batches this rank has consumed in it."""

    epoch: int = 0
    batches_done: int = 0


@dataclass
class FlipBatches(IterableDataset):
    """Ready batches of one split (use with ``DataLoader(batch_size=None)``)."""

    split: ReleaseSplit
    batch_size: int
    image_size: int
    max_text_tokens: int
    tokenizer_ref: str | None
    limits: ImageLimits
    seed: int = 0
    augment: bool = False
    shuffle: bool = False
    drop_last: bool = False
    with_attributes: bool = False
    rank: int = 0
    world_size: int = 1
    position: LoaderPosition = field(default_factory=LoaderPosition)
    _tokenizer: Any = None

    def __post_init__(self):
        super().__init__()
        if self.split.stats.rows == 0 and self.split.pieces:
            self.split.count()

    # Number of batches this rank sees per epoch (the same on every rank, so DDP never waits on a missing one).
    def batches_per_epoch(self) -> int:
        rows = self.split.stats.rows
        if self.drop_last:
            return rows // (self.batch_size * self.world_size)
        return -(-rows // (self.batch_size * self.world_size))

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.position.batches_done, 0)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # each worker loads its own
        return state

    def tokenizer(self):
        if self._tokenizer is None:
            from facecap.models.flip import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_ref)
        return self._tokenizer

    def _epoch_pieces(self) -> list[Piece]:
        pieces = list(self.split.pieces)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.position.epoch}:pieces").shuffle(pieces)
        return pieces

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        per_rank = self.batches_per_epoch()
        start = self.position.batches_done
        b_size, world = self.batch_size, self.world_size
        limit = per_rank * world * b_size  # samples of the epoch that are used

        def mine(global_batch: np.ndarray) -> np.ndarray:
            local = global_batch // world
            return ((global_batch % world == self.rank) & (local >= start) & (local < per_rank)
                    & ((local - start) % n_workers == worker))

        pending: dict[int, list] = {}
        pos = 0
        for piece in self._epoch_pieces():
            if pos >= limit:
                break
            rows, _ = self.split.valid_rows(piece)
            if self.shuffle:
                rng = random.Random(f"{self.seed}:{self.position.epoch}:{piece.path}:{piece.row_group}")
                rows = rows.copy()
                rng.shuffle(rows)
            positions = pos + np.arange(len(rows))
            batches = positions // b_size
            select = mine(batches) & (positions < limit)
            pos += len(rows)
            if not select.any():
                continue
            samples = self.split.read_rows(piece, rows[select], self.with_attributes)
            for b, sample in zip(batches[select], samples):
                pending.setdefault(int(b), []).append(sample)
            # A batch is complete once the order has passed its end (all its samples are this worker's).
            for b in sorted(pending):
                if pos >= min((b + 1) * b_size, limit):
                    yield self._make_batch(b, pending.pop(b))
        for b in sorted(pending):  # the last, short batch when drop_last is off
            yield self._make_batch(b, pending.pop(b))

    def _make_batch(self, global_batch: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.position.epoch}:{global_batch}:augment")
        pixels, texts, ids, labels, bad = [], [], [], [], 0
        for s in samples:
            arr = load_image(s["image"], self.image_size, self.limits, rng, self.augment)
            if arr is None:
                bad += 1  # counted and reported; the batch is one sample shorter
                continue
            pixels.append(arr)
            texts.append(s["text"])
            ids.append(s["sample_id"])
            if self.with_attributes:
                labels.append(s.get("labels"))
        tok = self.tokenizer()(texts, padding="max_length", truncation=True, max_length=self.max_text_tokens,
                               return_tensors="pt") if texts else None
        size = self.image_size
        batch = {
            "pixel_values": torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, 3, size, size),
            "input_ids": tok["input_ids"] if tok is not None else torch.zeros(0, self.max_text_tokens, dtype=torch.long),
            "attention_mask": tok["attention_mask"] if tok is not None else torch.zeros(0, self.max_text_tokens,
                                                                                           dtype=torch.long),
            "sample_ids": ids,
            "texts": texts,
            "bad_images": bad,
            "epoch": self.position.epoch,
            "local_batch": global_batch // self.world_size,
        }
        if self.with_attributes:
            batch["labels"] = torch.tensor(labels, dtype=torch.float32) if labels else torch.zeros(0, len(ATTRIBUTES))
        return batch


def make_loader(dataset: FlipBatches, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ready batches. Its own seed generator: creating it never draws from the global RNG,
    so a resumed run's random stream matches an uninterrupted one."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = min(num_workers, max(len(dataset), 0))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(dataset.seed),
        persistent_workers=False, prefetch_factor=4 if workers else None)
