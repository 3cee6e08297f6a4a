"""Run the release's Great Expectations suites on numbers DuckDB computed.

One DuckDB pass over the Parquet files computes every check's metric (see
quality/checks.py); a few more queries add what needs its own scan (a decoded
image sample, the funnel). GX then validates that one-row frame with one
suite per part of the record (faces, attributes, captions, release), and
writes its Data Docs. A check whose stage was off is reported "not
applicable" with the stage's reason: never silently passed, never failed.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from facecap.quality.checks import build_checks, derived_columns, suite_stages
from facecap.quality.primitives import FAILED, NOT_APPLICABLE, PASSED, Check, look_at_query, sample_rows
from facecap.quality.release_db import ReleaseDB



@dataclass
class CheckResult:
    name: str
    suite: str
    description: str
    status: str  # passed | failed | not applicable
    observed: float | int | None
    min_value: float | None
    max_value: float | None
    why: str | None = None  # for not applicable / failures that are not a number (missing column)
    examples: list[str] | None = None  # sample_ids of a few offending rows, for failed row checks
    policy: str | None = None  # the setting whose bound this is, when it is a policy on the mix of records
    look_at: str | None = None  # for a failure: a DuckDB query over the release listing the records behind it

    def to_dict(self) -> dict:
        return asdict(self)


def funnel_last_rows(db: ReleaseDB) -> tuple[str | None, int | None, str]:
    """The last stage of the run's funnel and its rows_out, from the manifest if it is next to the release."""
    funnel = _manifest_funnel(db) or db.info.get("funnel") or []
    by_stage = {row["stage"]: row for row in funnel}
    # The pipeline's stage order (release.json's keys are sorted, the manifest's by time).
    from facecap.chain import STAGES

    order = [s for s in [st.name for st in STAGES] if s in by_stage]
    if not order:
        return None, None, "no funnel in release.json and no manifest"
    last = order[-1]
    # Release-wide passes (near-duplicate removal) drop records after the last stage.
    removed = sum(int(p.get("removed") or 0) for p in (db.info.get("release_passes") or {}).values())
    return last, int(by_stage[last]["rows_out"]) - removed, "manifest" if _manifest_path(db) else "release.json"


def _manifest_path(db: ReleaseDB) -> str | None:
    # OUT/release/ or OUT/staging/<run>/: the manifest is OUT/manifest.duckdb.
    for up in (1, 2):
        candidate = os.path.join(db.path, *([os.pardir] * up), "manifest.duckdb")
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    return None


def _manifest_funnel(db: ReleaseDB) -> list[dict] | None:
    path, run_id = _manifest_path(db), db.info.get("run_id")
    if not path or not run_id:
        return None
    import duckdb

    try:
        con = duckdb.connect(path, read_only=True)
    except duckdb.Error:
        return None  # held by a writer: release.json's copy of the funnel is used
    try:
        rows = con.execute(
            "SELECT stage, coalesce(sum(rows_in), 0), coalesce(sum(rows_out), 0) FROM stage_runs "
            "WHERE run_id = ? GROUP BY stage", [run_id]).fetchall()
    except duckdb.Error:
        rows = []
    finally:
        con.close()
    return [{"stage": s, "rows_in": int(i), "rows_out": int(o)} for s, i, o in rows] or None







def decode_failures(db: ReleaseDB, sample: int) -> tuple[int, int]:
    """(undecodable, decoded) over a deterministic sample of image bytes."""
    from facecap.quality.primitives import data_files
    from facecap.schema import image_bytes
    from facecap.sources.images import decode_rgb

    if sample <= 0 or "image" not in db.columns:
        return 0, 0
    rows = sample_rows(data_files(db.path), sample, ["image"])
    # The same bounded decode the stages use: header limits first, then pixels.
    bad = sum(decode_rgb(image_bytes(r["image"]) or b"", db.cfg.image)[0] is None for r in rows)
    return bad, len(rows)


def _scan_groups(exprs: dict[str, str]) -> list[dict[str, str]]:
    """Split aggregate expressions into scans: one per stage with wide columns (Stage.own_scan: lists, text)
    for the expressions over them, then one for the rest (geometry, scores), which runs first."""
    import re

    from facecap.chain import STAGES

    wide = [(s.name, re.compile("|".join(rf"\b{re.escape(c)}\b" for c in s.own_scan))) for s in STAGES if s.own_scan]
    groups: dict[str, dict[str, str]] = {"": {}, **{name: {} for name, _ in wide}}
    for name, expr in exprs.items():
        owner = next((stage for stage, pattern in reversed(wide) if pattern.search(expr)), "")
        groups[owner][name] = expr
    return [g for g in groups.values() if g]


