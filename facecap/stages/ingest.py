"""Ingest: turn sources into normalised image shards.

Sources are folders of images (with optional ``stem.txt`` / ``stem.json``
sidecars), WebDataset tar shards in img2dataset's layout (``key.jpg`` +
``key.txt`` + ``key.json``) and Parquet files holding image bytes,
``{bytes, path}`` structs (Hugging Face datasets) or image paths, and URL
lists (Parquet/CSV/JSONL with a URL column, LAION metadata) whose images are
downloaded by the shard's ingest (facecap.stages.urllist, .download).

Planning (``plan_shards``) lists what each shard will read and fingerprints
it, cheaply, from file metadata; ``ingest_shard`` reads one shard and yields
image records and rejects. Local images are referenced, never copied: a
record says where its bytes are (source, offset, size, fingerprint) and
``SourceBytes`` reads them again for detect. Nothing here raises on bad
input: an unreadable source becomes a reject row that says why.

Input is treated as hostile: no file, member or sidecar is read past its
limit (image.max_bytes, MAX_TEXT_BYTES); tar links, devices, FIFOs and
names that are absolute, climb out with ``..`` or run past MAX_MEMBER_NAME
are rejected as unsafe_member, and a tar key's second image as
duplicate_member; a Parquet column of the wrong type is rejected naming
it; captions keep every character but control characters (removed and
counted), decoded from UTF-8 or, failing that, an encoding that is recorded.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import hashlib
import json
import posixpath
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import storage
from facecap.config import DownloadSettings, ImageLimits, IngestSettings
from facecap.schema import IMAGE_FIELDS, IMAGE_SCHEMA, Reason, image_id_for, is_transient
from facecap.stages.base import Chunk, Counters, ReportSection, Stage, rejected
from facecap.stages.images import probe

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes",
                 "image_path", "path", "file", "filename", "filepath", "url", "URL")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt_text", "txt", "sentence", "prompt")
CAPTION_KEYS = ("caption", "text", "TEXT", "alt_text")
TAR_ENDINGS = (".tar", ".tar.gz", ".tgz")
PARQUET_ENDINGS = (".parquet", ".pq")
BATCH_ROWS = 64  # records per yielded batch: bounds memory whatever the shard size
# A caption or metadata sidecar beyond this is not text anyone wrote by hand: it is rejected unread
# (a WebDataset .json is about 1 KB, LAION alt-text rarely tops 1 KB).
MAX_TEXT_BYTES = 1 << 20
# Tar member names longer than this are rejected: keys become ids and offsets, and no img2dataset key comes close.
MAX_MEMBER_NAME = 1024
# Parquet row groups are read several at a time, up to about this many rows: a file of many tiny row
# groups costs one read per window, not one per row group.
PARQUET_WINDOW_ROWS = 1024

# Reasons for hostile or malformed input found by ingest.

# Control characters other than tab, newline and carriage return: removed from captions (and counted).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Any control character in a tar member name: names become keys, offsets and log lines.
_NAME_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Byte-order marks say the encoding outright; longer marks first (UTF-32-LE starts like UTF-16-LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Tried in order when text is not UTF-8. cp1252 is what most non-UTF-8 web text is; latin-1 decodes any
# bytes. Neither replaces a character, so encoding the text again with the recorded codec gives the bytes back.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")


@dataclass(frozen=True)
class ShardSpec:
    """What one ingest task reads. Small and picklable: it travels to workers."""

    kind: Literal["folder", "tar", "parquet", "urls", "unreadable"]
    source: str  # container URI, absolute
    members: tuple[str, ...] = ()  # folder: image paths relative to `source`
    start: int = 0  # parquet: row range [start, stop)
    stop: int = 0
    fingerprint: str = ""  # identity of the bytes this spec covers (from sizes and mtimes / ETags)
    detail: str = ""  # unreadable: why
    sidecars: tuple[str, ...] = field(default=(), compare=False)  # folder: caption/meta files present

    @property
    def label(self) -> str:
        name = posixpath.basename(self.source.rstrip("/")) or self.source
        if self.kind == "folder":
            return f"{name}[{self.members[0]}..+{len(self.members)}]" if self.members else name
        if self.kind in ("parquet", "urls"):
            return f"{name}[{self.start}:{self.stop}]"
        return name

    def key_material(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("sidecars")
        data["members"] = hashlib.sha256("\n".join(self.members).encode()).hexdigest()
        return data


def _info_token(info: dict[str, Any]) -> str:
    """A change detector from file metadata: size plus ETag / checksum / mtime, whichever exists."""
    for key in ("ETag", "etag", "checksum", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return f"{info.get('size')}:{info[key]}"
    return str(info.get("size"))


def _fingerprint(tokens: list[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:24]


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_sources(sources: list[str]) -> list[tuple[str, str | None]]:
    """Expand globs; returns (absolute URI, problem) pairs, deduplicated in the order given."""
    seen: dict[str, str | None] = {}
    for raw in sources:
        src = storage.absolute(raw)
        fs, path = storage.filesystem(src)
        protocol = src.split("://", 1)[0] + "://" if "://" in src else ""
        matches = sorted(fs.glob(path)) if _has_glob(path) else [path]
        if not matches:
            seen.setdefault(src, "no file matches this pattern")
            continue
        for m in matches:
            uri = protocol + m if protocol and not m.startswith(protocol) else m
            seen.setdefault(uri, None if fs.exists(m) else "no such file or directory")
    return list(seen.items())


def plan_shards(sources: list[str], settings: IngestSettings) -> tuple[list[ShardSpec], list[str]]:
    """List the ingest shards for these sources. Returns specs and human-readable notes."""
    specs: list[ShardSpec] = []
    notes: list[str] = []
    exts = tuple(e.lower() for e in settings.image_extensions)
    planned: set[tuple[str, str]] = set()  # (folder, image): a file given alone and via its folder is read once
    for uri, problem in expand_sources(sources):
        if problem:
            specs.append(ShardSpec("unreadable", uri, detail=problem))
            continue
        fs, path = storage.filesystem(uri)
        try:
            if fs.isdir(path):
                specs.extend(_plan_folder(uri, fs, path, exts, settings.shard_size, notes, planned))
            elif path.lower().endswith(TAR_ENDINGS):
                specs.append(ShardSpec("tar", uri, fingerprint=_fingerprint([_info_token(fs.info(path))])))
            elif path.lower().endswith(PARQUET_ENDINGS):
                specs.extend(_plan_parquet(uri, fs, path, settings, notes))
            elif urllist.list_format(path):
                specs.extend(urllist.plan_url_list(uri, fs, path, settings,
                                                   _fingerprint([_info_token(fs.info(path))])))
            elif path.lower().endswith(exts):
                parent = posixpath.dirname(path)
                specs.extend(_plan_folder(uri.rsplit("/", 1)[0], fs, parent, exts, settings.shard_size, notes,
                                          planned, only=posixpath.basename(path)))
            else:
                specs.append(ShardSpec("unreadable", uri, detail=(
                    "not a folder, tar shard (.tar, .tar.gz), Parquet file, URL list (.csv, .tsv, .jsonl) or image "
                    f"({', '.join(exts)})")))
        except Exception as exc:  # an unreadable source is reported, never fatal to the run
            specs.append(ShardSpec("unreadable", uri, detail=f"{type(exc).__name__}: {exc}"[:500]))
    return specs, notes


def _plan_folder(uri: str, fs, path: str, exts: tuple[str, ...], shard_size: int, notes: list[str],
                 planned: set[tuple[str, str]], only: str | None = None) -> list[ShardSpec]:
    found = fs.find(path, detail=True)
    # A FIFO blocks its reader forever and a device never ends: only regular files (or links to
    # them) are read. Listings may not follow links, so an entry that is neither is asked again.
    irregular = sorted(p for p, info in found.items() if not _regular(fs, p, info))
    if irregular:
        notes.append(f"{uri}: ignored {len(irregular)} entr{'y' if len(irregular) == 1 else 'ies'} that are not "
                     f"regular files (FIFOs, devices, sockets, links to them): "
                     f"{', '.join(repr(posixpath.relpath(p, path)) for p in irregular[:5])}")
    skipped = set(irregular)
    infos = {posixpath.relpath(p, path): info for p, info in found.items() if p not in skipped}
    if only is not None:
        stem = only.rsplit(".", 1)[0]
        infos = {k: v for k, v in infos.items() if k == only or k.rsplit(".", 1)[0] == stem}
    all_images = sorted(k for k in infos if k.lower().endswith(exts))
    images = [k for k in all_images if (uri, k) not in planned]
    planned.update((uri, k) for k in images)
    stems = {k.rsplit(".", 1)[0] for k in all_images}
    sidecars = sorted(k for k in infos if k.lower().endswith((".txt", ".json")) and k.rsplit(".", 1)[0] in stems)
    ignored = len(infos) - len(all_images) - len(sidecars)
    if ignored:
        notes.append(f"{uri}: ignored {ignored} file(s) that are neither images ({', '.join(exts)}) nor sidecars")
    specs = []
    for members in chunk_names(images, shard_size):
        member_stems = {m.rsplit(".", 1)[0] for m in members}
        side = tuple(s for s in sidecars if s.rsplit(".", 1)[0] in member_stems)
        tokens = [f"{m}={_info_token(infos[m])}" for m in members + side]
        specs.append(ShardSpec("folder", uri, members=members, sidecars=side, fingerprint=_fingerprint(tokens)))
    if not all_images:
        notes.append(f"{uri}: no images found")
    return specs


def _regular(fs, path: str, info: dict) -> bool:
    if info.get("type") in ("file", "directory"):
        return True
    try:
        return fs.info(path).get("type") == "file"
    except OSError:  # a dangling link
        return False


def chunk_names(names: list[str], size: int) -> list[tuple[str, ...]]:
    """Split sorted names into shards of about `size`, with content-defined boundaries.

    A boundary falls after a name whose hash hits, not after every `size`
    names, so adding or removing a file changes only the shard it lands in
    and the next boundary re-synchronises: a re-curation of a grown folder
    re-runs a shard or two, not every shard after the new file.
    """
    low, high = max(1, size // 2), max(1, 2 * size)
    modulus = max(1, size - low + 1)  # expected shard length: low + modulus - 1 = size
    chunks: list[tuple[str, ...]] = []
    current: list[str] = []
    for name in names:
        current.append(name)
        h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
        if len(current) >= high or (len(current) >= low and h % modulus == 0):
            chunks.append(tuple(current))
            current = []
    if current:
        chunks.append(tuple(current))
    return chunks


def _plan_parquet(uri: str, fs, path: str, settings: IngestSettings, notes: list[str]) -> list[ShardSpec]:
    info = fs.info(path)
    with fs.open(path, "rb") as fh:
        metadata = pq.read_metadata(fh)
    schema = metadata.schema.to_arrow_schema()
    rows, names = metadata.num_rows, schema.names
    token = _info_token(info)
    kind = "parquet"
    if metadata.num_row_groups > 1000 and rows < metadata.num_row_groups * 16:
        notes.append(f"{uri}: {metadata.num_row_groups} row groups of {rows / metadata.num_row_groups:.1f} rows on "
                     "average; it is read, but rewriting it with bigger row groups makes it much faster to read")
    image_col, _ = _pick_typed(schema, settings.image_column, IMAGE_COLUMNS, _holds_images)
    if image_col in urllist.URL_COLUMNS:  # a URL list: no bytes, no paths
        if urllist.is_img2dataset_sidecar(fs, path, names):
            notes.append(f"{uri}: img2dataset's listing of the tar next to it (its images are in the tar); skipped")
            return []
        kind = "urls"
    return [
        ShardSpec(kind, uri, start=s, stop=min(s + settings.shard_size, rows), fingerprint=_fingerprint([token]))
        for s in range(0, rows, settings.shard_size)
    ]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _TooLarge:
    """Stands in for a member or file that was not read because it exceeds image.max_bytes."""

    size: int
    what: str = "image"
    limit: int | None = None


@dataclass(frozen=True)
class Raw:
    """One image as a reader found it in its source, before any check."""

    offset: str
    data: bytes | _TooLarge | None
    caption: str | _TooLarge | None = None
    meta: str | _TooLarge | None = None
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


class _Batcher:
    """Accumulates image records and rejects; emits bounded chunks.

    Records of local sources hold a reference (source, offset, size,
    fingerprint), not the bytes; downloads keep their bytes (`keep_bytes`),
    since those are the only copy.
    """

    def __init__(self, spec: ShardSpec, limits: ImageLimits, counters: Counters, keep_bytes: bool = False):
        self.spec, self.limits, self.counters, self.keep_bytes = spec, limits, counters, keep_bytes
        self.rows: list[dict] = []
        self.rejects: list[dict] = []

    def reject(self, offset: str | None, reason: str, detail: str, counted: bool = True) -> None:
        if counted:
            self.counters.rows_in += 1
        self.rejects.append({
            "stage": "ingest", "reason": reason, "detail": detail, "source": self.spec.source,
            "source_offset": offset, "image_id": image_id_for(self.spec.source, offset) if offset is not None else None,
        })

    def take(self, item: Raw | RawReject) -> None:
        if isinstance(item, RawReject):
            self.reject(item.offset, item.reason, item.detail)
        else:
            self.add(item.offset, item.data, item.caption, item.meta, item.caption_encoding)

    def add(self, offset: str, data: bytes | _TooLarge | None, caption: str | _TooLarge | None,
            meta: str | _TooLarge | None, caption_encoding: str | None = None) -> None:
        if isinstance(data, _TooLarge):
            self.reject(offset, Reason.TOO_LARGE, f"{data.size} bytes > image.max_bytes={self.limits.max_bytes} (not read)")
            return
        for what, text in (("caption", caption), ("source_meta", meta)):
            too_large = _text_too_large(what, text)
            if too_large:
                self.reject(offset, Reason.TOO_LARGE, too_large)
                return
        p = probe(data, self.limits)
        if not p.ok:
            self.reject(offset, p.reason, p.detail)
            return
        caption, removed = clean_caption(caption)
        if removed:
            self.counters.extra["caption_control_chars_removed"] += removed
        if caption_encoding:
            self.counters.extra[f"captions_decoded_{caption_encoding}"] += 1
        self.counters.rows_in += 1
        self.counters.extra["source_bytes"] += len(data)
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

    def flush(self) -> Chunk:
        chunk = Chunk(kept=pa.Table.from_pylist(self.rows, schema=IMAGE_SCHEMA) if self.rows else None,
                      rejected=rejected(self.rejects))
        self.rows, self.rejects = [], []
        return self.counters.count(chunk)


def _read_bounded(fs, path: str, limit: int, what: str = "image") -> bytes | _TooLarge:
    """Read a file unless it is larger than `limit` (then a _TooLarge marker): never load a huge file.

    At most `limit` + 1 bytes are read whatever the size said, so a file that grew since, or one
    whose size the filesystem does not know, cannot be loaded whole either.
    """
    size = fs.size(path)
    if size is not None and size > limit:
        return _TooLarge(size, what, limit)
    chunks, total = [], 0
    with fs.open(path, "rb") as fh:
        while total <= limit:  # in pieces: read(limit) would reserve `limit` bytes for every small file
            chunk = fh.read(min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        return _TooLarge(size if size and size > limit else total, what, limit)
    return b"".join(chunks)


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Text from a sidecar's bytes, and the encoding used when it was not plain UTF-8 (None when it was).

    A byte-order mark decides; else UTF-8 if the bytes are valid UTF-8; else the first of
    FALLBACK_ENCODINGS that decodes them (latin-1 always does). Nothing is replaced, so the
    original bytes are `text.encode(encoding)` (with the mark for utf-8-sig, utf-16 and utf-32).
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                break
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _text(data: bytes | _TooLarge | None) -> tuple[str | _TooLarge | None, str | None]:
    """A sidecar's text (or its _TooLarge marker) and the encoding it was decoded from (None: UTF-8)."""
    if data is None or isinstance(data, _TooLarge):
        return data, None
    text, encoding = decode_text(data)
    return text.strip(), encoding


