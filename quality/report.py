"""The release's quality report: RELEASE/report/index.html (one self-contained file) and report.json.

Figures are DuckDB aggregates over the release's Parquet files, so the report
of a 15M-row release costs a few scans, not a load. index.html has inline
CSS, inline SVG charts and thumbnails as data URIs: it opens offline, with no
CDN. report.json holds the same figures for machines.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html import escape
from typing import Any

from facecap.attributes import ATTRIBUTES, CATEGORY_OF, PAPER_CATEGORY_SHARES
from facecap.quality import svg
from facecap.quality.card import stage_notes
from facecap.quality.checks import caption_blank_sql, caption_words_sql
from facecap.quality.release_db import ReleaseDB, data_files
from facecap.quality.suites import NOT_APPLICABLE, CheckResult, sample_rows
from facecap.schema import image_bytes

PAPER_MEAN_CROP_PX = 285  # FaceCaption-15M: mean face region 285 x 285
PAPER_MEAN_CAPTION_WORDS = 30
REJECT_EXAMPLES_PER_REASON = 3
THUMB_PX = 112


# --- figures ---------------------------------------------------------------
def _bin_expr(expr: str, lo: float, hi: float, bins: int) -> str:
    width = (hi - lo) / bins or 1
    return f"least(greatest(floor(({expr} - {lo}) / {width}), 0), {bins - 1})::INT"


def _hist(counts_by_bin: dict | None, lo: float, hi: float, bins: int) -> dict:
    width = (hi - lo) / bins or 1
    counts = [0] * bins
    for b, n in (counts_by_bin or {}).items():
        if b is not None:
            counts[int(b)] = int(n)
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}


def _caption_column(db: ReleaseDB) -> tuple[str | None, str]:
    """The caption people train on; the source's own text when the caption stage was off (and say so)."""
    if "caption" in db.columns:
        return "caption", "caption"
    if "source_caption" in db.columns:
        return "source_caption", "source_caption (caption stage off: the original alt-text)"
    return None, "no caption column"


def _four_gram_curve(db: ReleaseDB, column: str, sample: int) -> dict:
    """Unique 4-grams as the share of data grows: the paper's naturalness measure, on a deterministic
    sample spread over the release (see suites.sample_rows)."""
    texts = [r[column] for r in sample_rows(data_files(db.path), sample, [column]) if r[column]]
    seen: set[tuple[str, ...]] = set()
    total = 0
    points = []
    marks = {max(1, round(len(texts) * k / 10)) for k in range(1, 11)} if texts else set()
    for i, text in enumerate(texts, 1):
        words = re.findall(r"[a-z0-9']+", text.lower())
        grams = list(zip(words, words[1:], words[2:], words[3:]))
        total += len(grams)
        seen.update(grams)
        if i in marks:
            points.append({"share": round(i / len(texts), 3), "captions": i, "unique_4grams": len(seen),
                           "total_4grams": total})
    return {"sample": len(texts), "points": points}


def _text_sql(db: ReleaseDB, column: str) -> tuple[str, str, dict[str, str]]:
    """(words, blank) SQL for the report's text column, and per-row columns to add for them."""
    if column == "caption":  # the checks already compute these once per row
        return "_caption_words", "_caption_blank", {}
    return "_text_words", "_text_blank", {"_text_words": caption_words_sql(column),
                                          "_text_blank": caption_blank_sql(column)}


def figure_bins(db: ReleaseDB) -> dict[str, tuple[float, float, int]]:
    """Fixed histogram ranges (from the config, not the data), so the figures need no extra scan."""
    cfg = db.cfg
    side_hi = max(1024.0, 8.0 * cfg.detect.min_face_px)
    return {"det": (min(cfg.detect.min_score, 0.999), 1.0, 20), "side": (float(cfg.detect.min_face_px), side_hi, 24),
            "words": (0.0, float(max(cfg.quality.max_caption_words, 40)), 24), "pad": (0.0, 0.5, 20)}


