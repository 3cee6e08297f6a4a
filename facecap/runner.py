"""Run any stage on one shard: keyed, verified on reuse, written atomically.

Outputs are named by a key derived from what produced them (the input's key,
the stage's name and version, its settings hash and the model identity):

    OUT/shards/<stage>/<key>.parquet          the columns the stage adds, for the rows it kept
    OUT/shards/<stage>/<key>.rejects.parquet  rows rejected, with reasons
    OUT/shards/<stage>/<key>.json             counts, versions, sizes and checksums; written last

The stats file marks the shard done. A rerun finds it, checks that both
outputs still have the size and sha256 it records, and skips the work
(resume after a crash); an output that is missing, truncated or corrupt is
reported and recomputed. Changed inputs or settings give a new key, so only
those shards run again (incremental re-curation). Nothing here knows Prefect
or Dask.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import __version__, storage
from facecap.settings import settings_hash
from facecap.config import Config
from facecap.records import read_view
from facecap.schema import REJECT_SCHEMA
from facecap.shards import ShardInput, ShardStats
from facecap.stages.base import Counters, Stage, StagePlan
from facecap.stages.ingest import Ingest


def stage_key(stage: str, stage_version: str, settings: str, model_id: str | None, input_key: str) -> str:
    blob = json.dumps([stage, stage_version, settings, model_id or "", input_key]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class ShardPaths:
    out: str
    stage: str
    key: str

    def _path(self, suffix: str) -> str:
        return storage.join(self.out, "shards", self.stage, f"{self.key}{suffix}")

    @property
    def data(self) -> str:
        return self._path(".parquet")

    @property
    def rejects(self) -> str:
        return self._path(".rejects.parquet")

    @property
    def stats(self) -> str:
        return self._path(".json")


def file_digest(url: str) -> dict[str, Any]:
    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def verify(stats: ShardStats) -> str | None:
    """Why the outputs a stats file describes cannot be reused (None when they are intact)."""
    for name, url in (("data", stats.output), ("rejects", stats.rejects_output)):
        expected = stats.files.get(name)
        if not expected:
            return f"{url}: its stats file records no checksum (written by an older version)"
        if not storage.exists(url):
            return f"{url} is missing"
        fs, path = storage.filesystem(url)
        size = fs.size(path)
        if size != expected["bytes"]:
            return f"{url} is {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
        if file_digest(url)["sha256"] != expected["sha256"]:
            return f"{url} does not match its sha256 (corrupt)"
    return None


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


# One instance per stage and configuration in each worker process, so a model loads once per worker.
_INSTANCES: dict[str, Stage] = {}


def _instance(stage: type[Stage], cfg: Config, plan: StagePlan, out: str) -> Stage:
    ident = json.dumps([stage.name, plan.model, out, cfg.model_dump(mode="json")], sort_keys=True, default=str)
    current = _INSTANCES.get(stage.name)
    if current is None or getattr(current, "_ident", None) != ident:
        current = stage(cfg, plan, out)
        current._ident = ident
        current._loaded = False
        _INSTANCES[stage.name] = current
    return current


def input_key(shard: ShardInput) -> str:
    return shard.outputs[-1].key if shard.outputs else settings_hash(shard.spec.key_material())


class _OverBudget(Exception):
    """Verifying a cached output would read more bytes than the caller allowed."""


def _read_cached(paths: ShardPaths, budget: list[int] | None = None) -> tuple[ShardStats | None, str | None]:
    """The stats of an earlier run of this key, if its outputs are intact; else why not. With `budget` (bytes
    left to read, decremented), raises _OverBudget instead of verifying more than that."""
    if not storage.exists(paths.stats):
        return None, None
    try:
        stats = ShardStats.from_json(storage.read_json(paths.stats))
    except (ValueError, TypeError) as exc:
        return None, f"{paths.stats} is unreadable ({type(exc).__name__}: {exc})"
    if budget is not None:
        size = sum(int(f.get("bytes", 0)) for f in stats.files.values() if isinstance(f, dict))
        if size > budget[0]:
            raise _OverBudget
        budget[0] -= size
    problem = verify(stats)
    return (None, problem) if problem else (stats, None)


def _keyed_paths(stage: type[Stage], shard: ShardInput, out: str, cfg: Config, plan: StagePlan):
    settings = stage.settings_hash(cfg)
    base_input = input_key(shard)

    def paths(generation: int) -> ShardPaths:
        key_input = base_input if generation == 0 else f"{base_input}+retry{generation}"
        return ShardPaths(out, stage.name, stage_key(stage.name, stage.version, settings, plan.model, key_input))

    return settings, base_input, paths


def _latest(paths, budget: list[int] | None = None) -> tuple[ShardStats | None, int, str | None]:
    """The latest intact generation of a finished shard (a stage may build next generations on one: ingest
    re-downloading transient failures), its number, and why the generation after it cannot be reused."""
    latest, problem = _read_cached(paths(0), budget)
    generation = 0
    while latest is not None:
        later, problem = _read_cached(paths(generation + 1), budget)
        if later is None:
            break
        latest, generation = later, generation + 1
    return latest, generation, problem


def reusable(stage: type[Stage], shard: ShardInput, out: str, cfg: Config, plan: StagePlan,
             budget: list[int]) -> ShardStats | None:
    """The stats `run_stage` would return without computing: the stage's finished, verified output on this
    shard. None when it would compute (nothing finished, damaged, another pass) or when verifying would read
    more than budget[0] bytes (decremented by what is read): running the stage then decides. Loads no model."""
    try:
        latest, _, problem = _latest(_keyed_paths(stage, shard, out, cfg, plan)[2], budget)
    except _OverBudget:
        return None
    if latest is None or problem is not None or _instance(stage, cfg, plan, out).another_pass(latest, shard):
        return None
    latest.cached = True
    return latest


def run_stage(stage: type[Stage], shard: ShardInput, out: str, cfg: Config, plan: StagePlan) -> ShardStats:
    """Run `stage` on one shard unless its intact output exists; returns the shard's stats."""
    settings, base_input, paths = _keyed_paths(stage, shard, out, cfg, plan)
    instance = _instance(stage, cfg, plan, out)
    latest, generation, problem = _latest(paths)
    previous = None
    if latest is not None:
        if problem is None and not instance.another_pass(latest, shard):
            latest.cached = True
            return latest
        # A new generation on the latest intact one (or the damaged next one, rebuilt).
        previous, generation = latest, generation + 1
    target = paths(generation)
    if not instance._loaded:
        instance.load()  # once per worker process, before the shard's clock starts
        instance._loaded = True
    stats = _compute(instance, shard, target, previous)
    stats.retry_generation = generation
    stats.input_key = base_input
    stats.settings_hash = settings
    stats.model = plan.model
    storage.write_json_atomic(target.stats, stats.to_json())
    stats.repaired = problem
    return stats