def clean_caption(caption: str | None) -> tuple[str | None, int]:
    """The caption without control characters (tab, newline and CR stay), and how many were removed.

    Control characters are never meant as caption text, and they break what reads captions
    later (terminals, CSV, key.txt exports, tokenizers); a caption is kept without them and the
    count is recorded (source_caption_chars_removed), instead of losing the image over them.
    """
    if caption is None:
        return None, 0
    cleaned, removed = _CONTROL.subn("", caption)
    return (cleaned.strip() if removed else cleaned), removed


def _utf8_size(text: str, limit: int) -> int:
    if len(text) > limit:  # at least one byte per character: no need to encode a huge string
        return len(text)
    return len(text.encode("utf-8", errors="surrogatepass"))


def _text_too_large(what: str, text: str | _TooLarge | None) -> str | None:
    """Why a caption or metadata text is over MAX_TEXT_BYTES (None when it is not)."""
    if isinstance(text, _TooLarge):
        return f"{text.what}: {text.size} bytes > {text.limit or MAX_TEXT_BYTES} (text limit; not read)"
    if isinstance(text, str) and _utf8_size(text, MAX_TEXT_BYTES) > MAX_TEXT_BYTES:
        return f"{what}: {_utf8_size(text, MAX_TEXT_BYTES)} bytes > {MAX_TEXT_BYTES} (text limit)"
    return None