def figure_aggregates(db: ReleaseDB) -> tuple[dict[str, str], dict[str, str]]:
    """The report's aggregates and the per-row values they need: they run in the checks' scan."""
    cols, bins = set(db.columns), figure_bins(db)
    if not db.has_data:
        return {}, {}
    exprs = {"n_rows": "count(*)"}
    derived: dict[str, str] = {}
    if "image_id" in cols:
        exprs["n_images"] = "count(DISTINCT hash(image_id))"  # 64-bit hash: exact enough for a headline
    if "det_score" in cols:
        exprs.update(det_mean="avg(det_score)", det_hist=f"histogram({_bin_expr('det_score', *bins['det'])})")
    if {"width", "height"} <= cols:
        exprs.update(w_mean="avg(width)", h_mean="avg(height)",
                     side_hist=f"histogram({_bin_expr('sqrt(width * height)', *bins['side'])})")
    if "pad_fraction" in cols:
        exprs.update(pad_mean="avg(pad_fraction)", padded="count(*) FILTER (pad_fraction > 0)",
                     pad_hist=f"histogram({_bin_expr('pad_fraction', *bins['pad'])})")
    if "attributes" in cols:
        exprs["per_face"] = "histogram(len(attributes))"
    column, _ = _caption_column(db)
    if column:
        words, blank, derived = _text_sql(db, column)
        exprs.update(words_mean=f"avg({words}) FILTER (NOT {blank})",
                     words_hist=f"histogram({_bin_expr(words, *bins['words'])}) FILTER (NOT {blank})")
    if "caption_check" in cols:
        # Fallback reasons carry details ("omission: Smiling (3 attempts)"): group on the kind before ":".
        exprs["checks"] = "histogram(split_part(caption_check, ':', 1))"
        if "caption_model" in cols:
            exprs["not_rewritten"] = "count(*) FILTER (caption_model = 'none' OR caption_check = 'not_rewritten')"
    return exprs, derived


