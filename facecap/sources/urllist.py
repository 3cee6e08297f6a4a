"""URL lists (LAION-style metadata): recognise them, plan them into shards, read their rows.

A URL list is a Parquet, CSV or JSONL file with a URL column (`URL`/`url`,
or `ingest.image_column`), an optional caption (`TEXT`/`caption`/..., or
`ingest.caption_column`) and any other columns (SAMPLE_ID, WIDTH, HEIGHT,
NSFW, similarity, LICENSE...). It is sharded by row range like a Parquet of
bytes; a shard's ingest downloads its URLs (facecap.sources.downloader).

img2dataset output: its `NNNNN.parquet` next to `NNNNN.tar` lists what the
tar holds (plus the failures); it is not a URL list of undone work. Such a
sidecar is skipped with a note; the tar is the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from facecap import storage
from facecap.settings import IngestSettings
from facecap.sources.captions import CAPTION_COLUMNS, pick_column
from facecap.sources.spec import ShardSpec

URL_COLUMNS = ("url", "URL", "image_url", "img_url")
LIST_ENDINGS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
IMG2DATASET_SIDECAR_COLUMNS = {"key", "status", "error_message"}


def list_format(path: str) -> str | None:
    """csv/tsv/jsonl for text URL lists (by file ending), else None."""
    return next((fmt for end, fmt in LIST_ENDINGS.items() if path.lower().endswith(end)), None)


def url_column(names: list[str], settings: IngestSettings) -> str | None:
    """The URL column of a table, if it is a URL list (a configured image column counts only if URL-like)."""
    if settings.image_column:
        return settings.image_column if settings.image_column in names and settings.image_column in URL_COLUMNS \
            else None
    return next((c for c in URL_COLUMNS if c in names), None)


def is_img2dataset_sidecar(fs, path: str, names: list[str]) -> bool:
    """img2dataset's per-shard Parquet (key, status, error_message...) with its tar next to it."""
    if not IMG2DATASET_SIDECAR_COLUMNS <= set(names):
        return False
    stem = path.rsplit(".", 1)[0]
    return any(fs.exists(stem + end) for end in (".tar", ".tar.gz", ".tgz"))


def read_table(fs, path: str, fmt: str) -> pa.Table:
    """A CSV/TSV/JSONL URL list as a table (strings kept as strings)."""
    with fs.open(path, "rb") as fh:
        if fmt == "jsonl":
            return pajson.read_json(fh)
        delimiter = "\t" if fmt == "tsv" else ","
        return pacsv.read_csv(fh, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                              convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


def caption_column(names: list[str], settings: IngestSettings) -> str | None:
    return pick_column(names, settings.caption_column, CAPTION_COLUMNS)


# --------------------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class Unreadable:
    """Stands in for the URL of a row that could not be read."""

    detail: str


def iter_rows(spec: ShardSpec, settings: IngestSettings, only: set[str] | None = None) -> Iterator[tuple[str, Any, dict]]:
    """(offset, url, other columns) for the spec's rows (or only the given offsets), in order.

    Raises on an unreadable file (the caller rejects its rows); a corrupt Parquet row group
    gives its rows with an `Unreadable` in place of the URL.
    """
    fs, path = storage.filesystem(spec.source)
    fmt = list_format(path)
    if fmt is None:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            col = url_column(names, settings)
            offset = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                lo, hi = max(spec.start, offset), min(spec.stop, offset + n)
                if lo < hi and (only is None or any(lo <= int(o) < hi for o in only)):
                    try:
                        table = pf.read_row_group(rg).slice(lo - offset, hi - lo)
                    except Exception as exc:  # a corrupt page loses its row group's rows (as rejects), not the shard
                        bad = Unreadable(f"row group {rg}: {type(exc).__name__}: {exc}"[:300])
                        for row in range(lo, hi):
                            if only is None or str(row) in only:
                                yield str(row), bad, {}
                    else:
                        yield from _rows(table, lo, col, only)
                offset += n
                if offset >= spec.stop:
                    break
        return
    table = read_table(fs, path, fmt)
    col = url_column(table.column_names, settings)
    yield from _rows(table.slice(spec.start, spec.stop - spec.start), spec.start, col, only)


def _rows(table: pa.Table, first: int, col: str | None, only: set[str] | None) -> Iterator[tuple[str, Any, dict]]:
    binary = {f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    keep = [c for c in table.column_names if c not in binary]
    for i, rec in enumerate(table.select(keep).to_pylist()):
        offset = str(first + i)
        if only is not None and offset not in only:
            continue
        yield offset, rec.get(col) if col else None, rec


def list_columns(spec: ShardSpec) -> list[str]:
    fs, path = storage.filesystem(spec.source)
    fmt = list_format(path)
    if fmt is None:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow.names
    if fmt in ("csv", "tsv"):  # the header is enough
        with fs.open(path, "rb") as fh:
            options = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            return pacsv.open_csv(fh, parse_options=options).schema.names
    return read_table(fs, path, fmt).column_names


# --------------------------------------------------------------------------- planning


def plan_url_list(uri: str, fs, path: str, settings: IngestSettings, fingerprint: str) -> list[ShardSpec]:
    """Shards of a CSV/TSV/JSONL URL list; a text file without a URL column is not a source."""
    table = read_table(fs, path, list_format(path))
    if url_column(table.column_names, settings) is None:
        wanted = settings.image_column or f"one of {list(URL_COLUMNS)}"
        return [ShardSpec("unreadable", uri, detail=(
            f"not a folder, tar shard, Parquet file or image, and not a URL list: no URL column ({wanted}); "
            f"columns are {table.column_names}. Set ingest.image_column."))]
    rows = table.num_rows
    return [ShardSpec("urls", uri, start=s, stop=min(s + settings.shard_size, rows), fingerprint=fingerprint)
            for s in range(0, rows, settings.shard_size)]