def _caption_from_meta(meta: str | _TooLarge | None) -> str | None:
    if not meta or isinstance(meta, _TooLarge):
        return None
    try:
        obj = json.loads(meta)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key in CAPTION_KEYS:
            if isinstance(obj.get(key), str):
                return obj[key].strip()
    return None


def read_source(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                with_text: bool = True) -> Iterator[Raw | RawReject]:
    """The images of a local shard in source order (folder, tar or Parquet), each as found.

    `with_text=False` skips what only ingest needs (captions and sidecars),
    for readers that come back for the bytes alone.
    """
    readers = {"folder": _read_folder, "tar": _read_tar, "parquet": _read_parquet}
    if spec.kind == "unreadable":
        yield RawReject(None, Reason.UNREADABLE_SOURCE, spec.detail)
        return
    yield from readers[spec.kind](spec, settings, limits, with_text)


def ingest_shard(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits, counters: Counters,
                 download: DownloadSettings | None = None) -> Iterator[Chunk]:
    """Read one shard's records; yields chunks of image records (references, or bytes for downloads) and rejects."""
    if spec.kind == "urls":
        from facecap.config import Config  # the registered stages' model: read when used, not at import

        cfg = Config(ingest=settings, image=limits, download=download or DownloadSettings())
        yield from urllist.download_shard(spec, cfg, counters)
        return
    batch = _Batcher(spec, limits, counters)
    for item in read_source(spec, settings, limits):
        batch.take(item)
        if batch.ready():
            yield batch.flush()
    yield batch.flush()


