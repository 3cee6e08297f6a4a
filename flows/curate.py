"""The curate flow: sources -> the registered stages (facecap.chain) -> validate -> release.

The flow walks the planned chain of stages (facecap.chain): a shard's next
stage is submitted the moment its previous one finishes, and later stages
run before further upstream work (their higher rank), so records reach the
release early. The driver is the only writer of the manifest and
of the release; workers write only their own shard outputs. Dask is behind
flows/executor.py; stages run through one generic task (tasks/stages.py).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from facecap import manifest, release, runlock, storage
from facecap import chain as registry
from facecap.chain import plan_run
from facecap.config import Config, config_model
from facecap.flows.executor import (  # noqa: F401
    ShardExecutor, io_slots, local_slots, size_local_cluster, task_runner_for)
from facecap.flows.run_artifacts import publish_curate_artifacts
from facecap.quality.validate import ReleaseBlocked, blocked_message
from facecap.results import CurateResult, FunnelRow, ValidationSummary
from facecap.runner import reusable
from facecap.shards import ShardInput, ShardStats
from facecap.sources.plan import plan_shards
from facecap.tasks.stages import stage_task
from facecap.tasks.validate import validate_task


# Bytes of finished shard outputs the flow verifies itself (size and sha256) before deciding that a stage is
# done on a shard, so a rerun of already done work runs no task and starts no worker. Past this, shards go to
# the workers, which verify them in parallel: a resume of a large run does not hash terabytes in one process.
DRIVER_VERIFY_BYTES = 256 << 20


class CurateFailed(RuntimeError):
    """An expected failure, told in one line: shards failed (a rerun resumes), OUT is in use by another run, or
    OUT's file system refused a write (full, read-only, no permission)."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Progress:
    """Per-stage progress lines for the console and the Prefect UI.

    The first shard, then at most one line every `every_seconds`, and the
    last: a run of ten thousand shards stays readable. Failures always show.
    The time left is estimated from the rate at which this stage finished
    shards it had to compute (cached ones cost nothing).
    """

    logger: Any
    total: int
    stage: str
    every_seconds: float = 5.0
    done: int = 0
    cached: int = 0
    failed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    started: float = field(default_factory=time.time)
    last_line: float = 0.0

    def update(self, stats: ShardStats) -> None:
        self.done += 1
        if stats.error:
            self.failed += 1
            self.logger.error(f"{self.stage} {stats.input}: FAILED: {stats.error}")
        else:
            self.cached += stats.cached
            self.rows_in += stats.rows_in
            self.rows_out += stats.rows_out
            if stats.repaired:
                self.logger.warning(f"{self.stage} {stats.input}: cached output recomputed: {stats.repaired}")
        now = time.time()
        if self.done not in (1, self.total) and now - self.last_line < self.every_seconds:
            return
        self.last_line = now
        elapsed = max(now - self.started, 1e-9)
        computed = self.done - self.cached
        left = ""
        if self.done < self.total and computed:
            left = f" | ~{_duration((self.total - self.done) * elapsed / computed)} left"
        self.logger.info(
            f"{self.stage}: {self.done}/{self.total} shards ({self.cached} already done, {self.failed} failed) | "
            f"{self.rows_in:,} in -> {self.rows_out:,} out | {self.rows_in / elapsed:,.1f} rows/s{left}"
        )


@dataclass
class _ManifestRecorder:
    """Buffers shard stats and writes them to the manifest every few seconds and at the end.

    Opening the DuckDB file per shard would cost the driver more than the
    shards it records. Stats of a run killed between flushes are not lost:
    they sit next to the shard outputs, and the rerun records them as cached.
    """

    path: str
    run_id: str
    every_seconds: float = 5.0
    pending: list = field(default_factory=list)
    last: float = field(default_factory=time.time)

    def add(self, stats: ShardStats) -> None:
        self.pending.append(stats)
        if time.time() - self.last >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            manifest.record_stages(self.path, self.run_id, self.pending)
            self.pending = []
        self.last = time.time()


@flow(name="curate", flow_run_name="curate {out}", log_prints=True)
def curate(sources: list[str], out: str, config: dict | None = None, allow_failures: bool = False) -> CurateResult:
    """Turn image sources into a face release in OUT/release (see `facecap curate --help`)."""
    cfg = config_model().model_validate(config or {})  # with the sections of the stages registered now
    out = storage.absolute(out)
    release.check_output(out)
    run_id = str(flow_run.id or f"local-{int(time.time())}")
    # Two runs on one OUT would both do all the work and race to promote the release.
    try:
        with runlock.acquire(out, run_id, cfg.execution.lock_wait_s, get_run_logger()):
            return _curate(sources, out, cfg, run_id, allow_failures)
    except runlock.OutputLocked as exc:
        raise CurateFailed(str(exc)) from None
    except Exception as exc:
        refused = storage.write_refused(exc)
        if refused is None:
            raise
        # Prefect keeps the failed run's exception until exit; its frames' locals (DuckDB connections
        # among them) would live as long. The frames still format; only their variables go.
        traceback.clear_frames(exc.__traceback__)
        # A release is assembled in staging and promoted by one rename, so nothing partial was published.
        raise CurateFailed(f"cannot write the run's output: {refused}. Nothing was published (a release already "
                           f"in {storage.join(out, 'release')} stands). Free space or fix permissions, then rerun "
                           "the same command: finished shards are kept.") from exc


