"""The run manifest: a DuckDB file recording shard x stage outcomes.

Only the flow's driver process writes it (DuckDB allows one writer), from the
stats that tasks return, so workers never contend for the file. The release
report's funnel is a query over it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterator

import duckdb

from facecap.results import FunnelRow

if TYPE_CHECKING:
    from facecap.shards import ShardStats

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    status VARCHAR,
    profile VARCHAR,
    sources VARCHAR,          -- JSON list
    config VARCHAR,           -- resolved config, YAML
    versions VARCHAR,         -- JSON
    message VARCHAR
);
CREATE TABLE IF NOT EXISTS stage_runs (
    run_id VARCHAR,
    stage VARCHAR,
    shard_key VARCHAR,        -- output key
    input_key VARCHAR,
    input VARCHAR,            -- human-readable shard label
    source VARCHAR,
    status VARCHAR,           -- done | cached | failed
    rows_in BIGINT,
    rows_out BIGINT,
    rejects MAP(VARCHAR, BIGINT),
    extra MAP(VARCHAR, BIGINT),
    seconds DOUBLE,
    stage_version VARCHAR,
    settings_hash VARCHAR,
    model VARCHAR,
    output VARCHAR,
    rejects_output VARCHAR,
    error VARCHAR,
    recorded_at TIMESTAMPTZ
);
-- Takedowns (facecap takedown): what was asked and what changed. No image or face data of the person:
-- a photo request is recorded as its kind only, never its bytes, file name or face hash.
CREATE TABLE IF NOT EXISTS takedowns (
    requested_at TIMESTAMPTZ,
    requests VARCHAR,         -- JSON list of {"kind": "url"|"sample_id"|"image", "value": URL or id (none for image)}
    matched BIGINT,           -- release records the requests matched (near-duplicate copies included)
    entries_added BIGINT,     -- lines added to the exclusion list
    exclusion_list VARCHAR,   -- its path
    records_before BIGINT,
    records_after BIGINT,     -- NULL when no new release was published
    release_before VARCHAR,   -- run_id of the release replaced
    release_after VARCHAR,    -- run_id of the release published without the records
    status VARCHAR,           -- published | unchanged | blocked | failed
    message VARCHAR
);
"""


def _now() -> datetime:
    return datetime.now(timezone.utc)


@contextmanager
def connect(path: str) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(path)
    try:
        con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def start_run(path: str, run_id: str, profile: str, sources: list[str], config_yaml: str, versions: dict) -> None:
    with connect(path) as con:
        # A run still "running" when a new one starts was killed: say so.
        con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
        con.execute(
            "INSERT INTO runs VALUES (?, ?, NULL, 'running', ?, ?, ?, ?, NULL)",
            [run_id, _now(), profile, json.dumps(sources), config_yaml, json.dumps(versions, sort_keys=True)],
        )


def finish_run(path: str, run_id: str, status: str, message: str = "") -> None:
    with connect(path) as con:
        con.execute("UPDATE runs SET finished_at = ?, status = ?, message = ? WHERE run_id = ?",
                    [_now(), status, message, run_id])


def record_stages(path: str, run_id: str, results: list["ShardStats"]) -> None:
    """Record the stats stage tasks returned (failures carry an error)."""
    rows = []
    for r in results:
        status = "failed" if r.error else ("cached" if r.cached else "done")
        failed = bool(r.error)
        rows.append([
            run_id, r.stage, r.key or None, r.input_key or None, r.input, r.source, status,
            None if failed else r.rows_in, None if failed else r.rows_out, r.rejects, r.extra,
            None if failed else r.seconds, r.stage_version or None, r.settings_hash or None, r.model,
            r.output or None, r.rejects_output or None, r.error, _now(),
        ])
    if rows:
        with connect(path) as con:
            con.executemany("INSERT INTO stage_runs VALUES (" + ", ".join(["?"] * 19) + ")", rows)


def funnel(path: str, run_id: str) -> list[FunnelRow]:
    """Per stage: shards, rows in and out, and rejects by reason, for one run."""
    with connect(path) as con:
        stages = con.execute(
            """
            SELECT stage, count(*) AS shards, count(*) FILTER (status = 'cached') AS cached,
                   count(*) FILTER (status = 'failed') AS failed,
                   coalesce(sum(rows_in), 0) AS rows_in, coalesce(sum(rows_out), 0) AS rows_out,
                   min(recorded_at) AS first
            FROM stage_runs WHERE run_id = ? GROUP BY stage ORDER BY first
            """,
            [run_id],
        ).fetchall()
        reasons = con.execute(
            """
            SELECT stage, r.key AS reason, sum(r.value) AS n
            FROM (SELECT stage, unnest(map_entries(rejects)) AS r FROM stage_runs WHERE run_id = ?)
            GROUP BY ALL ORDER BY stage, n DESC, reason
            """,
            [run_id],
        ).fetchall()
        # Stage-specific counts (e.g. the text stage's alt-text characters in and removed).
        extras = con.execute(
            """
            SELECT stage, e.key AS name, sum(e.value) AS n
            FROM (SELECT stage, unnest(map_entries(extra)) AS e FROM stage_runs WHERE run_id = ?)
            GROUP BY ALL ORDER BY stage, name
            """,
            [run_id],
        ).fetchall()
    by_stage: dict[str, dict[str, int]] = {}
    for stage, reason, n in reasons:
        by_stage.setdefault(stage, {})[reason] = int(n)
    extra_by_stage: dict[str, dict[str, int]] = {}
    for stage, name, n in extras:
        extra_by_stage.setdefault(stage, {})[name] = int(n)
    return [
        FunnelRow(stage=s, shards=n, cached=c, failed=f, rows_in=int(i), rows_out=int(o),
                  rejects=by_stage.get(s, {}), extra=extra_by_stage.get(s, {}))
        for s, n, c, f, i, o, _ in stages
    ]


def stage_outputs(path: str, run_id: str, stage: str) -> list[str]:
    """The output files (Parquet) one stage of one run wrote or reused, one per shard."""
    with connect(path) as con:
        rows = con.execute("SELECT DISTINCT output FROM stage_runs WHERE run_id = ? AND stage = ? "
                           "AND status IN ('done', 'cached') AND output IS NOT NULL ORDER BY output",
                           [run_id, stage]).fetchall()
    return [r[0] for r in rows]


def record_takedown(path: str, row: dict) -> None:
    """One takedown in the audit table (its keys: the table's columns but `requested_at`)."""
    with connect(path) as con:
        con.execute("INSERT INTO takedowns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_now(), json.dumps(row["requests"]), row["matched"], row["entries_added"],
                     row["exclusion_list"], row["records_before"], row.get("records_after"),
                     row.get("release_before"), row.get("release_after"), row["status"], row.get("message")])


def takedowns(path: str) -> list[dict]:
    """The audit log, oldest first."""
    with connect(path) as con:
        cur = con.execute("SELECT * FROM takedowns ORDER BY requested_at")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