class SourceBytes:
    """Reads the bytes of a shard's referenced images again, in the order ingest recorded them.

    Readers walk the source in the same order as ingest did, so a cursor over
    them finds each asked-for offset by moving forward: one pass over a tar or
    Parquet file, whatever its compression. Each image must match the
    fingerprint ingest recorded; one that does not (the source changed since)
    is reported, never silently used.
    """

    def __init__(self, spec: ShardSpec, ingest_settings: dict):
        from facecap.config import ImageLimits as Limits, IngestSettings as Settings

        self.spec = spec
        self.items = read_source(spec, Settings(**ingest_settings.get("ingest", {})),
                                 Limits(**ingest_settings.get("image", {})), with_text=False)

    def read(self, offset: str, fingerprint: str) -> tuple[bytes | None, str | None]:
        """The bytes at `offset`, or None and why they could not be had."""
        for item in self.items:
            if item.offset != offset:
                continue
            data = item.data if isinstance(item, Raw) else None
            if not isinstance(data, bytes):
                return None, f"{self.spec.source} {offset}: no longer readable (changed since ingest)"
            if fingerprint_bytes(data) != fingerprint:
                return None, f"{self.spec.source} {offset}: bytes differ from what ingest read (changed since)"
            return data, None
        return None, f"{self.spec.source} {offset}: not found again in the source (changed since ingest)"

    def close(self) -> None:
        self.items.close()


