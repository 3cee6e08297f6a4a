"""Validate a release: suites, report, dataset card, and the verdict recorded in release.json.

`validate_release` is plain code (no Prefect): `facecap validate`, the
`validate` flow and the curate flow's validate stage all call it. It never
moves the release; publishing (or keeping it in staging) is the caller's
decision, taken from the returned verdict.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import datetime, timezone

from facecap import storage
from facecap.results import Verdict
from facecap.quality.card import write_card
from facecap.quality.release_db import open_release
from facecap.quality.report import figure_aggregates, write_report
from facecap.quality.suites import run_suites
from facecap.quality.primitives import FAILED, NOT_APPLICABLE, PASSED


def validate_release(release_dir: str, overrides: list[str] | None = None, allow_failures: bool = False,
                     threads: int | None = None, log=print) -> Verdict:
    """Run every suite on RELEASE_DIR, write report/ and README.md, record the verdict; return it.

    The verdict's `publishable` is true when every applicable check passed,
    or when `allow_failures` overrides failures (recorded as such).
    """
    started = time.time()
    db = open_release(release_dir, overrides, threads=threads)
    try:
        log(f"validate: {db.path}: running quality suites on {len(db.columns)} columns")
        docs_dir = os.path.join(db.path, "report", "gx")
        extra, extra_derived = figure_aggregates(db)  # the report's figures ride in the checks' scan
        results, metrics = run_suites(db, docs_dir, extra, extra_derived)
        failed = [r.name for r in results if r.status == FAILED]
        counts = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, NOT_APPLICABLE)}
        now = datetime.now(timezone.utc).isoformat()
        verdict = Verdict(
            passed=not failed, publishable=not failed or allow_failures, allow_failures=bool(allow_failures and failed),
            failed=failed, counts=counts, checks=[r.to_dict() for r in results], validated_at=now,
            report=os.path.join(db.path, "report", "index.html"), seconds=0.0,
            funnel_check=metrics.get("_funnel"), decoded_sample=metrics.get("_decoded_sample"))
        for r in results:
            mark = {PASSED: "ok  ", FAILED: "FAIL", NOT_APPLICABLE: "n/a "}[r.status]
            log(f"  {mark} {r.suite}/{r.name}: " + (f"{r.observed}" if r.why is None else r.why)
                + (f" (e.g. sample_id {', '.join(r.examples)})" if r.examples else "")
                + (f"; the records: duckdb -c \"{r.look_at}\"" if r.look_at else ""))
        report = write_report(db, results, verdict.to_dict(), now, metrics.get("_figures") or {})
        info = dict(db.info)
        summary = verdict.summary().to_dict()
        if verdict.allow_failures:
            summary["override"] = "--allow-failures: published although the checks above failed"
        info["validation"] = summary
        info.setdefault("stages", {})["validate"] = {
            "status": "on", "passed": verdict.passed, "failed": failed,
            **({"override": "allow_failures"} if verdict.allow_failures else {})}
        info["headline"] = report["headline"]
        info["splits"] = report["figures"].get("splits", {})
        write_card(db.path, info, report, db.columns)
        storage.write_json_atomic(os.path.join(db.path, "release.json"), info)
        verdict = dataclasses.replace(verdict, seconds=round(time.time() - started, 2))
        log(f"validate: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_APPLICABLE]} not applicable "
            f"in {verdict.seconds} s; report {verdict.report}")
        return verdict
    finally:
        db.close()
        # A raised exception's traceback (kept by Prefect's result store until exit) would hold this
        # frame, and DuckDB reports every object alive at exit as leaked.
        del db


class ReleaseBlocked(RuntimeError):
    """A release failed its quality checks and was not published (exit status 1)."""


def failed_summary(verdict: Verdict) -> str:
    """The failed checks with what they require and what was observed, so the console names the setting."""
    by_name = {c["name"]: c for c in verdict.checks}
    parts = []
    for name in verdict.failed:
        c = by_name.get(name)
        if c is None:
            parts.append(name)
            continue
        seen = c["why"] if c.get("why") else f"observed {c['observed']}"
        where = f"; the records: duckdb -c \"{c['look_at']}\"" if c.get("look_at") else ""
        parts.append(f"{name} ({c['description']}; {seen}{where})")
    return "; ".join(parts)


def blocked_message(verdict: Verdict, release_dir: str) -> str:
    return (f"quality checks failed: {failed_summary(verdict)}. The release is NOT published; it stays in "
            f"{release_dir} and {os.path.join(release_dir, 'report', 'index.html')} says why. Fix the data or "
            "settings and rerun, or pass --allow-failures to publish it anyway (recorded in release.json).")