def stage_records(stage: Stage, shard: ShardInput, previous: ShardStats | None = None) -> Iterable:
    """What the stage's `process` reads: what it reads from the shard's source itself, or else the
    columns in its `reads` from the shard's chain so far, joined."""
    records = stage.source_records(shard, previous)
    if records is None:
        records = read_view(shard, stage.reads, stage.batch_rows)
    return records


def _compute(stage: Stage, shard: ShardInput, paths: ShardPaths, previous: ShardStats | None) -> ShardStats:
    started = time.time()
    counters = Counters()
    schema = stage.schema()
    data = _StreamWriter(paths.data, schema)
    rejects = _StreamWriter(paths.rejects, REJECT_SCHEMA)
    try:
        for chunk in stage.process(stage_records(stage, shard, previous), counters):
            data.write(chunk.kept)
            rejects.write(chunk.rejected)
        data.commit()
        rejects.commit()
    except BaseException:
        data.abort()
        rejects.abort()
        raise
    return ShardStats(
        stage=stage.name, input=shard.label, source=shard.spec.source, key=paths.key, kind=shard.spec.kind,
        stage_version=stage.version, output=paths.data, rejects_output=paths.rejects,
        key_column=stage.key_column, columns=schema.names, extends=[f"{o.stage}:{o.key}" for o in shard.outputs],
        rows_in=counters.rows_in, rows_out=counters.rows_out, rows_written=data.rows,
        rejects=dict(sorted(counters.rejects.items())), rejects_written=rejects.rows,
        extra=dict(sorted(counters.extra.items())),
        files={"data": file_digest(paths.data), "rejects": file_digest(paths.rejects)},
        seconds=round(time.time() - started, 3),
        started_at=datetime.fromtimestamp(started, timezone.utc).isoformat(),
        worker=f"{socket.gethostname()}:{os.getpid()}", facecap_version=__version__,
    )


def run_ingest(spec, out: str, cfg: Config) -> ShardStats:
    """Ingest one source shard (the first stage, which needs no upstream output)."""
    source_settings = {"ingest": cfg.ingest.model_dump(mode="json"), "image": cfg.image.model_dump(mode="json")}
    return run_stage(Ingest, ShardInput(spec, (), source_settings), out, cfg, StagePlan(True))
