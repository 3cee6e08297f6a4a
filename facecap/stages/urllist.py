"""URL-list sources (LAION-style metadata): plan, read, download into image shards.

A URL list is a Parquet, CSV or JSONL file with a URL column (`URL`/`url`,
or `ingest.image_column`), an optional caption (`TEXT`/`caption`/..., or
`ingest.caption_column`) and any other columns (SAMPLE_ID, WIDTH, HEIGHT,
NSFW, similarity, LICENSE...), which are kept verbatim in `source_meta`
together with the URL. It is sharded by row range like a Parquet of bytes;
a shard's ingest downloads its URLs (facecap.stages.download) and writes the
normal image shard. Every row ends in the shard or in rejects with its
download status, so the shard stats (and the manifest funnel) show the
reachable share.

Retry generations: a finished URL shard is never downloaded again, except
with `download.retry_failed`: then a shard whose rejects include transient
failures (timeout, connect_error, dns, 5xx, 429) gets a next generation
(the shard runner keys it "<input>+retry<n>"), that keeps the previous generation's records and
permanent rejects and downloads only the transient failures again. Reruns
always pick the latest generation, so retried records are neither lost nor
duplicated, and shards without transient failures keep their key (and their
downstream outputs).

img2dataset output: its `NNNNN.parquet` next to `NNNNN.tar` lists what the
tar holds (plus the failures); it is not a URL list of undone work. Such a
sidecar is skipped with a note; the tar is the source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from facecap import storage
from facecap.config import IngestSettings
from facecap.schema import IMAGE_SCHEMA, Reason, is_transient
from facecap.records import iter_parquet
from facecap.stages.base import Chunk, Counters
from facecap.stages.download import Downloader

if TYPE_CHECKING:
    from facecap.config import Config

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


def _caption_column(names: list[str], settings: IngestSettings) -> str | None:
    from facecap.stages.ingest import CAPTION_COLUMNS, _pick

    return _pick(names, settings.caption_column, CAPTION_COLUMNS)


# --------------------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class Unreadable:
    """Stands in for the URL of a row that could not be read."""

    detail: str


def iter_rows(spec, settings: IngestSettings, only: set[str] | None = None) -> Iterator[tuple[str, Any, dict]]:
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


# --------------------------------------------------------------------------- the shard


class _UrlShard:
    """Downloads one shard's rows into image records and rejects."""

    def __init__(self, spec, cfg: Config, counters: Counters):
        from facecap.stages.ingest import _Batcher

        self.spec, self.cfg = spec, cfg
        self.batch = _Batcher(spec, cfg.image, counters, keep_bytes=True)  # downloads are the only copy
        self.counters = counters

    def download(self, only: set[str] | None = None) -> Iterator[Chunk]:
        settings = self.cfg.ingest
        try:
            names = _columns(self.spec)
        except Exception as exc:
            yield from self._reject_all(only, Reason.UNREADABLE_SOURCE, f"{type(exc).__name__}: {exc}"[:300])
            return
        col = url_column(names, settings)
        if col is None:
            wanted = settings.image_column or f"one of {list(URL_COLUMNS)}"
            yield from self._reject_all(only, Reason.MISSING_COLUMNS,
                                        f"no URL column ({wanted}); columns are {names}. Set ingest.image_column.")
            return
        caption_col = _caption_column(names, settings)
        rows: dict[str, tuple[str | None, str | None]] = {}  # offset -> (caption, meta) while in flight
        urls: list[tuple[str, str]] = []

        def requests() -> Iterator[str]:
            for offset, url, rec in iter_rows(self.spec, settings, only):
                caption = rec.get(caption_col) if caption_col else None
                meta = {k: v for k, v in rec.items() if k not in (caption_col, col) and v is not None}
                meta["url"] = url
                rows[offset] = (str(caption).strip() if caption is not None else None,
                                json.dumps(meta, default=str, sort_keys=True))
                urls.append((offset, url))
                yield url if isinstance(url, str) else ""  # "" -> invalid_url below

        downloader = Downloader(self.cfg.download, self.cfg.image, extra_allow=self.cfg.models.allow_addresses)
        for index, fetched in enumerate(downloader.iter_fetch(requests())):
            offset, url = urls[index]
            caption, meta = rows.pop(offset)
            if isinstance(url, Unreadable):
                self.batch.reject(offset, Reason.UNREADABLE_MEMBER, url.detail)
            elif not isinstance(url, str) or not url.strip():
                self.batch.reject(offset, Reason.INVALID_URL, f"column {col} is empty or not text")
            elif fetched.ok:
                if fetched.resized_from or fetched.final_url != url or fetched.attempts > 1:
                    extra = json.loads(meta)
                    extra["download"] = {k: v for k, v in (("final_url", fetched.final_url if fetched.final_url != url
                                                             else None), ("attempts", fetched.attempts),
                                                            ("resized_from", fetched.resized_from)) if v}
                    meta = json.dumps(extra, default=str, sort_keys=True)
                self.counters.extra["downloaded_bytes"] += len(fetched.data)
                self.batch.add(offset, fetched.data, caption, meta)
            else:
                tries = f" ({fetched.attempts} attempts)" if fetched.attempts > 1 else ""
                self.batch.reject(offset, fetched.status, f"{url}: {fetched.detail}{tries}"[:500])
            if fetched.attempts > 1:
                self.counters.extra["retried_urls"] += 1
            if self.batch.ready():
                yield self.batch.flush()
        yield self.batch.flush()

    def _reject_all(self, only: set[str] | None, reason: str, detail: str) -> Iterator[Chunk]:
        offsets = sorted(only, key=int) if only is not None else (str(r) for r in range(self.spec.start, self.spec.stop))
        for offset in offsets:
            self.batch.reject(offset, reason, detail)
        yield self.batch.flush()


