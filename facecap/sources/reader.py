"""Any local shard's images in source order, and the bytes of recorded images read again later."""

from __future__ import annotations

from typing import Iterator

from facecap.settings import ImageLimits, IngestSettings
from facecap.schema import Reason
from facecap.sources.folder import read_folder
from facecap.sources.parquet import read_parquet
from facecap.sources.raw import Raw, RawReject, fingerprint_bytes
from facecap.sources.spec import ShardSpec
from facecap.sources.tar import read_tar


def read_source(spec: ShardSpec, settings: IngestSettings, limits: ImageLimits,
                with_text: bool = True) -> Iterator[Raw | RawReject]:
    """The images of a local shard in source order (folder, tar or Parquet), each as found.

    `with_text=False` skips what only ingest needs (captions and sidecars),
    for readers that come back for the bytes alone.
    """
    readers = {"folder": read_folder, "tar": read_tar, "parquet": read_parquet}
    if spec.kind == "unreadable":
        yield RawReject(None, Reason.UNREADABLE_SOURCE, spec.detail)
        return
    yield from readers[spec.kind](spec, settings, limits, with_text)


class SourceBytes:
    """Reads the bytes of a shard's referenced images again, in the order ingest recorded them.

    Readers walk the source in the same order as ingest did, so a cursor over
    them finds each asked-for offset by moving forward: one pass over a tar or
    Parquet file, whatever its compression. Each image must match the
    fingerprint ingest recorded; one that does not (the source changed since)
    is reported, never silently used.
    """

    def __init__(self, spec: ShardSpec, ingest_settings: dict):
        self.spec = spec
        self.items = read_source(spec, IngestSettings(**ingest_settings.get("ingest", {})),
                                 ImageLimits(**ingest_settings.get("image", {})), with_text=False)

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
