"""The curate flow: sources -> ingest -> face stages (detect, annotate, text, caption) -> validate -> release.

Shards flow through the stages as soon as they are ready (a shard's detect
starts when its ingest finishes, its annotate when its detect finishes...).
The flow's driver is the only writer of the manifest and of the release;
workers write only their own shard files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import as_completed as dask_as_completed
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from facecap import manifest, release, storage
from facecap.config import Config
from facecap.pipeline import INGEST, plan_run
from facecap.stages.ingest import plan_shards
from facecap.tasks.stages import STAGE_TASKS, check_stage_resources, ingest_task, placement
from facecap.tasks.validate import validate_task
from facecap.flows.run_artifacts import publish_curate_artifacts
from facecap.quality.validate import ReleaseBlocked, blocked_message


class CurateFailed(RuntimeError):
    """Some shards failed; finished shards are kept and a rerun resumes."""


@dataclass
class _Progress:
    """Per-stage progress lines for the console and the Prefect UI.

    The first shard, then at most one line every `every_seconds`, and the
    last: a run of ten thousand shards stays readable. Failures always show.
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

    def update(self, stats: dict) -> None:
        self.done += 1
        if stats.get("error"):
            self.failed += 1
            self.logger.error(f"{self.stage} {stats.get('input')}: FAILED: {stats['error']}")
        else:
            self.cached += bool(stats.get("cached"))
            self.rows_in += stats["rows_in"]
            self.rows_out += stats["rows_out"]
        now = time.time()
        if self.done not in (1, self.total) and now - self.last_line < self.every_seconds:
            return
        self.last_line = now
        rate = self.rows_in / max(now - self.started, 1e-9)
        self.logger.info(
            f"{self.stage}: {self.done}/{self.total} shards ({self.cached} already done, {self.failed} failed) | "
            f"{self.rows_in:,} in -> {self.rows_out:,} out | {rate:,.1f} rows/s"
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

    def add(self, stats: dict) -> None:
        self.pending.append(stats)
        if time.time() - self.last >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            manifest.record_stages(self.path, self.run_id, self.pending)
            self.pending = []
        self.last = time.time()


def task_runner_for(cfg: Config) -> DaskTaskRunner:
    """An existing Dask scheduler if configured, else a local cluster of worker processes."""
    if cfg.execution.dask_address:
        return DaskTaskRunner(address=cfg.execution.dask_address)
    # Dask's nannies export MALLOC_TRIM_THRESHOLD_=65536 to workers. Setting it
    # at all turns off glibc's adaptive mmap threshold, so every decoded image
    # and crop is a fresh mmap and page faults: detect ran 15-20 % slower in a
    # worker than in a plain process (bench/README.md). Local workers go without.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": local_workers(cfg),
        "threads_per_worker": cfg.execution.threads_per_worker,
        "processes": True,
        "dashboard_address": ":0",  # a free port: concurrent runs must not collide
    })


def local_workers(cfg: Config) -> int:
    return cfg.execution.n_workers or max(1, os.cpu_count() or 1)


def _failure(stage: str, label: str, source: str, exc: BaseException) -> dict:
    return {"stage": stage, "input": label, "source": source, "error": f"{type(exc).__name__}: {exc}"[:2000]}


@flow(name="curate", flow_run_name="curate {out}", log_prints=True)
def curate(sources: list[str], out: str, config: dict | None = None, allow_failures: bool = False) -> dict:
    """Turn image sources into a face release in OUT/release (see `facecap curate --help`)."""
    logger = get_run_logger()
    cfg = Config.model_validate(config or {})
    out = storage.absolute(out)
    release.check_output(out)
    run_id = str(flow_run.id or f"local-{int(time.time())}")
    if cfg.detect.threads is None and not cfg.execution.dask_address:
        # Share the machine's cores between local workers instead of oversubscribing them.
        cfg.detect.threads = max(1, (os.cpu_count() or 1) // local_workers(cfg))

    check_stage_resources(cfg)
    plan = plan_run(cfg)  # fails here, before any work, if a model a stage needs is missing
    chain = [INGEST] + plan.chain
    specs, notes = plan_shards(sources, cfg.ingest)
    for note in notes:
        logger.warning(note)
    unreadable = [s for s in specs if s.kind == "unreadable"]
    for s in unreadable:
        logger.error(f"source {s.source} cannot be read: {s.detail} (recorded as a reject)")
    logger.info(f"profile={cfg.profile}: {len(specs)} shard(s) from {len(sources)} source(s); stages "
                + " -> ".join(f"{st.name}" + (f" [{plan.model(st.name)}]" if st is not INGEST and plan.model(st.name)
                                              else "") for st in chain))
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
    # results[k][i]: stats of chain stage k for shard i.
    results: list[list[dict | None]] = [[None] * len(specs) for _ in chain]
    # One completion loop over all stages: a shard's next stage is submitted
    # the moment its previous one finishes, and later stages' higher Dask
    # priority runs them before further upstream work, so results (and GPU
    # work) start early and the intermediate copies on disk stay few.
    pending = {}
    for index, spec in enumerate(specs):
        with placement(INGEST, cfg):
            fut = ingest_task.submit(spec, out, cfg)
        pending[fut.wrapped_future] = (0, index, fut)
    first = next(iter(pending), None)
    completions = dask_as_completed(list(pending), loop=first.client.loop) if first is not None else []
    for done in completions:
        k, index, fut = pending.pop(done)
        stage, spec = chain[k], specs[index]
        try:
            stats = fut.result()
        except Exception as exc:
            stats = _failure(stage.name, spec.label, spec.source, exc)
        recorder.add(stats)
        progress[stage.name].update(stats)
        if stats.get("error"):
            for later in chain[k + 1:]:
                progress[later.name].total -= 1  # this shard never reaches them
            continue
        results[k][index] = stats
        if k + 1 < len(chain):
            nxt = chain[k + 1]
            with placement(nxt, cfg):
                nfut = STAGE_TASKS[nxt.name].submit(stats, out, cfg, plan)
            pending[nfut.wrapped_future] = (k + 1, index, nfut)
            completions.add(nfut.wrapped_future)

    recorder.flush()
    failed = sum(p.failed for p in progress.values())
    if failed:
        message = f"{failed} shard(s) failed; finished shards are kept, rerun the same command to resume"
        manifest.finish_run(manifest_path, run_id, "failed", message)
        raise CurateFailed(message)

    reject_files = [(s["rejects_output"], s["rejects_written"]) for stage in results for s in stage if s]
    funnel = manifest.funnel(manifest_path, run_id)
    staged, _ = release.assemble(
        out, run_id, [d for d in results[-1] if d], reject_files, cfg,
        {"detector": plan.model("detect"),
         "stages": {**plan.summary(), "validate": {"status": "off", "why": "quality.enabled is false"}},
         "sources": sources, "funnel": funnel,
         "shards": len(specs),
         "unreadable_sources": [{"source": s.source, "detail": s.detail} for s in unreadable]},
    )
    if cfg.quality.enabled:
        # The validate stage: the staged release is published only if its suites pass (or --allow-failures).
        verdict = validate_task(staged, None, allow_failures)
        if not verdict["publishable"]:
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
    return {"run_id": run_id, "release": storage.join(out, "release"), "records": published["records"],
            "rejects": published["rejects"], "funnel": funnel, "validation": published.get("validation")}