def compute_figures(db: ReleaseDB, agg: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the report from the scan's aggregates (`agg`), one attribute count and two samples."""
    cfg, cols, bins = db.cfg, set(db.columns), figure_bins(db)
    rows = int(agg.get("n_rows") or 0)
    fig: dict[str, Any] = {"rows": rows, "splits": split_counts(db.path)}
    if rows and "n_images" in agg:
        fig["source_images"] = int(agg["n_images"])
    if rows and "det_hist" in agg:
        fig["det_score"] = {"mean": round(float(agg["det_mean"]), 5), "threshold": cfg.detect.min_score,
                            **_hist(agg["det_hist"], *bins["det"])}
    if rows and "side_hist" in agg:
        fig["crop"] = {"mean_width": round(float(agg["w_mean"]), 1), "mean_height": round(float(agg["h_mean"]), 1),
                       "paper_mean": PAPER_MEAN_CROP_PX, "min_face_px": cfg.detect.min_face_px,
                       "note": f"crop side sqrt(width x height); the last bin holds everything >= {bins['side'][1]:g}",
                       **_hist(agg["side_hist"], *bins["side"])}
    if rows and "pad_hist" in agg:
        fig["pad"] = {"mean": round(float(agg["pad_mean"]), 4), "padded_faces": int(agg["padded"]),
                      "limit": cfg.quality.max_mean_pad_fraction,
                      "note": "share of each crop outside its source image (black padding); the last bin holds "
                              f"everything >= {bins['pad'][1]:g}",
                      **_hist(agg["pad_hist"], *bins["pad"])}
    if rows and "per_face" in agg:
        per_face = {int(k): int(v) for k, v in (agg["per_face"] or {}).items() if k is not None}
        freq = dict(db.con.execute("SELECT a, count(*) FROM (SELECT unnest(attributes) AS a FROM faces) GROUP BY a")
                    .fetchall())
        kept = sum(freq.values()) or 1
        shares = {cat: 0 for cat in PAPER_CATEGORY_SHARES}
        for name, n in freq.items():
            if name in CATEGORY_OF:
                shares[CATEGORY_OF[name]] += n
        fig["attributes"] = {
            "mean_per_face": round(sum(k * v for k, v in per_face.items()) / rows, 2),
            "per_face": {str(k): v for k, v in sorted(per_face.items())},
            "frequency": {name: int(freq.get(name, 0)) for name in ATTRIBUTES},
            "category_share_pct": {cat: round(100 * n / kept, 1) for cat, n in shares.items()},
            "paper_category_share_pct": PAPER_CATEGORY_SHARES,
        }
    else:
        off = db.stage_off_reason("annotate")
        fig["attributes"] = {NOT_APPLICABLE: f"stage annotate off ({off})" if off else "no attributes column"}
    column, label = _caption_column(db)
    if rows and "words_hist" in agg:
        fig["caption_words"] = {"column": label, "mean": round(float(agg["words_mean"] or 0), 1),
                                "paper_mean": PAPER_MEAN_CAPTION_WORDS, **_hist(agg["words_hist"], *bins["words"])}
        fig["four_grams"] = {"column": label, **_four_gram_curve(db, column, cfg.quality.ngram_sample)}
    if rows and "checks" in agg:
        checks = dict(sorted(((str(k), int(v)) for k, v in (agg["checks"] or {}).items()), key=lambda kv: -kv[1]))
        not_rewritten = int(agg.get("not_rewritten", checks.get("not_rewritten", 0)))
        fig["rewrite"] = {"checks": checks, "not_rewritten_share": round(not_rewritten / rows, 4)}
        # The caption stage's run-level counts (hallucinated / omitted attributes, fallbacks, LLM
        # requests and cache hits), summed over shards by the manifest into the funnel.
        for row in db.info.get("funnel") or []:
            if row.get("stage") == "caption" and row.get("extra"):
                fig["rewrite"]["run_counts"] = {k: int(v) for k, v in sorted(row["extra"].items())}
    else:
        off = db.stage_off_reason("caption")
        fig["rewrite"] = {NOT_APPLICABLE: f"stage caption off ({off})" if off else "no caption_check column"}
    fig.update(_web_figures(db.info.get("funnel") or []))
    return fig


PAPER_REACHABLE_SHARE = 0.75  # FaceCaption-15M: ~75 % of LAION-Face's URLs were still reachable
PAPER_CHARS_REMOVED_SHARE = 0.095  # FLIP-80M: denoising removed 9.5 % of the alt-text's characters


def _web_figures(funnel: list[dict]) -> dict[str, Any]:
    """The FLIP-80M path's figures, from the funnel's summed stage counts: the share of listed URLs
    that were reached (when the run downloaded), and the share of alt-text characters cleaning removed."""
    out: dict[str, Any] = {}
    for row in funnel:
        extra, rows_in = row.get("extra") or {}, int(row.get("rows_in") or 0)
        if row.get("stage") == "ingest" and extra.get("downloaded_bytes") and rows_in:
            out["download"] = {"records_in": rows_in, "images_out": int(row.get("rows_out") or 0),
                               "reachable_share": round(int(row.get("rows_out") or 0) / rows_in, 4),
                               "paper_reachable_share": PAPER_REACHABLE_SHARE,
                               "note": "ingest of every source in the run; URL lists are the ones that can miss"}
        if row.get("stage") == "text" and extra.get("alt_text_chars"):
            chars = int(extra["alt_text_chars"])
            out["alt_text"] = {"chars": chars, "chars_removed": int(extra.get("text_chars_removed", 0)),
                               "removed_share": round(int(extra.get("text_chars_removed", 0)) / chars, 4),
                               "paper_removed_share": PAPER_CHARS_REMOVED_SHARE,
                               "with_keywords": int(extra.get("with_keywords", 0)),
                               "llm_denoised": int(extra.get("llm_denoised", 0))}
    return out


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


# --- images ----------------------------------------------------------------
def _thumbnail(data: bytes, limits, box: list[float] | None = None) -> str | None:
    """A small JPEG data URI (decoded within the configured bounds), optionally of a region."""
    from PIL import Image

    from facecap.stages.images import decode_rgb

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


def gallery(db: ReleaseDB) -> list[dict]:
    """Sample faces spread over the release (row-group sample: no scan of the image column)."""
    n = db.cfg.quality.gallery_size
    if n <= 0 or "image" not in db.columns:
        return []
    column, _ = _caption_column(db)
    wanted = ["sample_id", "image", "det_score", "width", "height"] + ([column] if column else []) + \
        (["attributes"] if "attributes" in db.columns else [])
    out = []
    for rec in sample_rows(data_files(db.path), n, wanted):
        rec["caption"] = rec.pop(column, None) if column else None
        rec["thumbnail"] = _thumbnail(image_bytes(rec.pop("image")) or b"", db.cfg.image)
        out.append(rec)
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


def _table(headers: list[str], rows: list[list[Any]], raw: set[int] | None = None) -> str:
    raw = raw or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw else escape('' if c is None else str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


def _near_duplicates_html(found: dict | None) -> str:
    """Clusters of near-duplicate faces: counts, sizes, and the largest clusters' faces (kept one first)."""
    if not found:
        return ""
    faces = found.get("faces") or 0
    removed = found.get("removed") or 0
    keep = escape(str(found.get("keep")))
    out = ["<h2>Near-duplicates</h2>",
           f"<p>{faces:,} faces in {found.get('clusters', 0):,} clusters; "
           f"{found.get('clusters_with_duplicates', 0):,} clusters hold {found.get('faces_in_duplicate_clusters', 0):,} "
           f"faces with near-duplicates (64-bit pHash of the crop or its mirror within {found.get('max_distance')} "
           f"bits). dedup.keep={keep}: "
           f"<b>{removed:,} faces removed ({removed / faces if faces else 0:.1%})</b>. Splits keep every cluster "
           "and every source image on one side.</p>",
           _table(["cluster size", "clusters"],
                  [[k, f"{v:,}"] for k, v in (found.get("cluster_sizes") or {}).items()])]
    for cluster in found.get("gallery") or []:
        cards = "".join(f'<div class="card" style="width:110px"><img src="{escape(f["file"])}" alt="face">'
                        f'<code>{escape(f["sample_id"])}</code>{" <b>kept</b>" if f["kept"] else ""}</div>'
                        for f in cluster["faces"])
        shown = f", first {len(cluster['faces'])} shown" if cluster["size"] > len(cluster["faces"]) else ""
        out.append(f"<p>Cluster of {cluster['size']:,} faces (kept: <code>{escape(cluster['kept'])}</code>{shown})"
                   f"</p><div class=\"grid\">{cards}</div>")
    return "".join(out)


def render_html(report: dict[str, Any]) -> str:
    info, fig, v = report["release"], report["figures"], report["validation"]
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
    parts.append("<h2>Headline</h2>" + _table(["figure", "value"], [[k, val] for k, val in h.items()]))

    parts.append("<h2>Funnel</h2>" + _table(
        ["stage", "rows in", "rows out", "rejects by reason"],
        [[r["stage"], f"{r.get('rows_in', 0):,}", f"{r.get('rows_out', 0):,}",
          ", ".join(f"{k} {n:,}" + (f" ({n / r['rows_in']:.1%})" if r.get("rows_in") else "")
                    for k, n in (r.get("rejects") or {}).items()) or "none"]
         for r in info.get("funnel") or []]))
    stages = _in_pipeline_order(info.get("stages") or {})
    for warning in stage_notes({"stages": stages}, "warning"):
        parts.append(f'<div class="banner warn">{escape(warning)}</div>')
    parts.append(_table(["stage", "status", "model / why", "calibration"],
                        [[name, s.get("status"), s.get("model") or s.get("why") or "",
                          "<b>uncalibrated</b>" if s.get("calibration") == "uncalibrated"
                          else escape(str(s.get("calibration") or ""))]
                         for name, s in stages.items()], raw={3}))

    parts.append("<h2>Quality suites</h2>" + _table(
        ["suite", "check", "status", "observed", "allowed", "what must hold / why not applicable"],
        [[c["suite"], c["name"], _status(c), "" if c["observed"] is None else c["observed"],
          _allowed(c) if c["status"] != NOT_APPLICABLE else "",
          (c["why"] if c["why"] else c["description"])
          + (f"; e.g. sample_id {', '.join(c['examples'])}" if c.get("examples") else "")]
         for c in v["checks"]], raw={2}))
    parts.append("<p>Great Expectations' own Data Docs: <a href=\"gx/index.html\">gx/index.html</a> "
                 "(they load their CSS/JS from a CDN, so offline they render unstyled).</p>")

    parts.append("<h2>Distributions</h2>")
    if "det_score" in fig:
        d = fig["det_score"]
        parts.append(svg.histogram(d["edges"], d["counts"], f"detector score (mean {d['mean']})",
                                   mark=d["threshold"], mark_label=f"threshold {d['threshold']}"))
    if "crop" in fig:
        c = fig["crop"]
        parts.append(svg.histogram(c["edges"], c["counts"],
                                   f"crop side, px (mean {c['mean_width']} x {c['mean_height']}; paper 285 x 285)",
                                   mark=c["paper_mean"], mark_label="paper mean 285"))
    if "pad" in fig:
        p = fig["pad"]
        parts.append(svg.histogram(p["edges"], p["counts"],
                                   f"share of the crop past the image edge (mean {p['mean']}; "
                                   f"{p['padded_faces']:,} faces padded at all)",
                                   mark=p["limit"], mark_label=f"mean limit {p['limit']}"))
    a = fig["attributes"]
    if NOT_APPLICABLE in a:
        parts.append(f'<p class="na">Attributes: not applicable: {escape(a[NOT_APPLICABLE])}</p>')
    else:
        per = a["per_face"]
        parts.append(svg.bars(list(per), list(per.values()), f"kept attributes per face (mean {a['mean_per_face']})"))
        parts.append(svg.bars(list(a["frequency"]), list(a["frequency"].values()), "attribute frequency (faces)"))
        cats = list(a["category_share_pct"])
        parts.append(svg.bars(cats, [a["category_share_pct"][k] for k in cats],
                              "category share of kept labels, % (red tick: FaceCaption-15M)",
                              reference=[a["paper_category_share_pct"][k] for k in cats], unit="%"))
    if "caption_words" in fig:
        w = fig["caption_words"]
        parts.append(svg.histogram(w["edges"], w["counts"], f"{w['column']}: words per caption (mean {w['mean']}; "
                                   f"paper ≈ {w['paper_mean']})", mark=w["paper_mean"], mark_label="paper ≈ 30"))
        g = fig["four_grams"]
        parts.append(svg.line([p["captions"] for p in g["points"]], [p["unique_4grams"] for p in g["points"]],
                              f"unique 4-grams vs captions ({g['column']}; deterministic sample of {g['sample']:,})",
                              "captions", "unique 4-grams"))
    r = fig["rewrite"]
    if NOT_APPLICABLE in r:
        parts.append(f'<p class="na">Rewrite faithfulness: not applicable: {escape(r[NOT_APPLICABLE])}</p>')
    else:
        parts.append(svg.bars(list(r["checks"]), list(r["checks"].values()), "rewrite faithfulness (caption_check)"))
        parts.append(f"<p>Share of captions not rewritten by the LLM: <b>{100 * r['not_rewritten_share']:.1f} %</b></p>")
        if r.get("run_counts"):
            rows_html = "".join(f"<tr><td>{escape(k)}</td><td>{v:,}</td></tr>" for k, v in r["run_counts"].items())
            parts.append(f"<table><tr><th>caption stage count (this run)</th><th>n</th></tr>{rows_html}</table>")

    if "download" in fig:
        d = fig["download"]
        parts.append(f"<p>Downloads: {d['images_out']:,} of {d['records_in']:,} listed records reached "
                     f"(<b>{100 * d['reachable_share']:.1f} %</b>; FaceCaption-15M reached ≈ "
                     f"{100 * d['paper_reachable_share']:.0f} % of LAION-Face). Failures by status are in the funnel.</p>")
    if "alt_text" in fig:
        a = fig["alt_text"]
        parts.append(f"<p>Alt-text cleaning removed <b>{100 * a['removed_share']:.1f} %</b> of {a['chars']:,} "
                     f"characters (FLIP-80M: {100 * a['paper_removed_share']:.1f} %); {a['with_keywords']:,} "
                     f"captions matched face keywords, {a['llm_denoised']:,} were denoised by the LLM.</p>")

    parts.append(_near_duplicates_html((info.get("release_passes") or {}).get("dedup")))

    parts.append("<h2>Sample faces</h2><div class=\"grid\">")
    for g in report["gallery"]:
        img = f'<img src="{g["thumbnail"]}" alt="face">' if g.get("thumbnail") else "<p>(undecodable)</p>"
        attrs = f"<br><i>{escape(', '.join(g['attributes']))}</i>" if g.get("attributes") else ""
        parts.append(f'<div class="card">{img}<code>{escape(g["sample_id"])}</code> score {g["det_score"]:.3f}, '
                     f'{g["width"]}x{g["height"]}<br>{escape(g.get("caption") or "")}{attrs}</div>')
    parts.append("</div>")

    rej = report["rejects"]
    parts.append("<h2>Rejects</h2>" + _table(["stage", "reason", "count"],
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

    parts.append("<h2>What produced it</h2>" + _table(
        ["", ""], [["detector", info.get("detector")]] +
        [[f"{name} model", s["model"] + (f" (calibration: {s['calibration']})" if s.get("calibration") else "")]
         for name, s in stages.items() if s.get("model")] +
        [["sources", ", ".join(info.get("sources") or [])]]))
    parts.append(_table(["package", "version"], [[k, val] for k, val in (info.get("versions") or {}).items()]))
    parts.append(f"<h3>config.yaml</h3><pre>{escape(report['config_yaml'])}</pre>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>FaceCap release report"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def headline(fig: dict, info: dict, validation: dict) -> dict[str, Any]:
    h: dict[str, Any] = {"face records": f"{fig['rows']:,}", "rejects": f"{info.get('rejects', 0):,}"}
    if "source_images" in fig:
        h["source images"] = f"{fig['source_images']:,}"
    if fig.get("splits"):
        h["split"] = ", ".join(f"{k} {v:,}" for k, v in fig["splits"].items())
    if "crop" in fig:
        h["mean crop"] = f"{fig['crop']['mean_width']} x {fig['crop']['mean_height']} px (paper 285 x 285)"
    if "det_score" in fig:
        h["mean detector score"] = fig["det_score"]["mean"]
    if NOT_APPLICABLE not in fig["attributes"]:
        h["kept attributes per face"] = fig["attributes"]["mean_per_face"]
    if "caption_words" in fig:
        h["words per caption"] = f"{fig['caption_words']['mean']} ({fig['caption_words']['column']}; paper ≈ 30)"
    h["quality checks"] = (f"{validation['counts']['passed']} passed, {validation['counts']['failed']} failed, "
                           f"{validation['counts']['not applicable']} not applicable")
    return h


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
                                                "release_passes", "stages", "detector", "sources", "versions")},
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
