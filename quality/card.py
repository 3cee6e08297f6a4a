"""The dataset card: RELEASE/README.md, in the Hugging Face dataset-card layout (YAML header + Markdown)."""

from __future__ import annotations

import os
from typing import Any

from facecap import storage

def field_notes() -> dict[str, str]:
    """What each column means, from the registered stages' column docs."""
    from facecap.chain import STAGES

    notes: dict[str, str] = {}
    for stage in STAGES:
        for column, note in stage.column_docs.items():
            notes.setdefault(column, note)
    return notes


def stage_notes(info: dict[str, Any], place: str) -> list[str]:
    """The registered stages' card sentences for `place` (see Stage.card_notes), in chain order."""
    from facecap.chain import STAGES

    return [note for stage in STAGES if (note := stage.card_notes(info).get(place))]


def rights_rows(shares: list[dict] | None) -> list[list[str]]:
    """A shares table's rows (value, face records, share), for the report and the card alike."""
    rows = []
    for s in shares or []:
        value = str(s["value"]) + (f" ({s['values']:,} values)" if s.get("values") else "")
        rows.append([value, f"{s['records']:,}", f"{100 * s['share']:.1f} %"])
    return rows


def rights_lines(fig: dict[str, Any] | None) -> list[str]:
    """The card's rights section: face records by licence and by domain, and the opt-out counts
    (figures from the report: facecap.quality.report.rights_figures)."""
    if not fig:
        return []
    lines = ["", "## Licences, domains and opt-outs", "",
             "Each record carries `license` (as its source states it), `source_url` and `domain` (its host). "
             "Face records by each:"]
    for title, key, column in (("Licence", "licenses", "license"), ("Domain", "domains", "domain")):
        if fig.get(key) is None:
            lines += ["", f"{title}: not recorded (this release has no `{column}` column)."]
            continue
        lines += ["", f"| {column} | face records | share |", "|---|---|---|"]
        # A licence is free text: one line, no cell separators, or the table breaks.
        lines += [f"| {' '.join(v.split()).replace('|', '/')} | {n} | {share} |"
                  for v, n, share in rights_rows(fig[key])]
    lines += ["", "| records left out | rejects |", "|---|---|",
              f"| opted_out (download opt-outs) | {fig['opted_out']:,} |",
              f"| excluded (exclusion list) | {fig['excluded']:,} |",
              f"| taken down (from {fig['taken_down_from']}) | {fig['taken_down']:,} |"]
    return lines


def write_card(release_dir: str, info: dict[str, Any], report: dict[str, Any], columns: list[str]) -> None:
    splits = info.get("splits") or {}
    header = ["---", "pretty_name: FaceCap face image-caption release", "license: other",
              "task_categories:", "- image-to-text", "- zero-shot-image-classification", "tags:", "- faces",
              "- image-captioning", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        header += [f"  - split: {split}", f"    path: data/{split}-*.parquet"]
    if not splits:  # a release from before splits, or an empty one
        header += ["  - split: train", "    path: data/*.parquet"]
    header.append("---")

    v = info.get("validation") or {}
    verdict = ("all applicable quality checks passed" if v.get("passed")
               else f"quality checks FAILED ({', '.join(v.get('failed', []))})"
               + (" and it was published with --allow-failures" if v.get("allow_failures") else ""))
    lines = header + [
        "", "# FaceCap face image-caption release", "",
        f"Made by FaceCap (run `{info.get('run_id')}`, profile `{info.get('profile')}`, {info.get('created_at')}). "
        f"This release: {verdict}. Full figures: `report/index.html` (opens offline) and `report/report.json`.",
        "", "## Headline numbers", "",
    ]
    for warning in reversed(stage_notes(info, "warning")):
        lines[-3:-3] = ["", f"> **Warning: {warning}**"]  # right under the verdict, before the numbers
    lines += [f"- {k}: {val}" for k, val in (report.get("headline") or {}).items()]
    lines += ["", "## Counts", "", "| split | face records |", "|---|---|"]
    lines += [f"| {k} | {n:,} |" for k, n in splits.items()]
    split_by = info.get("split_by") or "image_id"
    lines += ["", f"Splits are assigned by {split_by}: faces of one source image"
              + "".join(stage_notes(info, "split"))
              + " never straddle train and test. Load with `datasets.load_dataset(\"parquet\", data_dir=\"data\")` or "
              "`load_dataset(\"<this folder>\")`.", "", "## How it was made", ""]
    for row in info.get("funnel") or []:
        rej = ", ".join(f"{k} {n:,}" for k, n in (row.get("rejects") or {}).items()) or "none"
        lines.append(f"- **{row['stage']}**: {row.get('rows_in', 0):,} in -> {row.get('rows_out', 0):,} out "
                     f"(rejects: {rej})")
    lines.append("")
    for name, s in (info.get("stages") or {}).items():
        what = s.get("model") or s.get("why") or ""
        if s.get("calibration"):
            what += f"; calibration: {'**uncalibrated**' if s['calibration'] == 'uncalibrated' else s['calibration']}"
        lines.append(f"- stage `{name}`: {s.get('status')}" + (f" ({what})" if what else ""))
    lines += ["", "Every rejected record is in `rejects/` with its stage and reason; `config.yaml` holds the "
              "settings that produced the release, `release.json` the versions and model identities.",
              "", "## Fields", "", "| column | meaning |", "|---|---|"]
    notes = field_notes()
    lines += [f"| `{c}` | {notes.get(c, '')} |" for c in columns]
    lines += rights_lines((report.get("figures") or {}).get("rights"))
    lines += [
        "", "## Licence and ethics", "",
        "- The images keep the rights of their sources; this release does not relicense them. Check each "
        "source's terms (see `license`, `source_url`, `source`) before redistribution or training.",
        "- Annotations are generic facial attributes (hair, expression, accessories...) and captions built "
        "from them. No identities, names or biometric templates are annotated or released."
        + "".join(stage_notes(info, "ethics")),
        "- Attribute predictions are model outputs and can be wrong or biased across demographic groups; "
        "do not use them to make decisions about people.",
        "- Remove any sample on request of the person shown or the rights holder; faces of one source image "
        "share `image_id`, which makes removal by source possible.",
        "",
    ]
    storage.write_bytes_atomic(os.path.join(release_dir, "README.md"), "\n".join(lines).encode())
