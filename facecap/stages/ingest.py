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
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import storage
from facecap.config import Config, DownloadSettings, ImageLimits, IngestSettings
from facecap.schema import IMAGE_SCHEMA, Reason, image_id_for, is_transient
from facecap.stages.base import Chunk, Counters, Stage, rejected
from facecap.stages.images import probe

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes",
                 "image_path", "path", "file", "filename", "filepath", "url", "URL")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt_text", "txt", "sentence", "prompt")
CAPTION_KEYS = ("caption", "text", "TEXT", "alt_text")
TAR_ENDINGS = (".tar", ".tar.gz", ".tgz")
PARQUET_ENDINGS = (".parquet", ".pq")
BATCH_ROWS = 64  # records per yielded batch: bounds memory whatever the shard size


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
    infos = {posixpath.relpath(p, path): info for p, info in found.items()}
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
    rows, names = metadata.num_rows, metadata.schema.to_arrow_schema().names
    token = _info_token(info)
    kind = "parquet"
    if _pick(names, settings.image_column, IMAGE_COLUMNS) in urllist.URL_COLUMNS:  # a URL list: no bytes, no paths
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


@dataclass(frozen=True)
class Raw:
    """One image as a reader found it in its source, before any check."""

    offset: str
    data: bytes | _TooLarge | None
    caption: str | None = None
    meta: str | None = None


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
            self.add(item.offset, item.data, item.caption, item.meta)

    def add(self, offset: str, data: bytes | _TooLarge | None, caption: str | None, meta: str | None) -> None:
        if isinstance(data, _TooLarge):
            self.reject(offset, Reason.TOO_LARGE, f"{data.size} bytes > image.max_bytes={self.limits.max_bytes} (not read)")
            return
        p = probe(data, self.limits)
        if not p.ok:
            self.reject(offset, p.reason, p.detail)
            return
        self.counters.rows_in += 1
        self.counters.extra["source_bytes"] += len(data)
        self.rows.append({
            "image_id": image_id_for(self.spec.source, offset), "source": self.spec.source, "source_offset": offset,
            "source_caption": caption, "source_meta": meta, "source_width": p.width, "source_height": p.height,
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


def _read_bounded(fs, path: str, limit: int) -> bytes | _TooLarge:
    """Read a file unless it is larger than `limit` (then a _TooLarge marker): never load a huge file."""
    size = fs.size(path)
    if size is not None and size > limit:
        return _TooLarge(size)
    return fs.cat_file(path)


def _text(data: bytes | _TooLarge | None) -> str | None:
    if data is None or isinstance(data, _TooLarge):
        return None
    return data.decode("utf-8", errors="replace").strip()


def _caption_from_meta(meta: str | None) -> str | None:
    if not meta:
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
            meta = _text(_read_bounded(fs, posixpath.join(root, stem + ".json"), limit)) \
                if stem + ".json" in sidecars else None
            caption = _text(_read_bounded(fs, posixpath.join(root, stem + ".txt"), limit)) \
                if stem + ".txt" in sidecars else None
        except FileNotFoundError:
            yield RawReject(rel, Reason.MISSING_FILE, "file disappeared after planning")
        except OSError as exc:
            yield RawReject(rel, Reason.UNREADABLE_MEMBER, f"{type(exc).__name__}: {exc}"[:300])
        else:
            yield Raw(rel, data, caption if caption is not None else _caption_from_meta(meta), meta)


def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _read_tar(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
              with_text: bool) -> Iterator[Raw | RawReject]:
    exts = tuple(e.lower().lstrip(".") for e in settings.image_extensions)
    fs, path = storage.filesystem(spec.source)
    group: dict[str, bytes | _TooLarge] = {}
    key: str | None = None
    members = 0

    def emit(k: str, parts: dict[str, bytes]) -> Raw | RawReject:
        image_ext = next((e for e in exts if e in parts), None)
        if image_ext is None:
            return RawReject(k, Reason.UNREADABLE_MEMBER, f"no image member for key (found: {sorted(parts)})")
        meta = _text(parts.get("json"))
        caption = _text(parts.get("txt"))
        return Raw(k, parts[image_ext], caption if caption is not None else _caption_from_meta(meta), meta)

    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _wds_key(member.name)
                if k != key and key is not None:
                    yield emit(key, group)
                    group = {}
                key = k
                if member.size > limits.max_bytes:
                    group[ext] = _TooLarge(member.size)  # skipped unread: the stream moves past it
                elif with_text or ext in exts:
                    extracted = tar.extractfile(member)
                    group[ext] = extracted.read() if extracted else b""
                members += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        # Records already read stay; the break point is recorded so nothing vanishes silently.
        if key is not None and group:
            yield emit(key, group)
            key, group = None, {}
        yield RawReject(f"@member{members}", Reason.UNREADABLE_SOURCE,
                        f"tar stream unreadable after {members} member(s): {type(exc).__name__}: {exc}"[:500])
    if key is not None:
        yield emit(key, group)


def _pick(names: list[str], configured: str | None, candidates: tuple[str, ...]) -> str | None:
    if configured:
        return configured if configured in names else None
    return next((c for c in candidates if c in names), None)


def _read_parquet(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                  with_text: bool) -> Iterator[Raw | RawReject]:
    fs, path = storage.filesystem(spec.source)
    base_dir = posixpath.dirname(path)
    try:
        fh = fs.open(path, "rb")
        pf = pq.ParquetFile(fh)
    except Exception as exc:
        for row in range(spec.start, spec.stop):
            yield RawReject(str(row), Reason.UNREADABLE_SOURCE, f"{type(exc).__name__}: {exc}"[:300])
        return
    with fh:
        names = pf.schema_arrow.names
        image_col = _pick(names, settings.image_column, IMAGE_COLUMNS)
        caption_col = _pick(names, settings.caption_column, CAPTION_COLUMNS) if with_text else None
        if image_col is None:
            wanted = settings.image_column or f"one of {list(IMAGE_COLUMNS)}"
            detail = f"no image column ({wanted}); columns are {names}. Set ingest.image_column."
            for row in range(spec.start, spec.stop):
                yield RawReject(str(row), Reason.MISSING_COLUMNS, detail)
            return
        meta_cols = [n for n in names if n not in (image_col, caption_col)
                     and not pa.types.is_binary(pf.schema_arrow.field(n).type)
                     and not pa.types.is_large_binary(pf.schema_arrow.field(n).type)] if with_text else []
        columns = [image_col] + ([caption_col] if caption_col else []) + meta_cols
        offset = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            lo, hi = max(spec.start, offset), min(spec.stop, offset + n)
            if lo < hi:
                try:
                    table = pf.read_row_group(rg, columns=columns).slice(lo - offset, hi - lo)
                except Exception as exc:  # a corrupt page loses its row group, not the run
                    for row in range(lo, hi):
                        yield RawReject(str(row), Reason.UNREADABLE_MEMBER,
                                        f"row group {rg}: {type(exc).__name__}: {exc}"[:300])
                    offset += n
                    continue
                for i, rec in enumerate(table.to_pylist()):
                    yield _parquet_record(str(lo + i), rec, image_col, caption_col, meta_cols, fs, base_dir, limits)
            offset += n
            if offset >= spec.stop:
                break


def _parquet_record(offset: str, rec: dict, image_col: str, caption_col: str | None, meta_cols: list[str],
                    fs, base_dir: str, limits: ImageLimits) -> Raw | RawReject:
    value = rec.get(image_col)
    caption = rec.get(caption_col) if caption_col else None
    caption = str(caption).strip() if caption is not None else None
    meta = {c: rec[c] for c in meta_cols if rec.get(c) is not None}
    meta_json = json.dumps(meta, default=str, sort_keys=True) if meta else None
    if isinstance(value, dict):  # Hugging Face datasets Image feature: {bytes, path}
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
    return Raw(offset, value if isinstance(value, _TooLarge) else bytes(value), caption, meta_json)


# --------------------------------------------------------------------------- the stage


class Ingest(Stage):
    """Sources in, one image record per source image out (references to local bytes; downloads' bytes)."""

    name = "ingest"
    version = "2"
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
