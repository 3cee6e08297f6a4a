"""Raw images into image records (checked, captions cleaned) and rejects, in bounded batches."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from facecap.settings import ImageLimits
from facecap.schema import IMAGE_SCHEMA, Reason, image_id_for, reject_rows
from facecap.sources.captions import clean_caption, text_too_large
from facecap.sources.images import probe
from facecap.sources.raw import Raw, RawReject, TooLarge, fingerprint_bytes
from facecap.sources.spec import ShardSpec

BATCH_ROWS = 64  # records per batch: bounds memory whatever the shard size


@dataclass
class Batch:
    """Image records and rejects of one batch, and what was counted reading them."""

    kept: pa.Table | None = None
    rejected: pa.Table | None = None
    rows_in: int = 0
    extra: Counter = field(default_factory=Counter)  # bytes read, captions decoded or cleaned


class ImageBatcher:
    """Accumulates image records and rejects; emits bounded batches.

    Records of local sources hold a reference (source, offset, size,
    fingerprint), not the bytes; downloads keep their bytes (`keep_bytes`),
    since those are the only copy.
    """

    def __init__(self, spec: ShardSpec, limits: ImageLimits, keep_bytes: bool = False):
        self.spec, self.limits, self.keep_bytes = spec, limits, keep_bytes
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.counts = Batch()  # rows_in and extra since the last flush

    def reject(self, offset: str | None, reason: str, detail: str, counted: bool = True) -> None:
        if counted:
            self.counts.rows_in += 1
        self.rejects.append({
            "stage": "ingest", "reason": reason, "detail": detail, "source": self.spec.source,
            "source_offset": offset, "image_id": image_id_for(self.spec.source, offset) if offset is not None else None,
        })

    def take(self, item: Raw | RawReject) -> None:
        if isinstance(item, RawReject):
            self.reject(item.offset, item.reason, item.detail)
        else:
            self.add(item.offset, item.data, item.caption, item.meta, item.caption_encoding)

    def add(self, offset: str, data: bytes | TooLarge | None, caption: str | TooLarge | None,
            meta: str | TooLarge | None, caption_encoding: str | None = None) -> None:
        if isinstance(data, TooLarge):
            self.reject(offset, Reason.TOO_LARGE, f"{data.size} bytes > image.max_bytes={self.limits.max_bytes} (not read)")
            return
        for what, text in (("caption", caption), ("source_meta", meta)):
            too_large = text_too_large(what, text)
            if too_large:
                self.reject(offset, Reason.TOO_LARGE, too_large)
                return
        p = probe(data, self.limits)
        if not p.ok:
            self.reject(offset, p.reason, p.detail)
            return
        caption, removed = clean_caption(caption)
        if removed:
            self.counts.extra["caption_control_chars_removed"] += removed
        if caption_encoding:
            self.counts.extra[f"captions_decoded_{caption_encoding}"] += 1
        self.counts.rows_in += 1
        self.counts.extra["source_bytes"] += len(data)
        self.rows.append({
            "image_id": image_id_for(self.spec.source, offset), "source": self.spec.source, "source_offset": offset,
            "source_caption": caption, "source_caption_encoding": caption_encoding if caption is not None else None,
            "source_caption_chars_removed": removed if caption is not None else None,
            "source_meta": meta, "source_width": p.width, "source_height": p.height,
            "source_format": p.format, "source_size": len(data), "source_fingerprint": fingerprint_bytes(data),
            "source_image": data if self.keep_bytes else None,
        })

    def ready(self) -> bool:
        return len(self.rows) + len(self.rejects) >= BATCH_ROWS

    def flush(self) -> Batch:
        batch = self.counts
        batch.kept = pa.Table.from_pylist(self.rows, schema=IMAGE_SCHEMA) if self.rows else None
        batch.rejected = reject_rows(self.rejects) if self.rejects else None
        self.rows, self.rejects, self.counts = [], [], Batch()
        return batch
