"""Prefect artifacts a curate run publishes, so the UI shows its outcome without opening a terminal.

- `curate-funnel` (table): per stage, shards (and how many were already done
  and skipped), records in and out, rejects by reason.
- `curate-quality` (markdown): where the release and its quality report are,
  and the verdict of the quality suites.

Artifacts are a view: failing to create one logs a warning and never fails
a run whose release is already written.
"""

from __future__ import annotations

import os

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from facecap.results import FunnelRow, Verdict

FUNNEL_KEY = "curate-funnel"
QUALITY_KEY = "curate-quality"


def funnel_rows(funnel: list[FunnelRow]) -> list[dict]:
    """The run's funnel as table rows (one per stage, in pipeline order)."""
    return [{
        "stage": row.stage,
        "shards": row.shards,
        "already done (skipped)": row.cached,
        "failed": row.failed,
        "records in": row.rows_in,
        "records out": row.rows_out,
        "rejects": ", ".join(f"{reason} {n}" for reason, n in row.rejects.items()) or "none",
    } for row in funnel]


def quality_markdown(release_dir: str, published: bool, verdict: Verdict | None, records: int | None) -> str:
    report = os.path.join(release_dir, "report", "index.html")
    lines = [f"## {'Release' if published else 'Release NOT published'}: `{release_dir}`", ""]
    if records is not None:
        lines.append(f"- {records:,} face records")
    if verdict is None:
        lines.append("- quality suites: not run (quality.enabled is false)")
    else:
        state = "passed" if verdict.passed else "FAILED: " + ", ".join(verdict.failed)
        lines.append(f"- quality suites {state} ({', '.join(f'{k} {v}' for k, v in verdict.counts.items())})")
        if verdict.allow_failures:
            lines.append("- published with allow_failures although checks failed")
        lines.append(f"- quality report: [`{report}`](file://{report}) (open it on a host that mounts this path)")
    return "\n".join(lines) + "\n"


def publish_curate_artifacts(funnel: list[FunnelRow], release_dir: str, published: bool, verdict: Verdict | None = None,
                             records: int | None = None) -> None:
    """Create the run's funnel and quality artifacts (a warning, not a failure, if the API refuses)."""
    try:
        skipped = sum(row.cached for row in funnel)
        total = sum(row.shards for row in funnel)
        create_table_artifact(funnel_rows(funnel), key=FUNNEL_KEY,
                              description=f"Records per stage; {skipped} of {total} shard x stage jobs were "
                                          f"already done and skipped. Release: {release_dir}")
        create_markdown_artifact(quality_markdown(release_dir, published, verdict, records), key=QUALITY_KEY,
                                 description="Where the release and its quality report are, and the verdict")
    except Exception as exc:  # a view on the run must not fail a run whose outputs exist
        get_run_logger().warning(f"could not create the run's artifacts: {type(exc).__name__}: {exc}")
