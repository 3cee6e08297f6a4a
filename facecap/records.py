"""Read a shard's records: the outputs of its chain of stages, joined.

Every stage writes only the columns it adds, keyed by ``sample_id`` (ingest
by ``image_id``), in its input's order, and only for the rows it kept. So the
rows of a later output are a subsequence of an earlier one's, and a stream
merge joins them: walk the last output, and advance a cursor over each earlier
output to the matching key. Memory stays bounded by a batch, whatever the
shard size, and nothing is sorted or hashed.

Local sources are referenced, not copied: ingest records where each image
lies and its fingerprint. Asking for ``source_image`` reads the bytes from the
source again (facecap.sources.reader.SourceBytes) and checks the fingerprint;
``source_problem`` then says why an image could not be had (null when fine).
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import storage
from facecap.shards import OutputRef, ShardInput
from facecap.sources.reader import SourceBytes

SOURCE_IMAGE = "source_image"
SOURCE_PROBLEM = "source_problem"


class BrokenChain(RuntimeError):
    """An output does not hold the rows the next one says it extends: a cache made by other code or damaged."""


def iter_parquet(url: str, columns: list[str] | None = None, batch_rows: int = 64) -> Iterator[pa.Table]:
    """Stream a Parquet file in small batches (memory bounded by the batch, not the file)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])


class _Cursor:
    """Walks one output in order, finding each asked-for key at or after the current position."""

    def __init__(self, output: OutputRef, columns: list[str], batch_rows: int):
        self.output = output
        self.batches = iter_parquet(output.data, sorted(set(columns) | {output.key_column}), batch_rows)
        self.table: pa.Table | None = None
        self.keys: list = []
        self.pos = 0

    def find(self, key) -> tuple[pa.Table, int]:
        while True:
            if self.pos >= len(self.keys):
                try:
                    self.table = next(self.batches)
                except StopIteration:
                    raise BrokenChain(f"{self.output.data} ({self.output.stage}) has no row {key!r} after the "
                                      "previous one: its output does not match the stages after it") from None
                self.keys = self.table.column(self.output.key_column).to_pylist()
                self.pos = 0
            if self.keys[self.pos] == key:
                return self.table, self.pos  # not advanced: several faces share one image row
            self.pos += 1


def _gather(matches: list[tuple[pa.Table, int]], columns: list[str]) -> pa.Table:
    parts, run, run_table = [], [], None
    for table, index in matches:
        if table is not run_table and run:
            parts.append(run_table.select(columns).take(pa.array(run, pa.int64())))
            run = []
        run_table = table
        run.append(index)
    if run:
        parts.append(run_table.select(columns).take(pa.array(run, pa.int64())))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def read_view(shard: ShardInput, columns: list[str] | tuple[str, ...], batch_rows: int = 64) -> Iterator[pa.Table]:
    """The shard's records (the last output's rows) with `columns` from any stage of its chain."""
    outputs = shard.outputs
    if not outputs:
        raise ValueError(f"{shard.label}: no stage output to read")
    wanted = list(columns)
    with_bytes = SOURCE_IMAGE in wanted
    if with_bytes:  # the reference and fingerprint that find the bytes again
        wanted += [c for c in ("source_offset", "source_fingerprint") if c not in wanted]
    provider: dict[str, int] = {}
    for col in wanted:
        if col == SOURCE_PROBLEM:
            continue
        found = [i for i in range(len(outputs)) if col in outputs[i].columns]
        if not found:
            raise KeyError(f"column {col!r} is written by none of the stages run on {shard.label} "
                           f"({', '.join(o.stage for o in outputs)})")
        provider[col] = found[-1]
    last = len(outputs) - 1
    needed = sorted({i for i in provider.values() if i != last}, reverse=True)
    # Walking back, each earlier output is found by its key, which a later output must carry
    # (detect carries image_id for ingest): fetch those keys along the way.
    fetch: dict[int, list[str]] = {}
    have = set(outputs[last].columns)
    for i in needed:
        if outputs[i].key_column not in have:
            raise BrokenChain(f"cannot join {outputs[i].stage} of {shard.label}: no later stage carries "
                              f"{outputs[i].key_column}")
        deeper = {outputs[k].key_column for k in needed if k < i} - have
        fetch[i] = sorted({c for c, p in provider.items() if p == i} | (deeper & set(outputs[i].columns)))
        have |= set(fetch[i])
    own = sorted({c for c, p in provider.items() if p == last} | {outputs[last].key_column})
    cursors = {i: _Cursor(outputs[i], fetch[i], batch_rows) for i in needed}
    resolver = None
    for table in iter_parquet(outputs[last].data, own, batch_rows):
        for i in needed:
            key = outputs[i].key_column
            part = _gather([cursors[i].find(k) for k in table.column(key).to_pylist()], fetch[i])
            for name in part.column_names:
                if name not in table.column_names:
                    table = table.append_column(part.schema.field(name), part.column(name))
        if with_bytes:
            if resolver is None:
                resolver = SourceBytes(shard.spec, shard.ingest_settings)
            table = _with_source_bytes(table, resolver)
        yield table.select([c for c in columns])
    if resolver is not None:
        resolver.close()


def _with_source_bytes(table: pa.Table, resolver) -> pa.Table:
    stored = table.column(SOURCE_IMAGE).to_pylist()
    offsets = table.column("source_offset").to_pylist()
    prints = table.column("source_fingerprint").to_pylist()
    data, problems = [], []
    for blob, offset, fingerprint in zip(stored, offsets, prints):
        problem = None
        if blob is None:  # a reference: read the bytes from the source again
            blob, problem = resolver.read(offset, fingerprint)
        data.append(blob)
        problems.append(problem)
    table = table.set_column(table.column_names.index(SOURCE_IMAGE), SOURCE_IMAGE, pa.array(data, pa.binary()))
    return table.append_column(SOURCE_PROBLEM, pa.array(problems, pa.string()))


def record_columns(shard: ShardInput, exclude: tuple[str, ...] = (SOURCE_IMAGE,)) -> list[str]:
    """Every column of the shard's chain (what the release publishes): the face record's own columns
    lead (detect's), then its source's (ingest's), then what later stages added, in chain order."""
    outputs = list(shard.outputs)
    order = outputs[1:2] + outputs[:1] + outputs[2:]
    seen: dict[str, None] = {}
    for output in order:
        for col in output.columns:
            if col not in exclude:
                seen.setdefault(col, None)
    return list(seen)


def in_memory_images(named: dict[str, bytes], limits, source: str = "mem://") -> pa.Table:
    """Image records (ingest's layout, bytes inline) for encoded images held in memory, by name: what tests and
    benches hand the detect stage's code without writing files. `limits`: the config's `image` section."""
    from facecap.schema import IMAGE_SCHEMA, image_id_for
    from facecap.sources.images import probe

    rows = []
    for name, data in named.items():
        p = probe(data, limits)
        rows.append({"image_id": image_id_for(source, name), "source": source, "source_offset": name,
                     "source_caption": None, "source_meta": None, "source_image": data,
                     "source_width": p.width or 0, "source_height": p.height or 0, "source_format": p.format or "?",
                     "source_size": len(data), "source_fingerprint": "in-memory"})
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