def _read_folder(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                 with_text: bool) -> Iterator[Raw | RawReject]:
    fs, root = storage.filesystem(spec.source)
    sidecars = set(spec.sidecars) if with_text else set()
    limit = limits.max_bytes
    for rel in spec.members:
        stem = rel.rsplit(".", 1)[0]
        try:
            data = _read_bounded(fs, posixpath.join(root, rel), limit)
            meta, meta_encoding = _text(_read_bounded(fs, posixpath.join(root, stem + ".json"), MAX_TEXT_BYTES,
                                                      f"metadata sidecar {stem}.json")) \
                if stem + ".json" in sidecars else (None, None)
            caption, encoding = _text(_read_bounded(fs, posixpath.join(root, stem + ".txt"), MAX_TEXT_BYTES,
                                                    f"caption sidecar {stem}.txt")) \
                if stem + ".txt" in sidecars else (None, None)
        except FileNotFoundError:
            yield RawReject(rel, Reason.MISSING_FILE, "file disappeared after planning")
        except OSError as exc:
            yield RawReject(rel, Reason.UNREADABLE_MEMBER, f"{type(exc).__name__}: {exc}"[:300])
        else:
            if caption is None:
                caption, encoding = _caption_from_meta(meta), meta_encoding
            yield Raw(rel, data, caption, meta, encoding)


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


