"""The Prefect task that runs any stage on one shard (facecap.runner.run_stage).

One task definition for every stage; `stage_task(stage)` names it after the
stage and gives it the stage's retries. Our own stage keys decide what to
skip, so Prefect's result caching stays off: one source of truth for "already
done". No tags on stage tasks: a tagged task asks the API for concurrency
slots before every run, which measurably stalls short shards (seconds when
the API's database is busy).
"""

from __future__ import annotations

import functools

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from facecap.chain import BY_NAME
from facecap.config import Config
from facecap.runner import run_stage
from facecap.shards import ShardInput, ShardStats
from facecap.stages.base import Stage, StagePlan


@task(cache_policy=NO_CACHE, persist_result=False)
def _run_stage(stage: str, shard: ShardInput, out: str, cfg: Config, plan: StagePlan) -> ShardStats:
    return run_stage(BY_NAME[stage], shard, out, cfg, plan)


@functools.lru_cache(maxsize=None)
def stage_task(stage: type[Stage]) -> Task:
    """The task for `stage`: submit it as ``stage_task(S).submit(S.name, shard, out, cfg, plan)``."""
    return _run_stage.with_options(
        name=stage.name, task_run_name=f"{stage.name} {{shard.label}}", retries=stage.retries,
        retry_delay_seconds=list(stage.retry_delay_seconds) or None)
