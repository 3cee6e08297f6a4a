"""What every stage shares: a stream of (kept, rejected) record batches and counters.

A stage is a plain generator over record batches. It knows nothing of Prefect,
Dask or storage; the shard runner (facecap.shards) feeds it and writes what it
yields, so a stage can be unit-tested and benchmarked on in-memory tables.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from facecap.schema import reject_rows


@dataclass
class Chunk:
    """Part of a stage's output: records that go on, and records rejected with a reason."""

    kept: pa.Table | None = None
    rejected: pa.Table | None = None


@dataclass
class Counters:
    """What a stage saw and did to one shard; written next to the shard and into the manifest."""

    rows_in: int = 0
    rows_out: int = 0
    rejects: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # stage-specific counts (e.g. faces found)

    def add_rejects(self, table: pa.Table | None) -> None:
        if table is not None and table.num_rows:
            self.rejects.update(table.column("reason").to_pylist())


StageStream = Iterator[Chunk]


def rejected(rows: list[dict]) -> pa.Table | None:
    return reject_rows(rows) if rows else None
