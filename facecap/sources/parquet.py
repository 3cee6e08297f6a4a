"""Parquet files holding image bytes, Hugging Face ``{bytes, path}`` structs or image paths, read by row range."""

from __future__ import annotations

import bisect
import functools
import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import storage
from facecap.settings import ImageLimits, IngestSettings
from facecap.schema import Reason
from facecap.sources.captions import CAPTION_COLUMNS, sidecar_text
from facecap.sources.raw import Raw, RawReject, TooLarge, read_bounded
from facecap.sources.spec import ShardSpec

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes",
                 "image_path", "path", "file", "filename", "filepath", "url", "URL")
PARQUET_ENDINGS = (".parquet", ".pq")
# Parquet row groups are read several at a time, up to about this many rows: a file of many tiny row
# groups costs one read per window, not one per row group.
PARQUET_WINDOW_ROWS = 1024


def _is_bytes_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def holds_images(t: pa.DataType) -> bool:
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


def pick_typed(schema: pa.Schema, configured: str | None, candidates: tuple[str, ...],
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


def read_parquet(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
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
        image_col, image_problem = pick_typed(schema, settings.image_column, IMAGE_COLUMNS, holds_images)
        caption_col, caption_problem = pick_typed(schema, settings.caption_column, CAPTION_COLUMNS, _is_text_type) \
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
        captions = [sidecar_text(b) if b is not None else (None, None) for b in raw.to_pylist()]
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
            value = read_bounded(fs, target, limits.max_bytes)
        except FileNotFoundError:
            return RawReject(offset, Reason.MISSING_FILE, f"{target} does not exist")
        except OSError as exc:
            return RawReject(offset, Reason.UNREADABLE_MEMBER, f"{target}: {type(exc).__name__}: {exc}"[:300])
    return Raw(offset, value if isinstance(value, TooLarge) else bytes(value), caption, meta_json, encoding)
