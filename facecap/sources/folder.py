"""Folders of images, with optional ``stem.txt`` (caption) and ``stem.json`` (metadata) sidecars."""

from __future__ import annotations

import posixpath
from typing import Iterator

from facecap import storage
from facecap.settings import ImageLimits, IngestSettings
from facecap.schema import Reason
from facecap.sources.captions import MAX_TEXT_BYTES, caption_from_meta, sidecar_text
from facecap.sources.raw import Raw, RawReject, read_bounded
from facecap.sources.spec import ShardSpec


def read_folder(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                 with_text: bool) -> Iterator[Raw | RawReject]:
    fs, root = storage.filesystem(spec.source)
    sidecars = set(spec.sidecars) if with_text else set()
    limit = limits.max_bytes
    for rel in spec.members:
        stem = rel.rsplit(".", 1)[0]
        try:
            data = read_bounded(fs, posixpath.join(root, rel), limit)
            meta, meta_encoding = sidecar_text(read_bounded(fs, posixpath.join(root, stem + ".json"), MAX_TEXT_BYTES,
                                                      f"metadata sidecar {stem}.json")) \
                if stem + ".json" in sidecars else (None, None)
            caption, encoding = sidecar_text(read_bounded(fs, posixpath.join(root, stem + ".txt"), MAX_TEXT_BYTES,
                                                    f"caption sidecar {stem}.txt")) \
                if stem + ".txt" in sidecars else (None, None)
        except FileNotFoundError:
            yield RawReject(rel, Reason.MISSING_FILE, "file disappeared after planning")
        except OSError as exc:
            yield RawReject(rel, Reason.UNREADABLE_MEMBER, f"{type(exc).__name__}: {exc}"[:300])
        else:
            if caption is None:
                caption, encoding = caption_from_meta(meta), meta_encoding
            yield Raw(rel, data, caption, meta, encoding)
