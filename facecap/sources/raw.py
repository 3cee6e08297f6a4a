"""Raw images as readers find them, before any check, and bounded reads of files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TooLarge:
    """Stands in for a member or file that was not read because it exceeds image.max_bytes."""

    size: int
    what: str = "image"
    limit: int | None = None


@dataclass(frozen=True)
class Raw:
    """One image as a reader found it in its source, before any check."""

    offset: str
    data: bytes | TooLarge | None
    caption: str | TooLarge | None = None
    meta: str | TooLarge | None = None
    caption_encoding: str | None = None  # what the caption's bytes were decoded from, when not UTF-8


@dataclass(frozen=True)
class RawReject:
    """A record a reader could not read at all."""

    offset: str | None
    reason: str
    detail: str


def fingerprint_bytes(data: bytes) -> str:
    """What ingest records of an image's bytes, and what reading them again must match."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_bounded(fs, path: str, limit: int, what: str = "image") -> bytes | TooLarge:
    """Read a file unless it is larger than `limit` (then a TooLarge marker): never load a huge file.

    At most `limit` + 1 bytes are read whatever the size said, so a file that grew since, or one
    whose size the filesystem does not know, cannot be loaded whole either.
    """
    size = fs.size(path)
    if size is not None and size > limit:
        return TooLarge(size, what, limit)
    chunks, total = [], 0
    with fs.open(path, "rb") as fh:
        while total <= limit:  # in pieces: read(limit) would reserve `limit` bytes for every small file
            chunk = fh.read(min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        return TooLarge(size if size and size > limit else total, what, limit)
    return b"".join(chunks)
