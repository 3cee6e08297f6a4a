"""The release's quality report: RELEASE/report/index.html (one self-contained file) and report.json.

Figures are DuckDB aggregates over the release's Parquet files, so the report
of a 15M-row release costs a few scans, not a load. index.html has inline
CSS, inline SVG charts and thumbnails as data URIs: it opens offline, with no
CDN. report.json holds the same figures for machines. Each registered stage
contributes its own section (Stage.report: its aggregates, figures, headline
lines, HTML and gallery fields); this module lays out what all reports share.
"""

from __future__ import annotations

import base64
import io
import json
import os
from html import escape
from typing import Any

from facecap.quality.card import rights_rows, stage_notes
from facecap.quality.primitives import NOT_APPLICABLE, data_files, sample_rows, table
from facecap.quality.release_db import ReleaseDB
from facecap.quality.suites import CheckResult
from facecap.schema import image_bytes

REJECT_EXAMPLES_PER_REASON = 3
THUMB_PX = 112


# --- figures ---------------------------------------------------------------
def _sections() -> list:
    """The registered stages' report sections, in chain order."""
    from facecap.chain import STAGES

    return [stage.report for stage in STAGES if stage.report is not None]


def figure_aggregates(db: ReleaseDB) -> tuple[dict[str, str], dict[str, str]]:
    """The report's aggregates and the per-row values they need: they run in the checks' scan."""
    if not db.has_data:
        return {}, {}
    exprs = {"n_rows": "count(*)"}
    derived: dict[str, str] = {}
    if "image_id" in db.columns:
        exprs["n_images"] = "count(DISTINCT hash(image_id))"  # 64-bit hash: exact enough for a headline
    for section in _sections():
        more, per_row = section.aggregates(db)
        exprs.update(more)
        derived.update(per_row)
    return exprs, derived


