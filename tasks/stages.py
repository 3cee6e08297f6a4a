"""Prefect task wrappers around facecap.pipeline's shard jobs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dask
from prefect import task
from prefect.cache_policies import NO_CACHE

from facecap import pipeline
from facecap.config import Config, ConfigError
from facecap.pipeline import RunPlan, StageInfo
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


@task(name="detect", task_run_name="detect {previous[input]}", **_COMMON)
def detect_task(previous: dict, out: str, cfg: Config, plan: RunPlan) -> dict:
    """Detect, align and crop faces in one image shard. Deterministic: no retries."""
    return pipeline.run_detect(previous, out, cfg, plan)


@task(name="annotate", task_run_name="annotate {previous[input]}", **_COMMON)
def annotate_task(previous: dict, out: str, cfg: Config, plan: RunPlan) -> dict:
    """Predict the 40 CelebA attributes of one face shard. Deterministic: no retries."""
    return pipeline.run_annotate(previous, out, cfg, plan)


@task(name="caption", task_run_name="caption {previous[input]}", retries=2, retry_delay_seconds=[5, 30], **_COMMON)
def caption_task(previous: dict, out: str, cfg: Config, plan: RunPlan) -> dict:
    """Caption one face shard. Retries help when the LLM endpoint is briefly unavailable."""
    return pipeline.run_caption(previous, out, cfg, plan)


@task(name="text", task_run_name="text {previous[input]}", retries=2, retry_delay_seconds=[5, 30], **_COMMON)
def text_task(previous: dict, out: str, cfg: Config, plan: RunPlan) -> dict:
    """Filter and clean the alt-text of one face shard (FLIP-80M path). Retries help when the LLM is briefly away."""
    return pipeline.run_text(previous, out, cfg, plan)


# The Prefect task of every face stage, by stage name (the flow walks plan.chain).
STAGE_TASKS = {
    pipeline.DETECT.name: detect_task,
    pipeline.ANNOTATE.name: annotate_task,
    pipeline.TEXT.name: text_task,
    pipeline.CAPTION.name: caption_task,
}


def wants_gpu(stage: StageInfo, cfg: Config) -> bool:
    """GPU stages ask Dask for a GPU=1 worker only when their config section asks for a cuda device."""
    if not stage.needs_gpu or not stage.device_section:
        return False
    return getattr(cfg, stage.device_section).device == "cuda"


@contextmanager
def placement(stage: StageInfo, cfg: Config) -> Iterator[None]:
    """Dask annotations (priority, and GPU=1 for GPU stages) for tasks submitted inside this block."""
    annotations: dict = {"priority": stage.priority}
    resources = stage_resources(stage, cfg)
    if resources:
        annotations["resources"] = resources
    with dask.annotate(**annotations):
        yield


def check_stage_resources(cfg: Config) -> None:
    """execution.stage_resources may only name stages that exist (a typo would silently pin nothing)."""
    known = [pipeline.INGEST.name] + [s.name for s in pipeline.FACE_STAGES]
    unknown = sorted(set(cfg.execution.stage_resources) - set(known))
    if unknown:
        raise ConfigError(f"execution.stage_resources names unknown stage(s) {unknown}; stages are {known}")


def stage_resources(stage: StageInfo, cfg: Config) -> dict[str, float]:
    """Dask resources one task of `stage` needs: GPU=1 for a cuda stage, plus execution.stage_resources."""
    resources: dict[str, float] = {"GPU": 1} if wants_gpu(stage, cfg) else {}
    resources.update(cfg.execution.stage_resources.get(stage.name, {}))
    return resources