def split_host_limits(cfg: Config, at_once: int, logger) -> None:
    """Per-host limits that hold for the run: each of the `at_once` shards downloading together gets an even
    share (at least one connection), so a host never sees more than the limit from all of them."""
    d = cfg.download
    if at_once <= 1 or (d.domain_connections is None and d.domain_requests_per_s is None):
        return
    if d.domain_connections is not None:
        d.domain_connections = max(1, d.domain_connections // at_once)
    if d.domain_requests_per_s is not None:
        d.domain_requests_per_s = d.domain_requests_per_s / at_once
    each = ", ".join(f for f in (f"{d.domain_connections} connection(s)" if d.domain_connections else "",
                                 f"{d.domain_requests_per_s:.3g} request(s)/s" if d.domain_requests_per_s else "") if f)
    logger.info(f"per-host limits shared by up to {at_once} URL shards downloading at once: each keeps to {each} "
                "per host (download.host_limits_scope=shard gives each the full limits)")


def _curate(sources: list[str], out: str, cfg: Config, run_id: str, allow_failures: bool) -> CurateResult:
    logger = get_run_logger()
    plan = plan_run(cfg)  # fails here, before any work, if a model a stage needs is missing
    chain = [s for s in plan.chain if s.shard_work]  # stages with only a release pass have no shard tasks
    specs, notes = plan_shards(sources, cfg.ingest)
    workers = size_local_cluster(cfg, len(specs))
    if workers:  # share the machine's cores between the local workers instead of oversubscribing them
        cores = max(1, (os.cpu_count() or 1) // workers)
        for stage in registry.STAGES:  # a stage's `threads` setting, when it has one and leaves it unset
            settings = getattr(cfg, stage.section) if stage.section else None
            if settings is not None and "threads" in type(settings).model_fields and settings.threads is None:
                settings.threads = cores
    url_shards = sum(s.kind == "urls" for s in specs)
    if url_shards > 1 and cfg.download.host_limits_scope == "run":
        split_host_limits(cfg, min(url_shards, io_slots(cfg, workers)), logger)
    for note in notes:
        logger.warning(note)
    unreadable = [s for s in specs if s.kind == "unreadable"]
    for s in unreadable:
        logger.error(f"source {s.source} cannot be read: {s.detail} (recorded as a reject)")
    logger.info(f"profile={cfg.profile}: {len(specs)} shard(s) from {len(sources)} source(s); stages "
                + " -> ".join(st.name + (f" [{plan.model(st.name)}]" if plan.model(st.name) else "") for st in chain))
    for name, p in plan.stages.items():
        if not p.on:
            logger.warning(f"stage {name} is off: {p.why}")

    storage.makedirs(out)
    stale = storage.remove_stale_temporaries(storage.join(out, "shards"))
    if stale:
        logger.info(f"removed {stale} partial file(s) an interrupted run left behind")
    manifest_path = storage.join(out, "manifest.duckdb")
    storage.write_bytes_atomic(storage.join(out, "runs", run_id, "config.yaml"), cfg.to_yaml().encode())
    manifest.start_run(manifest_path, run_id, cfg.profile, sources, cfg.to_yaml(), release.versions())

    recorder = _ManifestRecorder(manifest_path, run_id)
    progress = {stage.name: _Progress(logger, len(specs), stage.name) for stage in chain}
    # shards[i]: shard i's input to its next stage, growing by one output per finished stage.
    source_settings = {"ingest": cfg.ingest.model_dump(mode="json"), "image": cfg.image.model_dump(mode="json")}
    shards = [ShardInput(spec, (), source_settings) for spec in specs]
    rejects: dict[tuple[int, int], tuple[str, int]] = {}  # (stage, shard) -> reject file, rows
    executor = ShardExecutor(cfg, local_slots(cfg, workers))
    verify_budget = [DRIVER_VERIFY_BYTES]

    def submit(k: int, index: int) -> None:
        stage = chain[k]
        args = (shards[index], out, cfg, plan.stages[stage.name])
        done = reusable(stage, *args, verify_budget) if verify_budget[0] > 0 else None
        if done is not None:
            executor.done((k, index), done)
            return
        executor.submit(stage_task(stage), stage, (k, index), stage.name, *args,
                        larger=shard_rows(shards[index]) / largest)

    largest = max([shard_rows(s) for s in shards] + [1])
    for index in range(len(specs)):
        submit(0, index)
    first_error = None
    for (k, index), stats, error in executor.finished():
        if error is not None:
            stats = ShardStats.failure(chain[k].name, shards[index], error)
        recorder.add(stats)
        progress[chain[k].name].update(stats)
        if stats.error:
            first_error = first_error or f"{chain[k].name} {shards[index].label}: {stats.error}"
            for later in chain[k + 1:]:
                progress[later.name].total -= 1  # this shard never reaches them
            continue
        rejects[k, index] = (stats.rejects_output, stats.rejects_written)
        shards[index] = shards[index].then(stats.ref)
        if k + 1 < len(chain):
            submit(k + 1, index)

    recorder.flush()
    failed = sum(p.failed for p in progress.values())
    if failed:
        message = (f"{failed} shard(s) failed (first: {first_error}); finished shards are kept, rerun the same "
                   "command to resume")
        manifest.finish_run(manifest_path, run_id, "failed", message)
        raise CurateFailed(message)

    funnel = manifest.funnel(manifest_path, run_id)
    reject_files = [rejects[k] for k in sorted(rejects)]  # stage, then shard order: reproducible
    key = release.content_key(shards, reject_files, cfg, allow_failures,
                              {s.name: s.release_key(cfg, out) for s in plan.chain})
    current = release.unchanged_release(out, key)
    if current is not None:
        # Same shard outputs, settings and versions as the published release: it stands as it is.
        manifest.finish_run(manifest_path, run_id, "completed", "release unchanged")
        logger.info(f"release unchanged (same shard outputs, settings and versions as run {current['run_id']}): "
                    f"{current['records']:,} face records, {current['rejects']:,} rejects -> "
                    f"{storage.join(out, 'release')}")
        return CurateResult(run_id=run_id, release=storage.join(out, "release"), records=current["records"],
                            rejects=current["rejects"], funnel=funnel,
                            validation=ValidationSummary.from_dict(current.get("validation")), unchanged=True)
    stages = [stage(cfg, plan.stages[stage.name], out) for stage in plan.chain]
    passes = [p for p in (s.release_pass(storage.join(out, "release")) for s in stages) if p is not None]
    if passes:
        faces = sum(s.outputs[-1].rows for s in shards)
        logger.info(f"release-wide: {', '.join(p.name for p in passes)} over {faces:,} face records")
    staged, staged_info = release.assemble(
        out, run_id, shards, reject_files, cfg,
        {**{s.model_in_release: plan.model(s.name) for s in registry.STAGES if s.model_in_release}, "content_key": key,
         "stages": {**plan.summary(), "validate": {"status": "off", "why": "quality.enabled is false"}},
         "sources": sources, "funnel": [row.to_dict() for row in funnel],
         "shards": len(specs),
         "unreadable_sources": [{"source": s.source, "detail": s.detail} for s in unreadable]},
        passes=passes, unreleased=tuple(c for s in stages for c in s.unreleased),
    )
    funnel = [FunnelRow.from_dict(row) for row in staged_info["funnel"]]  # with the release passes' rows
    for p in passes:
        outcome = p.outcome()
        if outcome:
            logger.info(f"{p.name}: {outcome}")
    if cfg.quality.enabled:
        # The validate stage: the staged release is published only if its suites pass (or --allow-failures).
        verdict = validate_task(staged, None, allow_failures)
        if not verdict.publishable:
            message = blocked_message(verdict, staged)
            manifest.finish_run(manifest_path, run_id, "blocked", message)
            publish_curate_artifacts(funnel, staged, published=False, verdict=verdict)
            raise ReleaseBlocked(message)
    published = release.promote(staged, out)
    publish_curate_artifacts(funnel, storage.join(out, "release"), published=True,
                             verdict=verdict if cfg.quality.enabled else None, records=published["records"])
    manifest.finish_run(manifest_path, run_id, "completed")
    logger.info(
        f"release: {published['records']:,} face records, {published['rejects']:,} rejects -> "
        f"{storage.join(out, 'release')}"
    )
    return CurateResult(run_id=run_id, release=storage.join(out, "release"), records=published["records"],
                        rejects=published["rejects"], funnel=funnel,
                        validation=ValidationSummary.from_dict(published.get("validation")))


def shard_rows(shard: ShardInput) -> int:
    """A shard's size in records, as far as it is known before its next task: the rows of its last output, else
    the images its spec lists (0 for a tar, whose members are counted only by reading it)."""
    if shard.outputs:
        return shard.outputs[-1].rows
    spec = shard.spec
    return len(spec.members) or max(spec.stop - spec.start, 0)