def _read_tar(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
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
    group: dict[str, bytes | _TooLarge | None] = {}
    names: dict[str, tuple[int, str]] = {}  # ext -> (member index, name) of the group's members
    key: str | None = None
    first_seen: dict[bytes, int] = {}  # digest of each key read -> member index of its first member
    repeat_of: int | None = None  # the current key was read before, from this member
    index = -1

    def emit(k: str, parts: dict[str, bytes | _TooLarge | None]) -> Raw | RawReject:
        image_ext = next((e for e in exts if e in parts), None)
        if image_ext is None:
            return RawReject(k, Reason.UNREADABLE_MEMBER, f"no image member for key (found: {sorted(parts)})")
        meta, meta_encoding = _text(parts.get("json"))
        caption, encoding = _text(parts.get("txt"))
        if caption is None:
            caption, encoding = _caption_from_meta(meta), meta_encoding
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
                    group[ext] = _TooLarge(member.size, f"member {member.name[:200]!r}", limit)
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


def _pick(names: list[str], configured: str | None, candidates: tuple[str, ...]) -> str | None:
    if configured:
        return configured if configured in names else None
    return next((c for c in candidates if c in names), None)


def _is_bytes_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _holds_images(t: pa.DataType) -> bool:
    """Bytes, paths, or Hugging Face's {bytes, path} struct (either field may be missing, none of another type)."""
    if _is_bytes_type(t) or _is_text_type(t):
        return True
    if not pa.types.is_struct(t):
        return False
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    ok_bytes = "bytes" not in fields or _is_bytes_type(fields["bytes"])
    ok_path = "path" not in fields or _is_text_type(fields["path"])
    return ("bytes" in fields or "path" in fields) and ok_bytes and ok_path


IMAGE_TYPES = "binary (image bytes), string (paths) or a struct of bytes: binary and/or path: string"


def _pick_typed(schema: pa.Schema, configured: str | None, candidates: tuple[str, ...],
                usable) -> tuple[str | None, str | None]:
    """The column to read and, when none can be, why a column that is there cannot (None: none is there).

    Auto-detection passes over a candidate of an unusable type (an ``image`` column of ids);
    a configured column of an unusable type is an error that names it and its type.
    """
    names = schema.names
    wanted = [configured] if configured else [c for c in candidates if c in names]
    wanted = [c for c in wanted if c in names]
    for column in wanted:
        if usable(schema.field(names.index(column)).type):
            return column, None
    if wanted:
        return None, f"column {wanted[0]!r} is {schema.field(names.index(wanted[0])).type}"
    return None, None


@functools.lru_cache(maxsize=2)
def _parquet_layout(source: str, fingerprint: str) -> tuple[Any, tuple[int, ...]]:
    """A Parquet file's footer and the first row of each row group (and the row count, last).

    Each shard of a file reads a slice of it; parsing its footer and walking its row groups
    once per worker process, not once per shard, keeps a file of many row groups linear to read.
    The fingerprint (size and mtime) is part of the key: a changed file is parsed again.
    """
    fs, path = storage.filesystem(source)
    with fs.open(path, "rb") as fh:
        metadata = pq.read_metadata(fh)
    starts = [0]
    for rg in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(rg).num_rows)
    return metadata, tuple(starts)


def _windows(starts: tuple[int, ...], lo: int, hi: int) -> Iterator[list[int]]:
    """Runs of consecutive row groups covering rows [lo, hi): about PARQUET_WINDOW_ROWS rows, or one row group."""
    first = max(0, bisect.bisect_right(starts, lo) - 1)
    window: list[int] = []
    rows = 0
    for rg in range(first, len(starts) - 1):
        if starts[rg] >= hi:
            break
        window.append(rg)
        rows += starts[rg + 1] - starts[rg]
        if rows >= PARQUET_WINDOW_ROWS:
            yield window
            window, rows = [], 0
    if window:
        yield window


def _read_parquet(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                  with_text: bool) -> Iterator[Raw | RawReject]:
    fs, path = storage.filesystem(spec.source)
    base_dir = posixpath.dirname(path)
    try:
        metadata, starts = _parquet_layout(spec.source, spec.fingerprint)
        fh = fs.open(path, "rb")
        pf = pq.ParquetFile(fh, metadata=metadata)
    except Exception as exc:
        for row in range(spec.start, spec.stop):
            yield RawReject(str(row), Reason.UNREADABLE_SOURCE, f"{type(exc).__name__}: {exc}"[:300])
        return
    with fh:
        schema = pf.schema_arrow
        names = schema.names
        image_col, image_problem = _pick_typed(schema, settings.image_column, IMAGE_COLUMNS, _holds_images)
        caption_col, caption_problem = _pick_typed(schema, settings.caption_column, CAPTION_COLUMNS, _is_text_type) \
            if with_text else (None, None)
        problem = None
        if image_problem:
            problem = (Reason.WRONG_COLUMN_TYPE, f"{image_problem}: an image column holds {IMAGE_TYPES}. "
                                          "Set ingest.image_column.")
        elif image_col is None:
            wanted = settings.image_column or f"one of {list(IMAGE_COLUMNS)}"
            problem = (Reason.MISSING_COLUMNS, f"no image column ({wanted}); columns are {names}. "
                                               "Set ingest.image_column.")
        elif caption_problem and settings.caption_column:
            problem = (Reason.WRONG_COLUMN_TYPE, f"{caption_problem}: a caption column holds strings. "
                                          "Set ingest.caption_column.")
        if problem:
            for row in range(spec.start, spec.stop):
                yield RawReject(str(row), *problem)
            return
        meta_cols = [n for n in names if n not in (image_col, caption_col)
                     and not _is_bytes_type(schema.field(names.index(n)).type)] if with_text else []
        columns = [image_col] + ([caption_col] if caption_col else []) + meta_cols
        for window in _windows(starts, spec.start, spec.stop):
            lo, hi = max(spec.start, starts[window[0]]), min(spec.stop, starts[window[-1] + 1])
            yield from _read_window(pf, window, starts, lo, hi, columns, image_col, caption_col, meta_cols,
                                    fs, base_dir, limits)