def _columns(spec) -> list[str]:
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


def download_shard(spec, cfg: Config, counters: Counters) -> Iterator[Chunk]:
    """Generation 0 of a URL shard: download every row."""
    yield from _UrlShard(spec, cfg, counters).download()


def retry_shard(spec, cfg: Config, previous, counters: Counters) -> Iterator[Chunk]:
    """Next generation: keep the previous records and permanent rejects, download the transient failures again."""
    for table in iter_parquet(previous.output):
        table = table.cast(IMAGE_SCHEMA)
        counters.rows_in += table.num_rows
        counters.rows_out += table.num_rows
        yield Chunk(kept=table)
    rejects = pq.read_table(previous.rejects_output) if previous.rejects_written else None
    again: set[str] = set()
    if rejects is not None:
        transient = pa.array([is_transient(r) for r in rejects.column("reason").to_pylist()], pa.bool_())
        kept_rejects = rejects.filter(pc.invert(transient))
        again = set(rejects.filter(transient).column("source_offset").to_pylist())
        if kept_rejects.num_rows:
            counters.rows_in += kept_rejects.num_rows
            counters.add_rejects(kept_rejects)
            yield Chunk(rejected=kept_rejects)
    counters.extra["retried_transient"] += len(again)
    if again:
        yield from _UrlShard(spec, cfg, counters).download(only=again)


# --------------------------------------------------------------------------- planning


def plan_url_list(uri: str, fs, path: str, settings: IngestSettings, fingerprint: str) -> list:
    """Shards of a CSV/TSV/JSONL URL list; a text file without a URL column is not a source."""
    from facecap.stages.ingest import ShardSpec

    table = read_table(fs, path, list_format(path))
    if url_column(table.column_names, settings) is None:
        wanted = settings.image_column or f"one of {list(URL_COLUMNS)}"
        return [ShardSpec("unreadable", uri, detail=(
            f"not a folder, tar shard, Parquet file or image, and not a URL list: no URL column ({wanted}); "
            f"columns are {table.column_names}. Set ingest.image_column."))]
    rows = table.num_rows
    return [ShardSpec("urls", uri, start=s, stop=min(s + settings.shard_size, rows), fingerprint=fingerprint)
            for s in range(0, rows, settings.shard_size)]
