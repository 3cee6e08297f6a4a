"""Prefect task around the release validation (quality/validate.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facecap.quality.process import ChildUnavailable, start_ahead, stop_ahead, take_ahead
from facecap.quality.validate import validate_release


@task(name="validate", task_run_name="validate {release_dir}", cache_policy=NO_CACHE, persist_result=False)
def validate_task(release_dir: str, overrides: list[str] | None = None, allow_failures: bool = False) -> dict:
    """Run the quality suites on a release, write its report and card, record the verdict.

    Runs on the flow's machine (not submitted to Dask): the suites are DuckDB
    aggregates over the release's Parquet files, one scan, driven from where the
    release is written. In the validation process the flow started ahead of need
    when there is one (its log lines come here), else in this process. No
    retries: the result is deterministic.
    """
    logger = get_run_logger()
    child = take_ahead()
    if child is not None:
        try:
            return child.validate(release_dir, overrides, allow_failures, log=logger.info)
        except ChildUnavailable as exc:
            logger.warning(f"{exc}\nvalidating in the flow's process instead")
        finally:
            child.close()
    return validate_release(release_dir, overrides, allow_failures, log=logger.info)


@contextmanager
def validation_ahead(enabled: bool) -> Iterator[Callable[[], object]]:
    """Yields `needed`: the flow calls it when it has work to do (each task it submits), and the validation
    process starts at the first call (unless the command line started it), so that its imports overlap with
    the run's work. A run whose every shard is done starts none. At the end of the block it is stopped if no
    validate_task took it (a run that fails, or whose release stands unchanged)."""
    try:
        yield start_ahead if enabled else (lambda: None)
    finally:
        stop_ahead()
