"""URL-list shards: download their rows into image records (generation 0), or download a finished
shard's transient failures again (next generations).

Every row ends in the shard or in rejects with its download status, so the
shard stats (and the manifest funnel) show the reachable share.

Retry generations: a finished URL shard is never downloaded again, except
with `download.retry_failed`: then a shard whose rejects include transient
failures (timeout, connect_error, dns, 5xx, 429) gets a next generation
(the shard runner keys it "<input>+retry<n>"), that keeps the previous generation's records and
permanent rejects and downloads only the transient failures again. Reruns
always pick the latest generation, so retried records are neither lost nor
duplicated, and shards without transient failures keep their key (and their
downstream outputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.records import iter_parquet
from facecap.settings import DownloadSettings, ImageLimits, IngestSettings
from facecap.schema import IMAGE_SCHEMA, Reason, is_transient
from facecap.shards import ShardStats
from facecap.sources.batch import ImageBatcher
from facecap.sources.downloader import Downloader
from facecap.sources.spec import ShardSpec
from facecap.sources.urllist import URL_COLUMNS, Unreadable, caption_column, iter_rows, list_columns, url_column
from facecap.stages.base import Chunk, Counters
from facecap.stages.exclude import ExcludeReason, UrlMatcher

if TYPE_CHECKING:
    from facecap.config import Config


@dataclass(frozen=True)
class UrlSettings:
    """What downloading a URL shard reads of the run's config."""

    ingest: IngestSettings
    image: ImageLimits
    download: DownloadSettings
    allow_addresses: tuple[str, ...] = ()  # models.allow_addresses: private ranges the user allowed
    # The exclusion list's url/domain entries as the run reads them: a matching URL is never requested.
    # Not part of any key: the release pass applies the list again to shards downloaded before an entry.
    excluded: UrlMatcher | None = None

    @classmethod
    def of(cls, cfg: Config, excluded: UrlMatcher | None = None) -> UrlSettings:
        return cls(cfg.ingest, cfg.image, cfg.download, tuple(cfg.models.allow_addresses), excluded)


class _UrlShard:
    """Downloads one shard's rows into image records and rejects."""

    def __init__(self, spec: ShardSpec, settings: UrlSettings, counters: Counters):
        self.spec, self.settings = spec, settings
        self.batch = ImageBatcher(spec, settings.image, keep_bytes=True)  # downloads are the only copy
        self.counters = counters

    def download(self, only: set[str] | None = None) -> Iterator[Chunk]:
        settings = self.settings.ingest
        try:
            names = list_columns(self.spec)
        except Exception as exc:
            yield from self._reject_all(only, Reason.UNREADABLE_SOURCE, f"{type(exc).__name__}: {exc}"[:300])
            return
        col = url_column(names, settings)
        if col is None:
            wanted = settings.image_column or f"one of {list(URL_COLUMNS)}"
            yield from self._reject_all(only, Reason.MISSING_COLUMNS,
                                        f"no URL column ({wanted}); columns are {names}. Set ingest.image_column.")
            return
        caption_col = caption_column(names, settings)
        rows: dict[str, tuple[str | None, str | None]] = {}  # offset -> (caption, meta) while in flight
        urls: list[tuple[str, str]] = []
        excluded = self.settings.excluded
        skipped: list[tuple[str, str]] = []  # (offset, the list line) of URLs the exclusion list keeps us from

        def requests() -> Iterator[str]:
            for offset, url, rec in iter_rows(self.spec, settings, only):
                hit = excluded.match(url) if excluded and isinstance(url, str) else None
                if hit is not None:
                    skipped.append((offset, hit.shown()))
                    continue
                caption = rec.get(caption_col) if caption_col else None
                meta = {k: v for k, v in rec.items() if k not in (caption_col, col) and v is not None}
                meta["url"] = url
                rows[offset] = (str(caption).strip() if caption is not None else None,
                                json.dumps(meta, default=str, sort_keys=True))
                urls.append((offset, url))
                yield url if isinstance(url, str) else ""  # "" -> invalid_url below

        downloader = Downloader(self.settings.download, self.settings.image, extra_allow=self.settings.allow_addresses)
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
                yield self.counters.count_batch(self.batch.flush())
        # After the downloads, in list order: the shard's rows come out the same however the fetches interleave.
        for offset, line in skipped:
            self.batch.reject(offset, ExcludeReason.EXCLUDED, f"matches exclusion list {line}: not requested")
        if skipped:
            self.counters.extra["excluded_before_download"] += len(skipped)
        yield self.counters.count_batch(self.batch.flush())

    def _reject_all(self, only: set[str] | None, reason: str, detail: str) -> Iterator[Chunk]:
        offsets = sorted(only, key=int) if only is not None else (str(r) for r in range(self.spec.start, self.spec.stop))
        for offset in offsets:
            self.batch.reject(offset, reason, detail)
        yield self.counters.count_batch(self.batch.flush())


def download_shard(spec: ShardSpec, settings: UrlSettings, counters: Counters) -> Iterator[Chunk]:
    """Generation 0 of a URL shard: download every row."""
    yield from _UrlShard(spec, settings, counters).download()


def retry_shard(spec: ShardSpec, settings: UrlSettings, previous: ShardStats, counters: Counters) -> Iterator[Chunk]:
    """Next generation: keep the previous records and permanent rejects, download the transient failures again,
    and the rows the exclusion list kept from download (those still listed are again not requested)."""
    for table in iter_parquet(previous.output):
        table = table.cast(IMAGE_SCHEMA)
        counters.rows_in += table.num_rows
        counters.rows_out += table.num_rows
        yield Chunk(kept=table)
    rejects = pq.read_table(previous.rejects_output) if previous.rejects_written else None
    again: set[str] = set()
    if rejects is not None:
        reasons = rejects.column("reason").to_pylist()
        transient = pa.array([is_transient(r) or r == ExcludeReason.EXCLUDED for r in reasons], pa.bool_())
        kept_rejects = rejects.filter(pc.invert(transient))
        again = set(rejects.filter(transient).column("source_offset").to_pylist())
        if kept_rejects.num_rows:
            counters.rows_in += kept_rejects.num_rows
            counters.add_rejects(kept_rejects)
            yield Chunk(rejected=kept_rejects)
        counters.extra["retried_transient"] += sum(is_transient(r) for r in reasons)
    if again:
        yield from _UrlShard(spec, settings, counters).download(only=again)
