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

from facecap.quality.primitives import Check, policy_check

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


def _as_policies(checks: list[Check], cfg: "Config") -> list[Check]:
    """Rates a stage declares as a plain bound on a `quality.` setting, made policies (`policy_check`).

    The caption stage's duplicate rate predates policies: its bound depends on the mix of inputs (faces with
    the same kept attributes get the same template caption), so it blocks only when the user set it.
    """
    q, out = cfg.quality, []
    for c in checks:
        if c.name == "duplicate_caption_rate" and c.policy is None:
            c = policy_check(c.name, c.suite, "share of rows repeating another row's caption", c.metric, c.columns,
                             "quality.max_duplicate_caption_rate", q.max_duplicate_caption_rate,
                             "SELECT sample_id, caption FROM faces QUALIFY count(*) OVER (PARTITION BY caption) > 1 "
                             "ORDER BY caption, sample_id")
        out.append(c)
    return out


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
    checks = _as_policies([c for stage in STAGES for c in stage.quality_checks(cfg)], cfg)
    return checks + [
        # No columns: it applies to every release, an empty one above all.
        Check("min_face_records", RELEASE_SUITE,
              f"the release holds at least quality.min_records ({q.min_records}) face records",
              "count(*)", (), min_value=q.min_records, max_value=None),
        Check("rows_match_funnel", RELEASE_SUITE,
              "release rows == rows_out of the manifest funnel's last stage (observed: the difference)", None, ()),
    ]