def compute_figures(db: ReleaseDB, agg: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the report from the scan's aggregates (`agg`) and what each stage's section adds."""
    rows = int(agg.get("n_rows") or 0)
    fig: dict[str, Any] = {"rows": rows, "splits": split_counts(db.path)}
    if rows and "n_images" in agg:
        fig["source_images"] = int(agg["n_images"])
    for section in _sections():
        fig.update(section.figures(db, agg))
    fig["rights"] = rights_figures(db)
    return fig


def split_counts(release_dir: str) -> dict[str, int]:
    """Rows per split, from the Parquet footers (data/train-*.parquet, data/test-*.parquet)."""
    import glob

    import pyarrow.parquet as pq

    out = {}
    for split in ("train", "test"):
        files = glob.glob(os.path.join(release_dir, "data", f"{split}-*.parquet"))
        if files:
            out[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return out


def rejects_summary(db: ReleaseDB) -> dict[str, Any]:
    if not db.has_rejects:
        return {"by_reason": [], "examples": {}}
    by_reason = [{"stage": s, "reason": r, "count": int(n)} for s, r, n in db.con.execute(
        "SELECT stage, reason, count(*) AS n FROM rejects GROUP BY ALL ORDER BY n DESC, stage, reason").fetchall()]
    examples: dict[str, list[dict]] = {}
    cur = db.con.execute(
        "SELECT stage, reason, detail, source, source_offset, det_score, bbox FROM rejects "
        "QUALIFY row_number() OVER (PARTITION BY reason ORDER BY hash(coalesce(sample_id, '') || source || "
        f"coalesce(source_offset, ''))) <= {REJECT_EXAMPLES_PER_REASON} ORDER BY reason")
    names = [d[0] for d in cur.description]
    for row in cur.fetchall():
        rec = dict(zip(names, row))
        if rec["det_score"] is not None:
            rec["det_score"] = round(float(rec["det_score"]), 4)
        examples.setdefault(rec["reason"], []).append(rec)
    return {"by_reason": by_reason, "examples": examples}


# --- rights ----------------------------------------------------------------
RIGHTS_TOP = 10  # licences and domains shown by name; the rest are summed as OTHER
NO_LICENSE, NO_URL, OTHER = "(none stated)", "(no URL: local file)", "(other)"
# Reject reasons counted as opt-outs and exclusions, from whichever stage wrote them. robots_noai is the
# older name of an X-Robots-Tag opt-out.
RIGHTS_REASONS = {"opted_out": ("opted_out", "robots_noai"), "excluded": ("excluded",)}
TAKEDOWN_WORD = "takedown"  # an `excluded` reject whose detail names a takedown counts as taken down


def _shares(db: ReleaseDB, column: str, none_label: str) -> list[dict] | None:
    """Face records by `column`: the RIGHTS_TOP most frequent values, then OTHER, then the records without one."""
    if not db.has_data or column not in db.columns:
        return None
    counts = db.con.execute(f'SELECT "{column}", count(*) AS n FROM faces GROUP BY ALL '
                            f'ORDER BY n DESC, "{column}" NULLS LAST').fetchall()
    total = sum(n for _, n in counts) or 1
    named = [(v, int(n)) for v, n in counts if v is not None]
    rows = [(v, n, None) for v, n in named[:RIGHTS_TOP]]
    if len(named) > RIGHTS_TOP:
        rows.append((OTHER, sum(n for _, n in named[RIGHTS_TOP:]), len(named) - RIGHTS_TOP))
    missing = sum(int(n) for v, n in counts if v is None)
    if missing:
        rows.append((none_label, missing, None))
    return [{"value": v, "records": n, "share": round(n / total, 4), **({"values": k} if k else {})}
            for v, n, k in rows]


def rights_figures(db: ReleaseDB) -> dict[str, Any]:
    """Shares of face records by licence and by domain, and the opt-out, exclusion and takedown counts.

    The counts are reject rows (an image rejected before detection is one row, a face after it one
    row) of the reasons in RIGHTS_REASONS, 0 when absent. Taken down: release.json's `taken_down` when
    the release records one, else the `excluded` rejects whose detail names a takedown.
    """
    reasons = {name: 0 for name in RIGHTS_REASONS}
    takedown_rejects = 0
    if db.has_rejects:
        wanted = {r: name for name, rs in RIGHTS_REASONS.items() for r in rs}
        for reason, n in db.con.execute("SELECT reason, count(*) FROM rejects WHERE list_contains(?, reason) "
                                        "GROUP BY ALL", [list(wanted)]).fetchall():
            reasons[wanted[reason]] += int(n)
        takedown_rejects = int(db.scalar("SELECT count(*) FROM rejects WHERE list_contains(?, reason) AND "
                                         "contains(lower(coalesce(detail, '')), ?)",
                                         [list(RIGHTS_REASONS["excluded"]), TAKEDOWN_WORD]))
    recorded = db.info.get("taken_down")
    from_info = isinstance(recorded, (int, float)) and not isinstance(recorded, bool)
    return {"licenses": _shares(db, "license", NO_LICENSE), "domains": _shares(db, "domain", NO_URL),
            "opted_out": reasons["opted_out"], "excluded": reasons["excluded"],
            "taken_down": int(recorded) if from_info else takedown_rejects,
            "taken_down_from": "release.json" if from_info else "rejects"}


def rights_html(fig: dict[str, Any] | None) -> str:
    if not fig:
        return ""
    parts = ["<h2>Rights</h2>"]
    for title, key, column in (("Licence", "licenses", "license"), ("Domain", "domains", "domain")):
        if fig.get(key) is None:
            parts.append(f"<p>{title}: the release has no <code>{column}</code> column (made before rights were "
                         "recorded).</p>")
        else:
            parts.append(f"<h3>{title}</h3>" + table([column, "face records", "share"], rights_rows(fig[key])))
    parts.append("<h3>Opt-outs, exclusions, takedowns</h3>" + table(
        ["", "rejects"], [["opted_out (download opt-outs: X-Robots-Tag, robots.txt, TDM reservation)",
                           f"{fig['opted_out']:,}"],
                          ["excluded (exclusion list)", f"{fig['excluded']:,}"],
                          [f"taken down (from {fig['taken_down_from']})", f"{fig['taken_down']:,}"]]))
    return "".join(parts)


# --- images ----------------------------------------------------------------
def _thumbnail(data: bytes, limits, box: list[float] | None = None) -> str | None:
    """A small JPEG data URI (decoded within the configured bounds), optionally of a region."""
    from PIL import Image

    from facecap.sources.images import decode_rgb

    rgb, _ = decode_rgb(data, limits)
    if rgb is None:
        return None
    img = Image.fromarray(rgb)
    if box:
        x1, y1, x2, y2 = box
        pad = 0.2 * max(x2 - x1, y2 - y1)
        img = img.crop((max(0, x1 - pad), max(0, y1 - pad), min(img.width, x2 + pad), min(img.height, y2 + pad)))
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# Columns that say where a record's caption came from (see caption_source).
CAPTION_SOURCE_COLUMNS = ("caption", "caption_model", "caption_check", "attribute_model", "text_verdict",
                          "text_caption", "text_denoise", "text_filter")


def caption_source(rec: dict) -> str:
    """Where a face record's caption came from, said plainly: the attribute path (grammar, LLM rewrite or
    not), the FLIP-80M alt-text path (filter, and whether an LLM or the rules alone cleaned it), or no caption
    at all (the unfiltered source alt-text is not a caption)."""
    if rec.get("caption_model") is not None:
        attrs = f"attributes from {rec['attribute_model']}" if rec.get("attribute_model") else "attributes"
        check = rec.get("caption_check") or ""
        if rec["caption_model"] == "none":
            return f"grammar: {attrs} -> PCFG text, not rewritten (no LLM)"
        if check == "passed":
            return f"grammar: {attrs} -> PCFG text, rewritten by {rec['caption_model']} (faithfulness check passed)"
        return f"grammar: {attrs} -> PCFG text; the {rec['caption_model']} rewrite was not used ({check})"
    if rec.get("caption") and rec.get("text_verdict") == "face_caption":
        denoise = rec.get("text_denoise") or "rules"
        cleaned = "denoised by the LLM" if denoise == "llm" else "cleaned by the rule-based pre-cleaner"
        judge = rec.get("text_filter") or "the text filter"
        if judge.startswith("keyword-match"):
            judge = "the face-keyword filter (no classifier configured)"
        return f"alt-text (FLIP-80M path): judged about a face by {judge}, {cleaned}"
    if rec.get("caption"):
        return "caption column of unknown origin"
    return "no caption: the unfiltered source alt-text (no caption stage ran)"


def gallery(db: ReleaseDB) -> list[dict]:
    """Sample faces spread over the release (row-group sample: no scan of the image column), each with its
    caption and where that caption came from."""
    n = db.cfg.quality.gallery_size
    if n <= 0 or "image" not in db.columns:
        return []
    fields: dict[str, str] = {}
    for section in _sections():
        fields.update(section.gallery_columns(db))
    source_cols = [c for c in CAPTION_SOURCE_COLUMNS if c in db.columns]
    wanted = list(dict.fromkeys(["sample_id", "image"] + [c for c in fields.values() if c in db.columns]
                                + source_cols))
    out = []
    for rec in sample_rows(data_files(db.path), n, wanted):
        face = {"sample_id": rec["sample_id"], **{f: rec.get(c) for f, c in fields.items()}}
        face["caption_source"] = caption_source({c: rec.get(c) for c in source_cols})
        face["thumbnail"] = _thumbnail(image_bytes(rec.get("image")) or b"", db.cfg.image)
        out.append(face)
    return out


def _reject_thumbnail(example: dict, limits) -> str | None:
    """A crop from the source, only where that is cheap: a local image file under a folder source."""
    source, offset = example.get("source") or "", example.get("source_offset") or ""
    path = os.path.join(source, offset)
    if not (os.path.isdir(source) and os.path.isfile(path)) or os.path.getsize(path) > limits.max_bytes:
        return None
    with open(path, "rb") as fh:
        return _thumbnail(fh.read(), limits, example.get("bbox"))


# --- HTML ------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#1d2330;padding:0 16px}h1{font-size:24px}h2{font-size:18px;border-bottom:1px solid #dde;padding-bottom:4px;
margin-top:32px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #dde;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f5f9}.passed{color:#137333;font-weight:600}
.failed{color:#b3261e;font-weight:700}.na{color:#6b7280}.banner{padding:10px 14px;border-radius:6px;margin:12px 0;
font-weight:600}.ok{background:#e6f4ea}.bad{background:#fce8e6}.warn{background:#fef7e0}svg{display:block;
margin:8px 0}svg text{font:11px sans-serif;fill:#1d2330}svg .t{font-weight:600;font-size:12px}svg .b{fill:#5b7bd5}
svg .r{stroke:#d93025;stroke-width:2;stroke-dasharray:3 2}svg .rt{fill:#d93025}svg .l{fill:none;stroke:#5b7bd5;
stroke-width:2}svg .a{stroke:#999}.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:220px;border:1px solid #dde;
border-radius:6px;padding:6px;font-size:12px}.card img{width:112px;height:112px;object-fit:cover;display:block}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}code{font-size:12px}
"""





