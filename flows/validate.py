"""The `validate` flow: quality suites on a release, usable as a Prefect deployment.

`facecap validate RELEASE_DIR` runs the same code without Prefect; the
curate flow runs `validate_task` on its staged release before publishing.
A deployment (e.g. triggered when a release lands) can run this flow on any
release folder: it fails when a check fails, so the failure shows in the UI.
"""

from __future__ import annotations

from prefect import flow

from facecap.quality.validate import ReleaseBlocked, blocked_message
from facecap.results import Verdict
from facecap.tasks.validate import validate_task


@flow(name="validate", flow_run_name="validate {release_dir}", log_prints=True)
def validate(release_dir: str, allow_failures: bool = False, overrides: list[str] | None = None) -> Verdict:
    """Validate RELEASE_DIR (its own config.yaml gives the thresholds; `overrides` are --set style)."""
    verdict = validate_task(release_dir, overrides, allow_failures)
    if not verdict.publishable:
        raise ReleaseBlocked(blocked_message(verdict, release_dir))
    return verdict
