"""Prefect task wrappers around facecap.pipeline's shard jobs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dask
from prefect import task
from prefect.cache_policies import NO_CACHE

from facecap import pipeline
from facecap.config import Config
from facecap.pipeline import StageInfo
from facecap.stages.ingest import ShardSpec

# Our own stage keys decide what to skip; Prefect's result caching stays off
# so there is one source of truth for "already done". No tags on stage tasks:
# a tagged task asks the API for concurrency slots before every run, which
# measurably stalls short shards (seconds when the API's database is busy).
_COMMON = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="ingest", task_run_name="ingest {spec.label}", retries=2, retry_delay_seconds=[2, 10], **_COMMON)
def ingest_task(spec: ShardSpec, out: str, cfg: Config) -> dict:
    """Read one source shard into a normalised image shard. Retries help with flaky storage."""
    return pipeline.run_ingest(spec, out, cfg)


@task(name="detect", task_run_name="detect {ingested[input]}", **_COMMON)
def detect_task(ingested: dict, out: str, cfg: Config, detector_id: str) -> dict:
    """Detect, align and crop faces in one image shard. Deterministic: no retries."""
    return pipeline.run_detect(ingested, out, cfg, detector_id)


def wants_gpu(stage: StageInfo, cfg: Config) -> bool:
    """GPU stages ask Dask for a GPU=1 worker only when the config asks for a GPU device."""
    return stage.needs_gpu and cfg.detect.device == "cuda"


@contextmanager
def placement(stage: StageInfo, cfg: Config) -> Iterator[None]:
    """Dask annotations (priority, and GPU=1 for GPU stages) for tasks submitted inside this block."""
    annotations: dict = {"priority": stage.priority}
    if wants_gpu(stage, cfg):
        annotations["resources"] = {"GPU": 1}
    with dask.annotate(**annotations):
        yield
