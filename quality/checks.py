"""The release's expectations, defined as code: what is checked, on which column, with which bounds.

Each check is one number computed by a DuckDB aggregate over the release's
Parquet files (a count of offending rows, or a rate), and one Great
Expectations expectation on that number. The heavy work (15M rows) stays in
DuckDB; GX validates the small frame of numbers DuckDB produced. (GX 1.24's
own DuckDB path through duckdb-engine fails with "list index out of range":
see DESIGN.md.)

Each stage declares the checks on its columns (Stage.quality_checks, in its
suite Stage.suite); the release-wide ones are here. Thresholds come from the
config that produced the release (its config.yaml): the same settings the
stages used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from facecap.quality.primitives import Check

if TYPE_CHECKING:
    from facecap.config import Config

RELEASE_SUITE = "release"  # checks of the release as a whole: always applicable


def suite_stages() -> dict[str, str | None]:
    """Suites in report order, each with the stage whose columns it checks: its checks are not applicable
    when that stage was off. Stages in chain order, then the release suite."""
    from facecap.chain import STAGES

    suites: dict[str, str | None] = {s.suite: s.name for s in STAGES if s.suite}
    suites[RELEASE_SUITE] = None
    return suites


def derived_columns(columns: list[str]) -> dict[str, str]:
    """Per-row values several checks share, computed once per row in a subquery (DuckDB does not
    reuse a repeated expression by itself): what the registered stages declare."""
    from facecap.chain import STAGES

    out: dict[str, str] = {}
    for stage in STAGES:
        out.update(stage.derived_columns(columns))
    return out


def build_checks(cfg: "Config") -> list[Check]:
    """Every expectation of a release, with bounds from `cfg`: each stage's, in chain order, then the release's."""
    from facecap.chain import STAGES

    q = cfg.quality
    checks = [c for stage in STAGES for c in stage.quality_checks(cfg)]
    return checks + [
        # No columns: it applies to every release, an empty one above all.
        Check("min_face_records", RELEASE_SUITE,
              f"the release holds at least quality.min_records ({q.min_records}) face records",
              "count(*)", (), min_value=q.min_records, max_value=None),
        Check("rows_match_funnel", RELEASE_SUITE,
              "release rows == rows_out of the manifest funnel's last stage (observed: the difference)", None, ()),
    ]
