"""Run one stage over one shard: keyed, skippable, atomic.

Outputs are named by a key derived from what produced them (the input shard's
key, the stage's name and version, its settings hash and the model identity):

    OUT/shards/<stage>/<key>.parquet          records that go on
    OUT/shards/<stage>/<key>.rejects.parquet  records rejected, with reasons
    OUT/shards/<stage>/<key>.json             counts and versions; written last

The stats file marks the shard done. A rerun finds it and skips the work
(resume after a crash); changed inputs or settings give a new key, so only
those shards run again (incremental re-curation). Nothing here knows Prefect.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import __version__, storage
from facecap.schema import REJECT_SCHEMA
from facecap.stages.base import Chunk, Counters


def stage_key(stage: str, stage_version: str, settings_hash: str, model_id: str, input_key: str) -> str:
    blob = json.dumps([stage, stage_version, settings_hash, model_id, input_key]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class ShardPaths:
    out: str
    stage: str
    key: str

    @property
    def data(self) -> str:
        return storage.join(self.out, "shards", self.stage, f"{self.key}.parquet")

    @property
    def rejects(self) -> str:
        return storage.join(self.out, "shards", self.stage, f"{self.key}.rejects.parquet")

    @property
    def stats(self) -> str:
        return storage.join(self.out, "shards", self.stage, f"{self.key}.json")


class _StreamWriter:
    """Writes Parquet batches to an AtomicFile; `commit` publishes it under its name."""

    def __init__(self, url: str, schema: pa.Schema):
        self.schema = schema
        self.target = storage.AtomicFile(url)
        self.writer = pq.ParquetWriter(self.target.fh, schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table | None) -> None:
        if table is not None and table.num_rows:
            self.writer.write_table(table.select(self.schema.names).cast(self.schema), row_group_size=256)
            self.rows += table.num_rows

    def commit(self) -> None:
        self.writer.close()
        self.target.commit()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.target.abort()


def run_shard(
    paths: ShardPaths,
    schema: pa.Schema,
    produce: Callable[[Counters], Iterator[Chunk]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Run `produce` unless its output exists; write outputs atomically; return the shard's stats."""
    if storage.exists(paths.stats):
        stats = storage.read_json(paths.stats)
        stats["cached"] = True
        return stats
    started = time.time()
    counters = Counters()
    data = _StreamWriter(paths.data, schema)
    rejects = _StreamWriter(paths.rejects, REJECT_SCHEMA)
    try:
        for chunk in produce(counters):
            data.write(chunk.kept)
            rejects.write(chunk.rejected)
        data.commit()
        rejects.commit()
    except BaseException:
        data.abort()
        rejects.abort()
        raise
    stats = {
        **meta,
        "stage": paths.stage,
        "key": paths.key,
        "output": paths.data,
        "rejects_output": paths.rejects,
        "rows_in": counters.rows_in,
        "rows_out": counters.rows_out,
        "rows_written": data.rows,
        "rejects": dict(sorted(counters.rejects.items())),
        "rejects_written": rejects.rows,
        "extra": dict(sorted(counters.extra.items())),
        "seconds": round(time.time() - started, 3),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "facecap_version": __version__,
    }
    storage.write_json_atomic(paths.stats, stats)
    stats["cached"] = False
    return stats


def iter_shard(url: str, batch_rows: int = 64) -> Iterator[pa.RecordBatch]:
    """Stream a shard's records in small batches (memory stays bounded by the batch)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        yield from pf.iter_batches(batch_size=batch_rows)
