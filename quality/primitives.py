"""What a stage declares its quality checks and report section with: the Check type, SQL snippets, the
check statuses, histogram bins, HTML tables and a row sample.

Nothing here knows the stages: the stage modules (below the chain) use these
blocks, and quality/checks.py, suites.py and report.py (above it) loop over
the registered stages' declarations.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from html import escape
from typing import Any

PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"
SAMPLED_ROW_GROUPS = 20


@dataclass(frozen=True)
class Check:
    """One expectation: `metric` (a DuckDB aggregate expression) must lie in [min_value, max_value]."""

    name: str
    suite: str
    description: str  # what must hold, with the configured bounds filled in
    metric: str | None  # SQL aggregate over the `faces` view; None: computed in Python (see suites.py)
    columns: tuple[str, ...]  # release columns it reads: missing ones fail the check
    min_value: float | None = 0  # counts and rates: 0 .. max_value
    max_value: float | None = 0
    # The setting (e.g. "quality.max_duplicate_image_rate") when the bound is a policy the user set on the
    # mix of a release's inputs (a mean, a rate) rather than a confirmation of a per-record rule.
    policy: str | None = None
    look_at: str | None = None  # SQL over the `faces` view listing the records behind the figure

    @property
    def row_condition(self) -> str | None:
        """For a count of offending rows, the SQL condition that picks them (to show examples)."""
        prefix = "count(*) FILTER ("
        if self.metric and self.metric.startswith(prefix) and self.metric.endswith(")"):
            return self.metric[len(prefix):-1]
        return None


def policy_check(name: str, suite: str, what: str, metric: str, columns: tuple[str, ...], setting: str,
                 limit: float | None, look_at: str, upper: float = 1.0) -> Check:
    """A figure over the mix of a release's records (a mean, a rate) that blocks a release only as a policy.

    Every record of a release passed the per-record rules; whether a share of them may be padded, or
    repeat another's bytes, depends on what went in. So the figure blocks only when the user set `setting`;
    unset, the check still runs in Great Expectations, on the bounds any such figure has (0 .. `upper`),
    and the report shows the figure. `look_at` lists the records behind it, for a failure to name.
    """
    if limit is None:
        return Check(name, suite, f"{what}: reported, no policy ({setting} unset; set it to block a release "
                                  f"above a limit)", metric, columns, min_value=0, max_value=upper, policy=setting,
                     look_at=look_at)
    return Check(name, suite, f"{what} <= {setting} ({limit}), a policy set for this run", metric, columns,
                 min_value=0, max_value=limit, policy=setting, look_at=look_at)


def look_at_query(sql: str, release_dir: str) -> str:
    """A check's `look_at` query, runnable as is with the duckdb command line on the release's files."""
    files = os.path.join(release_dir, "data", "*.parquet").replace("'", "''")
    return sql.replace("FROM faces", f"FROM read_parquet('{files}')")


def word_count_sql(column: str) -> str:
    """Words = space-separated tokens: 1 + the number of spaces (texts are single-spaced, a blank check
    catches empty ones). Counting bytes is several times cheaper in DuckDB than trimming or splitting on
    a regex, which matters at 15M rows."""
    return f"(strlen({column}) - strlen(replace({column}, ' ', '')) + 1)"


def blank_sql(column: str) -> str:
    """Null, empty or only whitespace; trims only texts that start or end with a space (cheap)."""
    return (f"(CASE WHEN {column} IS NULL OR strlen({column}) = 0 THEN true "
            f"WHEN {column}[1] IN (' ', chr(10), chr(9)) OR {column}[-1] IN (' ', chr(10), chr(9)) "
            f"THEN trim({column}, ' ' || chr(10) || chr(9) || chr(13)) = '' ELSE false END)")


def bin_expr(expr: str, lo: float, hi: float, bins: int) -> str:
    width = (hi - lo) / bins or 1
    return f"least(greatest(floor(({expr} - {lo}) / {width}), 0), {bins - 1})::INT"


def hist(counts_by_bin: dict | None, lo: float, hi: float, bins: int) -> dict:
    width = (hi - lo) / bins or 1
    counts = [0] * bins
    for b, n in (counts_by_bin or {}).items():
        if b is not None:
            counts[int(b)] = int(n)
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}


def table(headers: list[str], rows: list[list[Any]], raw: set[int] | None = None) -> str:
    raw = raw or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw else escape('' if c is None else str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sample_rows(files: list[str], sample: int, columns: list[str]) -> list[dict]:
    """A deterministic sample of rows spread over the release: rows evenly spaced within up to
    SAMPLED_ROW_GROUPS row groups evenly spaced over all files. Reads only those row groups' `columns`
    (a reservoir sample or ORDER BY in DuckDB would read the whole column, images included)."""
    import pyarrow.parquet as pq

    groups = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    groups = [g for g in groups if g[2]]
    if not groups or sample <= 0:
        return []
    step = max(1, len(groups) // SAMPLED_ROW_GROUPS)
    chosen = groups[step // 2::step][:SAMPLED_ROW_GROUPS]
    per_group = max(1, -(-sample // len(chosen)))
    out: list[dict] = []
    for path, g, n in chosen:
        table = pq.ParquetFile(path).read_row_group(g, columns=columns)
        stride = max(1, n // per_group)
        out += table.take(list(range(stride // 2, n, stride))[:per_group]).to_pylist()
    return out[:sample]


def data_files(release_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(release_dir, "data", "*.parquet")))
