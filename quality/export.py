"""Export a release as WebDataset tar shards: key.jpg + key.txt (caption) + key.json (metadata).

The layout img2dataset writes and open_clip's `--train-data` reads: one
tar per N samples, `{split}-000000.tar`..., plus `sizes.json` (samples per
tar, which open_clip reads for `--train-num-samples`). Tars are written
deterministically (fixed mtime/owner, release order) and atomically.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from typing import Callable, Iterator

import pyarrow.parquet as pq

from facecap import storage
from facecap.settings import ConfigError
from facecap.schema import image_bytes

CAPTION_COLUMNS = ("caption", "source_caption")  # the first one present is key.txt


def _release_files(release_dir: str, split: str) -> list[str]:
    pattern = "*.parquet" if split == "all" else f"{split}-*.parquet"
    return sorted(glob.glob(os.path.join(release_dir, "data", pattern)))


def _records(files: list[str]) -> Iterator[dict]:
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512):
            yield from batch.to_pylist()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(release_dir: str, out: str, samples_per_shard: int = 10_000, splits: tuple[str, ...] = ("train", "test"),
                      log: Callable[[str], None] = print) -> dict[str, dict]:
    """Write OUT/{split}-NNNNNN.tar for each split; return per split: shards, samples, brace pattern."""
    if not os.path.isfile(os.path.join(release_dir, "release.json")):
        raise ConfigError(f"{release_dir} is not a FaceCap release (no release.json)")
    if samples_per_shard < 1:
        raise ConfigError("--samples-per-shard must be at least 1")
    os.makedirs(out, exist_ok=True)
    sizes: dict[str, int] = {}
    summary: dict[str, dict] = {}
    for split in splits:
        files = _release_files(release_dir, split)
        if not files and split == "train":
            files = _release_files(release_dir, "all")  # a release from before splits: everything is train
        if not files:
            continue
        names = pq.ParquetFile(files[0]).schema_arrow.names
        if "image" not in names:
            raise ConfigError(f"{files[0]} has no image column: nothing to export")
        caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        shard, count, empty, tar, tmp = -1, 0, 0, None, None
        for rec in _records(files):
            if count % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, tmp[:-4])
                shard += 1
                name = f"{split}-{shard:06d}.tar"
                tmp = os.path.join(out, name + ".tmp")
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
                sizes[name] = 0
            key = str(rec["sample_id"]).replace(".", "_")  # WebDataset splits keys at the first dot
            caption = (rec.get(caption_col) or "") if caption_col else ""
            empty += not caption.strip()
            image = image_bytes(rec.pop("image"))
            meta = {k: v for k, v in rec.items()}
            _member(tar, f"{key}.jpg", image)
            _member(tar, f"{key}.txt", caption.encode())
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
            sizes[f"{split}-{shard:06d}.tar"] += 1
            count += 1
            if count % 50_000 == 0:
                log(f"export {split}: {count:,} samples, {shard + 1} tar(s)")
        if tar is not None:
            tar.close()
            os.replace(tmp, tmp[:-4])
        pattern = os.path.join(out, f"{split}-{{000000..{shard:06d}}}.tar")
        summary[split] = {"shards": shard + 1, "samples": count, "pattern": pattern, "caption_column": caption_col,
                          "empty_captions": empty}
        log(f"export {split}: {count:,} samples in {shard + 1} tar(s): {pattern} (captions from {caption_col})"
            + (f"; {empty:,} samples have an empty caption" if empty else ""))
    storage.write_json_atomic(os.path.join(out, "sizes.json"), sizes)
    return summary