def _in_pipeline_order(stages: dict) -> dict:
    # release.json's keys are sorted; show stages the way records flow through them.
    from facecap.chain import STAGES

    order = [s.name for s in STAGES] + ["validate"]
    return dict(sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _allowed(check: dict) -> str:
    low, high = check["min_value"], check["max_value"]
    if high is None:
        return f">= {low}"
    return f"{low} .. {high}" if low is not None else f"<= {high}"


def _status(result: dict) -> str:
    cls = {"passed": "passed", "failed": "failed"}.get(result["status"], "na")
    return f'<span class="{cls}">{escape(result["status"])}</span>'


def render_html(report: dict[str, Any]) -> str:
    info, v = report["release"], report["validation"]
    parts = [f"<h1>FaceCap release quality report</h1><p>run <code>{escape(str(info.get('run_id')))}</code>, "
             f"created {escape(str(info.get('created_at')))}, profile <b>{escape(str(info.get('profile')))}</b>, "
             f"report written {escape(report['generated_at'])}</p>"]
    if v["passed"]:
        parts.append('<div class="banner ok">All applicable quality checks passed.</div>')
    elif v.get("allow_failures"):
        parts.append(f'<div class="banner warn">Checks failed ({escape(", ".join(v["failed"]))}); published anyway '
                     "because --allow-failures was given (recorded in release.json).</div>")
    else:
        parts.append(f'<div class="banner bad">NOT PUBLISHED: checks failed: {escape(", ".join(v["failed"]))}. '
                     "The release stays in staging; fix the data or settings and rerun, or pass "
                     "--allow-failures to publish it anyway.</div>")
    h = report["headline"]
    parts.append("<h2>Headline</h2>" + table(["figure", "value"], [[k, val] for k, val in h.items()]))

    parts.append("<h2>Funnel</h2>" + table(
        ["stage", "rows in", "rows out", "rejects by reason"],
        [[r["stage"], f"{r.get('rows_in', 0):,}", f"{r.get('rows_out', 0):,}",
          ", ".join(f"{k} {n:,}" + (f" ({n / r['rows_in']:.1%})" if r.get("rows_in") else "")
                    for k, n in (r.get("rejects") or {}).items()) or "none"]
         for r in info.get("funnel") or []]))
    stages = _in_pipeline_order(info.get("stages") or {})
    for warning in stage_notes({"stages": stages}, "warning"):
        parts.append(f'<div class="banner warn">{escape(warning)}</div>')
    parts.append(table(["stage", "status", "model / why", "calibration"],
                        [[name, s.get("status"), s.get("model") or s.get("why") or "",
                          "<b>uncalibrated</b>" if s.get("calibration") == "uncalibrated"
                          else escape(str(s.get("calibration") or ""))]
                         for name, s in stages.items()], raw={3}))

    parts.append("<h2>Quality suites</h2>" + table(
        ["suite", "check", "status", "observed", "allowed", "what must hold / why not applicable"],
        [[c["suite"], c["name"], _status(c), "" if c["observed"] is None else c["observed"],
          _allowed(c) if c["status"] != NOT_APPLICABLE else "",
          (c["why"] if c["why"] else c["description"])
          + (f"; e.g. sample_id {', '.join(c['examples'])}" if c.get("examples") else "")
          + (f"; the records: {c['look_at']}" if c.get("look_at") else "")]
         for c in v["checks"]], raw={2}))
    parts.append("<p>Great Expectations' own Data Docs: <a href=\"gx/index.html\">gx/index.html</a> "
                 "(they load their CSS/JS from a CDN, so offline they render unstyled).</p>")

    parts.append("<h2>Distributions</h2>")
    parts += [section.html(report) for section in _sections()]

    parts.append(rights_html(report["figures"].get("rights")))

    parts.append("<h2>Sample faces</h2><div class=\"grid\">")
    for g in report["gallery"]:
        img = f'<img src="{g["thumbnail"]}" alt="face">' if g.get("thumbnail") else "<p>(undecodable)</p>"
        shown = "".join(section.gallery_html(g) for section in _sections())
        source = (f'<div class="na">caption source: {escape(g["caption_source"])}</div>'
                  if g.get("caption_source") else "")
        parts.append(f'<div class="card">{img}<code>{escape(g["sample_id"])}</code>{shown}{source}</div>')
    parts.append("</div>")

    rej = report["rejects"]
    parts.append("<h2>Rejects</h2>" + table(["stage", "reason", "count"],
                                             [[r["stage"], r["reason"], f"{r['count']:,}"] for r in rej["by_reason"]]))
    parts.append("<p>Reject rows carry no crop; a thumbnail is cut from the source only where that is cheap "
                 "(a local image file in a folder source), otherwise the row's provenance is shown.</p>")
    for reason, examples in rej["examples"].items():
        parts.append(f"<h3>{escape(reason)}</h3><div class=\"grid\">")
        for e in examples:
            img = f'<img src="{e["thumbnail"]}" alt="source region">' if e.get("thumbnail") else ""
            score = f"score {e['det_score']}<br>" if e.get("det_score") is not None else ""
            parts.append(f'<div class="card">{img}<code>{escape(os.path.basename(e["source"] or ""))}</code> '
                         f'{escape(str(e.get("source_offset") or ""))}<br>{score}{escape(str(e.get("detail") or ""))}'
                         "</div>")
        parts.append("</div>")

    parts.append("<h2>What produced it</h2>" + table(
        ["", ""], [[key, info.get(key)] for key in _release_model_keys()] +
        [[f"{name} model", s["model"] + (f" (calibration: {s['calibration']})" if s.get("calibration") else "")]
         for name, s in stages.items() if s.get("model")] +
        [["sources", ", ".join(info.get("sources") or [])]]))
    parts.append(table(["package", "version"], [[k, val] for k, val in (info.get("versions") or {}).items()]))
    parts.append(f"<h3>config.yaml</h3><pre>{escape(report['config_yaml'])}</pre>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>FaceCap release report"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def headline(fig: dict, info: dict, validation: dict) -> dict[str, Any]:
    h: dict[str, Any] = {"face records": f"{fig['rows']:,}", "rejects": f"{info.get('rejects', 0):,}"}
    if "source_images" in fig:
        h["source images"] = f"{fig['source_images']:,}"
    if fig.get("splits"):
        h["split"] = ", ".join(f"{k} {v:,}" for k, v in fig["splits"].items())
    for section in _sections():
        h.update(section.headline(fig))
    rights = fig.get("rights")
    if rights:
        h["opted out / excluded / taken down"] = (f"{rights['opted_out']:,} / {rights['excluded']:,} / "
                                                  f"{rights['taken_down']:,}")
    h["quality checks"] = (f"{validation['counts']['passed']} passed, {validation['counts']['failed']} failed, "
                           f"{validation['counts']['not applicable']} not applicable")
    return h


def _release_model_keys() -> list[str]:
    """release.json keys naming a stage's model identity (Stage.model_in_release)."""
    from facecap.chain import STAGES

    return [s.model_in_release for s in STAGES if s.model_in_release]


def write_report(db: ReleaseDB, results: list[CheckResult], validation: dict, generated_at: str,
                 aggregates: dict[str, Any]) -> dict:
    """Write RELEASE/report/index.html and report.json; return the report dict (figures, no thumbnails).

    `aggregates` are figure_aggregates() values computed in the checks' scan."""
    fig = compute_figures(db, aggregates)
    rejects = rejects_summary(db)
    for examples in rejects["examples"].values():
        for e in examples:
            e["thumbnail"] = _reject_thumbnail(e, db.cfg.image)
    config_path = os.path.join(db.path, "config.yaml")
    report = {
        "generated_at": generated_at,
        "release": {k: db.info.get(k) for k in ("run_id", "created_at", "profile", "records", "rejects", "funnel",
                                                "release_passes", "stages", *_release_model_keys(), "sources",
                                                "versions")},
        "validation": validation,
        "headline": headline(fig, db.info, validation),
        "figures": fig,
        "rejects": rejects,
        "gallery": gallery(db),
        "config_yaml": open(config_path).read() if os.path.isfile(config_path) else db.cfg.to_yaml(),
    }
    out_dir = os.path.join(db.path, "report")
    os.makedirs(out_dir, exist_ok=True)
    html = render_html(report)
    from facecap import storage

    storage.write_bytes_atomic(os.path.join(out_dir, "index.html"), html.encode())
    machine = json.loads(json.dumps(report, default=str))
    for g in machine["gallery"]:
        g.pop("thumbnail", None)
    for examples in machine["rejects"]["examples"].values():
        for e in examples:
            e.pop("thumbnail", None)
    storage.write_json_atomic(os.path.join(out_dir, "report.json"), machine)
    return machine
