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

from facecap.config import Config, DownloadSettings, ImageLimits, IngestSettings
from facecap.schema import IMAGE_SCHEMA, is_transient
from facecap.shards import ShardInput, ShardStats
from facecap.sources.batch import ImageBatcher
from facecap.sources.reader import read_source
from facecap.sources.spec import ShardSpec
from facecap.stages import urllist
from facecap.stages.base import Chunk, Counters, Stage


def ingest_shard(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits, counters: Counters,
                 download: DownloadSettings | None = None) -> Iterator[Chunk]:
    """Read one shard's records; yields chunks of image records (references, or bytes for downloads) and rejects."""
    if spec.kind == "urls":
        cfg = Config(ingest=settings, image=limits, download=download or DownloadSettings())
        yield from urllist.download_shard(spec, cfg, counters)
        return
    batch = ImageBatcher(spec, limits)
    for item in read_source(spec, settings, limits):
        batch.take(item)
        if batch.ready():
            yield counters.count_batch(batch.flush())
    yield counters.count_batch(batch.flush())


class Ingest(Stage):
    """Sources in, one image record per source image out (references to local bytes; downloads' bytes)."""

    name = "ingest"
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

    def source_records(self, shard: ShardInput, previous: ShardStats | None = None):
        return [(shard.spec, previous)]

    def another_pass(self, cached: ShardStats) -> bool:
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
