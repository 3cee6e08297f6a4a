"""Ingest: the first stage, sources in, one image record per source image out.

Sources are folders of images (with optional ``stem.txt`` / ``stem.json``
sidecars), WebDataset tar shards, Parquet files of image bytes or paths, and
URL lists whose images are downloaded by the shard's ingest; how each is
planned, read and downloaded lives in facecap.sources. Local images are
referenced, never copied: a record says where its bytes are (source,
offset, size, fingerprint) and facecap.sources.reader.SourceBytes reads them
again for detect. Nothing here raises on bad input: an unreadable source
becomes a reject row that says why.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from facecap.settings import DownloadSettings, ImageLimits, IngestSettings
from facecap.schema import IMAGE_FIELDS, IMAGE_SCHEMA, is_transient
from facecap.shards import ShardInput, ShardStats
from facecap.sources.batch import ImageBatcher
from facecap.sources.captions import rights_from_meta
from facecap.sources.reader import read_source
from facecap.sources.spec import ShardSpec
from facecap.stages import urllist
from facecap.stages.base import Chunk, Counters, ReportSection, Stage
from facecap.stages.exclude import ExcludeReason, current_url_matcher, list_path


def ingest_shard(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits, counters: Counters,
                 download: DownloadSettings | None = None) -> Iterator[Chunk]:
    """Read one shard's records; yields chunks of image records (references, or bytes for downloads) and rejects."""
    yield from with_rights(_read_shard(spec, settings, limits, counters, download))


def _read_shard(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits, counters: Counters,
                download: DownloadSettings | None = None) -> Iterator[Chunk]:
    if spec.kind == "urls":
        url_settings = urllist.UrlSettings(settings, limits, download or DownloadSettings())
        yield from urllist.download_shard(spec, url_settings, counters)
        return
    batch = ImageBatcher(spec, limits)
    for item in read_source(spec, settings, limits):
        batch.take(item)
        if batch.ready():
            yield counters.count_batch(batch.flush())
    yield counters.count_batch(batch.flush())


RIGHTS_COLUMNS = ("source_url", "domain", "license")


def with_rights(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks with each image record's rights columns filled from its source metadata.

    Every source kind keeps its metadata in source_meta (sidecar JSON, WebDataset .json, other Parquet
    or URL-list columns, the listed URL of a download), so one reading of it serves them all.
    """
    for chunk in chunks:
        kept = chunk.kept
        if kept is not None and kept.num_rows:
            rights = [rights_from_meta(m) for m in kept.column("source_meta").to_pylist()]
            for i, name in enumerate(RIGHTS_COLUMNS):
                values = pa.array([r[i] for r in rights], pa.string())
                index = kept.schema.get_field_index(name)
                if index >= 0:  # derived from source_meta alone: the same values again
                    kept = kept.set_column(index, IMAGE_SCHEMA.field(name), values)
                else:
                    kept = kept.append_column(IMAGE_SCHEMA.field(name), values)
            chunk = Chunk(kept=kept.select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA), rejected=chunk.rejected)
        yield chunk


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
        "source_url": "the image's URL as its source lists it (URL list, LAION `URL`, img2dataset `url`, a sidecar "
                      "or column named url/image_url/img_url); null when the source names none (a local file: "
                      "see source, source_offset)",
        "domain": "host of source_url, lower-case, without port (null: no URL, a local file)",
        "license": "the licence the source states for the image (a license/licence key or column, any case; "
                   "LAION's LICENSE), verbatim; null when the source states none",
    }
    version = "4"
    key_column = "image_id"
    keyed_sections = ("ingest", "image", "download")
    # Connection counts and per-host limits, timeouts, retries, the allow-list and the contact URL decide
    # only whether and when a fetch succeeds; changing them must not re-download finished shards.
    unkeyed = frozenset({"download.connections", "download.timeout_s", "download.retries", "download.backoff_s",
                         "download.max_redirects", "download.allow_addresses", "download.user_agent",
                         "download.retry_failed", "download.domain_connections", "download.domain_requests_per_s",
                         "download.max_retry_after_s", "download.contact_url",
                         "download.host_limits_scope"})
    priority = 0
    # Reading and probing local files and downloading URLs wait on storage and the network:
    # ingest never holds a CPU slot that detect could use.
    io_bound = True
    retries = 2  # flaky storage or network
    retry_delay_seconds = (2, 10)

    def schema(self) -> pa.Schema:
        return IMAGE_SCHEMA

    def source_records(self, shard: ShardInput, previous: ShardStats | None = None):
        return [(shard.spec, previous)]

    def another_pass(self, cached: ShardStats, shard: ShardInput) -> bool:
        # A URL shard gets a next generation that downloads its transient failures again, and the rows the
        # exclusion list kept from download once the list no longer holds them.
        if cached.kind != "urls" or not self.cfg.download.retry_failed:
            return False
        return (any(is_transient(reason) for reason in cached.rejects)
                or (ExcludeReason.EXCLUDED in cached.rejects and self._unlisted_since(cached, shard.spec)))

    def _unlisted_since(self, cached: ShardStats, spec: ShardSpec) -> bool:
        """Whether a row the exclusion list kept from download is no longer matched by it."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from facecap.sources.urllist import iter_rows

        if not cached.rejects_written:
            return False
        rejects = pq.read_table(cached.rejects_output, columns=["reason", "source_offset"])
        offsets = set(rejects.filter(pc.equal(rejects.column("reason"), ExcludeReason.EXCLUDED))
                      .column("source_offset").to_pylist())
        matcher = self._url_matcher()
        try:
            rows = list(iter_rows(spec, self.cfg.ingest, offsets))
        except Exception:  # an unreadable list: its rows stay as they are
            return False
        return any(not (isinstance(url, str) and matcher.match(url))
                   for _, url, _ in rows)

    def _url_matcher(self):
        return current_url_matcher(list_path(self.cfg, self.out))

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        yield from with_rights(self._read(records, counters))

    def _read(self, records, counters: Counters) -> Iterator[Chunk]:
        ((spec, previous),) = records
        if spec.kind == "urls" and previous is not None:
            yield from urllist.retry_shard(spec, urllist.UrlSettings.of(self.cfg, self._url_matcher()), previous,
                                           counters)
        elif spec.kind == "urls":
            yield from urllist.download_shard(spec, urllist.UrlSettings.of(self.cfg, self._url_matcher()), counters)
        else:
            yield from _read_shard(spec, self.cfg.ingest, self.cfg.image, counters)


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
