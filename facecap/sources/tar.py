"""WebDataset tar shards in img2dataset's layout (``key.jpg`` + ``key.txt`` + ``key.json``), read as a stream."""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from typing import Iterator

from facecap import storage
from facecap.settings import ImageLimits, IngestSettings
from facecap.schema import Reason
from facecap.sources.captions import MAX_TEXT_BYTES, caption_from_meta, sidecar_text
from facecap.sources.raw import Raw, RawReject, TooLarge
from facecap.sources.spec import ShardSpec

TAR_ENDINGS = (".tar", ".tar.gz", ".tgz")
# Tar member names longer than this are rejected: keys become ids and offsets, and no img2dataset key comes close.
MAX_MEMBER_NAME = 1024
# Any control character in a tar member name: names become keys, offsets and log lines.
_NAME_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


_MEMBER_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                 tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not read as part of a record (None when it is a plain, safely named file).

    Nothing is ever extracted to disk, but a member's name becomes a record's key, id and
    offset, and travels into releases and exports (key.txt): only regular files with
    relative names that stay inside the archive are taken.
    """
    if not member.isfile():
        kind = _MEMBER_KINDS.get(member.type, f"member of type {member.type!r}")
        target = f" to {member.linkname[:200]!r}" if member.issym() or member.islnk() else ""
        return f"{kind}{target}: only regular files are read"
    name = member.name
    if len(name) > MAX_MEMBER_NAME:
        return f"name of {len(name)} characters > {MAX_MEMBER_NAME}"
    if name.startswith("/"):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' path component"
    if _NAME_CONTROL.search(name):
        return "control character in name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    return None


def _key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


def read_tar(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
              with_text: bool) -> Iterator[Raw | RawReject]:
    """A WebDataset tar's records, one per key, in stream order.

    Keys group consecutive members. A key's first image member is its image; any later
    image for the same key, adjacent (``x.jpg`` then ``x.png``) or not (the key comes back
    after others), is rejected as duplicate_member with the kept member named: the tar is a
    stream, so the first one may already be on its way, and keeping it makes every tar give
    one record per key whatever the order of its members.
    """
    exts = tuple(e.lower().lstrip(".") for e in settings.image_extensions)
    text_exts = ("txt", "json")
    fs, path = storage.filesystem(spec.source)
    group: dict[str, bytes | TooLarge | None] = {}
    names: dict[str, tuple[int, str]] = {}  # ext -> (member index, name) of the group's members
    key: str | None = None
    first_seen: dict[bytes, int] = {}  # digest of each key read -> member index of its first member
    repeat_of: int | None = None  # the current key was read before, from this member
    index = -1

    def emit(k: str, parts: dict[str, bytes | TooLarge | None]) -> Raw | RawReject:
        image_ext = next((e for e in exts if e in parts), None)
        if image_ext is None:
            return RawReject(k, Reason.UNREADABLE_MEMBER, f"no image member for key (found: {sorted(parts)})")
        meta, meta_encoding = sidecar_text(parts.get("json"))
        caption, encoding = sidecar_text(parts.get("txt"))
        if caption is None:
            caption, encoding = caption_from_meta(meta), meta_encoding
        return Raw(k, parts[image_ext], caption, meta, encoding)

    def duplicate(k: str, ext: str, name: str) -> str | None:
        if repeat_of is not None:
            return f"key {k[:200]!r} was already read from member {repeat_of}; that one is kept"
        kept = names.get(ext)
        if kept is None and ext in exts:  # x.jpg then x.png: two images for one caption
            kept = next((names[e] for e in exts if e in names), None)
        if kept is None:
            return None
        return f"{name[:200]!r} is a second {'image' if ext in exts else ext} for key {k[:200]!r}; " \
               f"kept {kept[1][:200]!r} (member {kept[0]})"

    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for index, member in enumerate(tar):
                if member.isdir():  # a folder entry carries no data: it is not a record
                    continue
                problem = unsafe_member(member)
                if problem:
                    yield RawReject(f"@member{index}", Reason.UNSAFE_MEMBER, f"{problem}: {member.name[:200]!r}"[:500])
                    continue
                k, ext = _wds_key(member.name)
                if k != key:
                    if key is not None and repeat_of is None:
                        yield emit(key, group)
                    group, names, key = {}, {}, k
                    repeat_of = first_seen.setdefault(_key_digest(k), index)
                    repeat_of = None if repeat_of == index else repeat_of
                why = duplicate(k, ext, member.name)
                if why:
                    yield RawReject(f"@member{index}", Reason.DUPLICATE_MEMBER, why[:500])
                    continue
                names[ext] = (index, member.name)
                limit = limits.max_bytes if ext in exts else MAX_TEXT_BYTES
                if member.size > limit:  # skipped unread: the stream moves past it
                    group[ext] = TooLarge(member.size, f"member {member.name[:200]!r}", limit)
                elif ext in exts or (with_text and ext in text_exts):
                    extracted = tar.extractfile(member)
                    group[ext] = extracted.read() if extracted else b""
                else:  # neither image nor caption: present, not needed
                    group[ext] = None
    except (tarfile.TarError, OSError, EOFError) as exc:
        # Records already read stay; the break point is recorded so nothing vanishes silently.
        if key is not None and group and repeat_of is None:
            yield emit(key, group)
        key, group = None, {}
        yield RawReject(f"@member{index + 1}", Reason.UNREADABLE_SOURCE,
                        f"tar stream unreadable after {index + 1} member(s): {type(exc).__name__}: {exc}"[:500])
    if key is not None and repeat_of is None:
        yield emit(key, group)