def _read_window(pf, window: list[int], starts: tuple[int, ...], lo: int, hi: int, columns: list[str],
                 image_col: str, caption_col: str | None, meta_cols: list[str], fs, base_dir: str,
                 limits: ImageLimits) -> Iterator[Raw | RawReject]:
    try:
        table = pf.read_row_groups(window, columns=columns).slice(lo - starts[window[0]], hi - lo)
    except Exception as exc:
        if len(window) > 1:  # find the corrupt row group: the others keep their rows
            for rg in window:
                yield from _read_window(pf, [rg], starts, max(lo, starts[rg]), min(hi, starts[rg + 1]), columns,
                                        image_col, caption_col, meta_cols, fs, base_dir, limits)
            return
        for row in range(lo, hi):  # a corrupt page loses its row group, not the run
            yield RawReject(str(row), Reason.UNREADABLE_MEMBER,
                            f"row group {window[0]}: {type(exc).__name__}: {exc}"[:300])
        return
    for i, rec in enumerate(_rows(table, caption_col)):
        if isinstance(rec, Exception):
            yield RawReject(str(lo + i), Reason.UNREADABLE_MEMBER, f"{type(rec).__name__}: {rec}"[:300])
        else:
            yield _parquet_record(str(lo + i), rec, image_col, caption_col, meta_cols, fs, base_dir, limits)


def _rows(table: pa.Table, caption_col: str | None) -> list[dict | Exception]:
    """Rows as dicts; the caption as (text, encoding), decoded like a sidecar: Parquet strings should be
    UTF-8, but a writer that did not check can put any bytes there. A row that cannot be converted
    (invalid UTF-8 in another string column) is an exception in its place, not the loss of its neighbours."""
    captions: list = []
    if caption_col:
        column = table.column(caption_col)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        raw = pa.chunked_array([c.view(pa.large_binary() if pa.types.is_large_string(c.type) else pa.binary())
                                for c in column.chunks], pa.large_binary() if pa.types.is_large_string(column.type)
                               else pa.binary())
        captions = [_text(b) if b is not None else (None, None) for b in raw.to_pylist()]
        table = table.drop_columns([caption_col])
    try:
        rows: list = table.to_pylist()
    except UnicodeDecodeError:
        rows = []
        for i in range(table.num_rows):
            try:
                rows.extend(table.slice(i, 1).to_pylist())
            except UnicodeDecodeError as exc:
                rows.append(exc)
    if caption_col:
        for rec, caption in zip(rows, captions):
            if isinstance(rec, dict):
                rec[caption_col] = caption
    return rows


def _parquet_record(offset: str, rec: dict, image_col: str, caption_col: str | None, meta_cols: list[str],
                    fs, base_dir: str, limits: ImageLimits) -> Raw | RawReject:
    value = rec.get(image_col)
    caption, encoding = (rec.get(caption_col) or (None, None)) if caption_col else (None, None)
    meta = {c: rec[c] for c in meta_cols if rec.get(c) is not None}
    meta_json = json.dumps(meta, default=str, sort_keys=True) if meta else None
    if isinstance(value, dict):  # Hugging Face datasets Image feature: {bytes, path}
        if not value.get("bytes") and not value.get("path"):
            return RawReject(offset, Reason.EMPTY_FILE, f"column {image_col}: struct with no bytes and no path")
        value = value.get("bytes") or value.get("path")
    if value is None:
        return RawReject(offset, Reason.EMPTY_FILE, f"column {image_col} is null")
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            return RawReject(offset, Reason.URL_NOT_DOWNLOADED,
                             f"column {image_col} holds paths, and this one is a URL: put URLs in a url/URL column "
                             "(a URL list is downloaded), or give local paths")
        target = value if value.startswith("/") or "://" in value else posixpath.join(base_dir, value)
        if "://" in target:
            return RawReject(offset, Reason.MISSING_FILE, f"unsupported image location {value!r}")
        try:
            value = _read_bounded(fs, target, limits.max_bytes)
        except FileNotFoundError:
            return RawReject(offset, Reason.MISSING_FILE, f"{target} does not exist")
        except OSError as exc:
            return RawReject(offset, Reason.UNREADABLE_MEMBER, f"{target}: {type(exc).__name__}: {exc}"[:300])
    return Raw(offset, value if isinstance(value, _TooLarge) else bytes(value), caption, meta_json, encoding)


