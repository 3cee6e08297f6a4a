"""Prefect task around the release validation (quality/validate.py)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facecap.quality.validate import validate_release
from facecap.results import Verdict


@task(name="validate", task_run_name="validate {release_dir}", cache_policy=NO_CACHE, persist_result=False)
def validate_task(release_dir: str, overrides: list[str] | None = None, allow_failures: bool = False) -> Verdict:
    """Run the quality suites on a release, write its report and card, record the verdict.

    Runs on the flow's machine (not submitted to Dask): the suites are DuckDB
    aggregates over the release's Parquet files, one scan, driven from where the
    release is written. No retries: the result is deterministic.
    """
    return validate_release(release_dir, overrides, allow_failures, log=get_run_logger().info)
