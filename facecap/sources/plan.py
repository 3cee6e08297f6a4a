"""Sources into shards: globs expanded, containers listed and fingerprinted cheaply from file metadata."""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import pyarrow.parquet as pq

from facecap import storage
from facecap.settings import IngestSettings
from facecap.sources import urllist
from facecap.sources.parquet import IMAGE_COLUMNS, PARQUET_ENDINGS, holds_images, pick_typed
from facecap.sources.spec import ShardSpec
from facecap.sources.tar import TAR_ENDINGS


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
    image_col, _ = pick_typed(schema, settings.image_column, IMAGE_COLUMNS, holds_images)
    if image_col in urllist.URL_COLUMNS:  # a URL list: no bytes, no paths
        if urllist.is_img2dataset_sidecar(fs, path, names):
            notes.append(f"{uri}: img2dataset's listing of the tar next to it (its images are in the tar); skipped")
            return []
        kind = "urls"
    return [
        ShardSpec(kind, uri, start=s, stop=min(s + settings.shard_size, rows), fingerprint=_fingerprint([token]))
        for s in range(0, rows, settings.shard_size)
    ]