# --------------------------------------------------------------------------- the stage


class Ingest(Stage):
    """Sources in, one image record per source image out (references to local bytes; downloads' bytes)."""

    name = "ingest"
    output_fields = tuple(IMAGE_FIELDS)
    column_docs = {
        "image_id": "stable id of the source image (hash of source + offset); its faces share a split",
        "source": "source container (folder, tar, Parquet file)", "source_offset": "place in the source",
        "source_caption": "the source's original caption (alt-text), without control characters (tab, newline, CR "
                          "kept)",
        "source_caption_encoding": "encoding a non-UTF-8 caption was decoded from (null: UTF-8); encoding the "
                                   "caption with it gives the original bytes",
        "source_caption_chars_removed": "control characters removed from the caption (null: no caption)",
    }
    version = "3"
    key_column = "image_id"
    keyed_sections = ("ingest", "image", "download")
    # Connection counts, timeouts, retries and the allow-list decide only whether a fetch
    # succeeds; changing them must not re-download finished shards.
    unkeyed = frozenset({"download.connections", "download.timeout_s", "download.retries", "download.backoff_s",
                         "download.max_redirects", "download.allow_addresses", "download.user_agent",
                         "download.retry_failed"})
    priority = 0
    # Reading and probing local files and downloading URLs wait on storage and the network:
    # ingest never holds a CPU slot that detect could use.
    io_bound = True
    retries = 2  # flaky storage or network
    retry_delay_seconds = (2, 10)

    def schema(self) -> pa.Schema:
        return IMAGE_SCHEMA

    def records(self, shard, previous=None):
        return [(shard.spec, previous)]

    def another_pass(self, cached) -> bool:
        # A URL shard gets a next generation that downloads its transient failures again.
        return (cached.kind == "urls" and self.cfg.download.retry_failed
                and any(is_transient(reason) for reason in cached.rejects))

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        ((spec, previous),) = records
        if spec.kind == "urls" and previous is not None:
            yield from urllist.retry_shard(spec, self.cfg, previous, counters)
        elif spec.kind == "urls":
            yield from urllist.download_shard(spec, self.cfg, counters)
        else:
            yield from ingest_shard(spec, self.cfg.ingest, self.cfg.image, counters)


# URL lists build on this module's ShardSpec and _Batcher; imported last to avoid a cycle.
from facecap.stages import urllist  # noqa: E402


# --- report ----------------------------------------------------------------------------------------
PAPER_REACHABLE_SHARE = 0.75  # FaceCaption-15M: ~75 % of LAION-Face's URLs were still reachable


class IngestReport(ReportSection):
    """The share of listed URLs that were reached, when the run downloaded (from the funnel's counts)."""

    def figures(self, db, agg) -> dict:
        for row in db.info.get("funnel") or []:
            rows_in, rows_out = int(row.get("rows_in") or 0), int(row.get("rows_out") or 0)
            if row.get("stage") == Ingest.name and (row.get("extra") or {}).get("downloaded_bytes") and rows_in:
                return {"download": {"records_in": rows_in, "images_out": rows_out,
                                     "reachable_share": round(rows_out / rows_in, 4),
                                     "paper_reachable_share": PAPER_REACHABLE_SHARE,
                                     "note": "ingest of every source in the run; URL lists are the ones that can miss"}}
        return {}

    def html(self, report) -> str:
        d = report["figures"].get("download")
        if not d:
            return ""
        return (f"<p>Downloads: {d['images_out']:,} of {d['records_in']:,} listed records reached "
                f"(<b>{100 * d['reachable_share']:.1f} %</b>; FaceCaption-15M reached ≈ "
                f"{100 * d['paper_reachable_share']:.0f} % of LAION-Face). Failures by status are in the funnel.</p>")


Ingest.report = IngestReport()