def compute_metrics(db: ReleaseDB, checks: list[Check], extra: dict[str, str] | None = None,
                    extra_derived: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every applicable check's observed value (one DuckDB pass), and why the others are skipped or failed.

    `extra` aggregates (the report's figures) ride along in the same scan; their values are returned
    under metrics["_figures"]. `extra_derived` adds per-row values they share.
    """
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    sql_checks = []
    for check in checks:
        stage = suite_stages()[check.suite]
        off = db.stage_off_reason(stage)
        missing = [c for c in check.columns if c not in db.columns]
        if off:
            skipped[check.name] = f"{NOT_APPLICABLE}: stage {stage} off ({off})"
        elif check.columns and not db.has_data:
            skipped[check.name] = f"{NOT_APPLICABLE}: the release has no face records"
        elif missing and stage and not db.stage(stage):
            skipped[check.name] = f"{NOT_APPLICABLE}: no {', '.join(missing)} column and no record of stage {stage}"
        elif missing:
            skipped[check.name] = f"{FAILED}: stage {stage} was on but the release has no {', '.join(missing)} column"
        elif check.metric is not None:
            sql_checks.append(check)
    extra = extra or {}
    # Distinct counts each build a hash table of every row's value: run them one at a time (one
    # column read each) so only one table is in memory; everything else shares one scan.
    distinct = {c.name: c.metric for c in sql_checks if "DISTINCT" in c.metric}
    distinct.update({k: e for k, e in extra.items() if "DISTINCT" in e})
    shared = {c.name: c.metric for c in sql_checks if c.name not in distinct}
    shared.update({k: e for k, e in extra.items() if k not in distinct})
    values: dict[str, Any] = {}
    per_row = {**derived_columns(db.columns), **(extra_derived or {})}
    # One scan per group of columns (geometry, attribute lists, text) rather than one scan of all:
    # measured on 15M rows, three narrow scans took 23.5 s where one wide scan took 49 s.
    for group in _scan_groups(shared):
        needs = [name for name in per_row if any(name in e for e in group.values())]
        derived = ", ".join(f"{per_row[name]} AS {name}" for name in needs)
        source = f"(SELECT *, {derived} FROM faces)" if derived else "faces"
        row = db.con.execute(f"SELECT {', '.join(f'{e} AS {k}' for k, e in group.items())} FROM {source}").fetchone()
        values.update(zip(group, row))
    for name, expr in distinct.items():
        values[name] = db.scalar(f"SELECT {expr} FROM faces")
    metrics.update({c.name: _plain(values[c.name]) for c in sql_checks})
    metrics["_figures"] = {k: values[k] for k in extra}
    if "image_bytes_decode" not in skipped:
        bad, decoded = decode_failures(db, db.cfg.quality.decode_sample)
        metrics["image_bytes_decode"] = bad
        metrics["_decoded_sample"] = decoded
    stage, expected, where = funnel_last_rows(db)
    if expected is None:
        skipped["rows_match_funnel"] = f"{NOT_APPLICABLE}: {where}"
    else:
        rows = db.scalar("SELECT count(*) FROM faces")
        metrics["rows_match_funnel"] = int(rows) - expected
        metrics["_funnel"] = {"stage": stage, "rows_out": expected, "from": where, "release_rows": int(rows)}
    return metrics, skipped


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float):
        return round(value, 6)
    return int(value) if hasattr(value, "__int__") and not isinstance(value, bool) else value


def _quiet_gx() -> None:
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="great_expectations")


def share_compiled_templates() -> dict[str, bytes] | None:
    """Have every Data Docs view of this process share one Jinja bytecode cache; returns its store.

    GX (1.24) builds a new Jinja environment for each page it renders, so the same
    ~20 templates are compiled again and again: about a second of the 2.5-3 s a
    small release's validation takes. Sharing their compiled code (keyed by name and
    source checksum, so a changed template is compiled afresh) renders the same
    pages without it. Where a GX version lacks the hook (None), Data Docs are built
    as GX builds them, only slower.
    """
    try:
        from great_expectations.render.view.view import DefaultJinjaView
    except ImportError:
        return None
    from jinja2.bccache import BytecodeCache

    built = DefaultJinjaView.__init__
    if hasattr(built, "compiled_templates"):
        return built.compiled_templates
    store: dict[str, bytes] = {}

    class Shared(BytecodeCache):
        def load_bytecode(self, bucket) -> None:
            if bucket.key in store:
                bucket.bytecode_from_string(store[bucket.key])

        def dump_bytecode(self, bucket) -> None:
            store[bucket.key] = bucket.bytecode_to_string()

    shared = Shared()

    def init(view, *args, **kwargs) -> None:
        built(view, *args, **kwargs)
        if getattr(view, "env", None) is not None:
            view.env.bytecode_cache = shared

    init.compiled_templates = store
    DefaultJinjaView.__init__ = init
    return store


def run_gx(metrics: dict[str, Any], checks: list[Check], docs_dir: str | None) -> dict[str, bool]:
    """Validate the metrics with one GX suite per part of the record; build Data Docs into docs_dir."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    _quiet_gx()
    share_compiled_templates()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    frame = pd.DataFrame([{c.name: metrics[c.name] for c in checks if c.name in metrics}])
    asset = context.data_sources.add_pandas("release").add_dataframe_asset("release_metrics")
    batch = asset.add_batch_definition_whole_dataframe("whole release")
    definitions = []
    for suite_name in suite_stages():
        active = [c for c in checks if c.suite == suite_name and c.name in metrics]
        if not active:
            continue
        suite = context.suites.add(gx.ExpectationSuite(name=f"facecap_{suite_name}"))
        for c in active:
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
                column=c.name, min_value=c.min_value, max_value=c.max_value, mostly=1.0,
                meta={"check": c.name, "notes": c.description}))
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=f"facecap_{suite_name}", data=batch, suite=suite)))
    if not definitions:
        return {}
    actions = []
    if docs_dir:
        context.add_data_docs_site(site_name="release", site_config={
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["release"]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(name="facecap_release", validation_definitions=definitions,
                                                       actions=actions))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    passed: dict[str, bool] = {}
    for run in outcome.run_results.values():
        for result in run.results:
            passed[result.expectation_config.kwargs["column"]] = bool(result.success)
    return passed


def offending_rows(db: ReleaseDB, check: Check, limit: int = 5) -> list[str] | None:
    """A few sample_ids that fail a row check: the report names them so the failure can be looked at."""
    condition = check.row_condition
    if not condition or "sample_id" not in db.columns:
        return None
    derived = ", ".join(f"{expr} AS {name}" for name, expr in derived_columns(db.columns).items())
    source = f"(SELECT *, {derived} FROM faces)" if derived else "faces"
    rows = db.con.execute(f"SELECT sample_id FROM {source} WHERE {condition} LIMIT {limit}").fetchall()
    return [str(r[0]) for r in rows]


def records_query(db: ReleaseDB, check: Check) -> str | None:
    """For a failed check, a query over the release's files that lists the records behind the failure."""
    if check.look_at:
        return look_at_query(check.look_at, db.path)
    condition = check.row_condition
    if condition and "sample_id" in db.columns and not any(name in condition for name in derived_columns(db.columns)):
        return look_at_query(f"SELECT sample_id FROM faces WHERE {condition}", db.path)
    return None


def run_suites(db: ReleaseDB, docs_dir: str | None = None, extra: dict[str, str] | None = None,
               extra_derived: dict[str, str] | None = None) -> tuple[list[CheckResult], dict[str, Any]]:
    """Every check's result (in suite order) and the raw metrics (plus `extra` aggregates, see compute_metrics)."""
    checks = build_checks(db.cfg)
    metrics, skipped = compute_metrics(db, checks, extra, extra_derived)
    gx_passed = run_gx(metrics, checks, docs_dir)
    results = []
    for c in checks:
        if c.name in skipped:
            status, why = skipped[c.name].split(": ", 1)
            results.append(CheckResult(c.name, c.suite, c.description, status, None, c.min_value, c.max_value, why,
                                       policy=c.policy))
            continue
        ok = gx_passed.get(c.name)
        if ok is None:  # GX did not report it: never count that as a pass
            results.append(CheckResult(c.name, c.suite, c.description, FAILED, metrics.get(c.name), c.min_value,
                                       c.max_value, "no result from Great Expectations"))
            continue
        results.append(CheckResult(c.name, c.suite, c.description, PASSED if ok else FAILED, metrics[c.name],
                                   c.min_value, c.max_value, examples=None if ok else offending_rows(db, c),
                                   policy=c.policy, look_at=None if ok else records_query(db, c)))
    return results, metrics


__all__ = ["CheckResult", "run_suites", "funnel_last_rows"]
