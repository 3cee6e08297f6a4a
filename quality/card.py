"""The dataset card: RELEASE/README.md, in the Hugging Face dataset-card layout (YAML header + Markdown)."""

from __future__ import annotations

import os
from typing import Any

from facecap import storage

FIELD_NOTES = {
    "sample_id": "unique face id: image_id + face index",
    "image_id": "stable id of the source image (hash of source + offset); its faces share a split",
    "image": "aligned face crop, JPEG, at source resolution; a datasets Image ({bytes, path}, path empty)",
    "width": "crop width, px", "height": "crop height, px",
    "det_score": "RetinaFace confidence",
    "bbox": "face box x1, y1, x2, y2 in source pixels",
    "landmarks": "eyes, nose, mouth corners: x, y pairs in source pixels",
    "crop_box": "square region cut from the source", "align_angle": "rotation that levelled the eyes, degrees",
    "detector": "detector identity (name + weights hash)",
    "source": "source container (folder, tar, Parquet file)", "source_offset": "place in the source",
    "source_caption": "the source's original caption (alt-text), without control characters (tab, newline, CR kept)",
    "source_caption_encoding": "encoding a non-UTF-8 caption was decoded from (null: UTF-8); encoding the caption "
                               "with it gives the original bytes",
    "source_caption_chars_removed": "control characters removed from the caption (null: no caption)",
    "attribute_probs": "40 CelebA attribute probabilities, CelebA order",
    "attributes": "kept attributes (probability above the keep threshold, after contradiction rules)",
    "caption": "the caption to train on", "raw_caption": "the grammar's text before any rewrite",
    "caption_check": "passed, not_rewritten, or why the rewrite fell back",
    "phash": "64-bit perceptual hash of the crop (imagehash.phash bits)", "phash_mirror": "pHash of the mirrored crop",
    "dedup_cluster": "sample_id of the face kept for this face's near-duplicate cluster; clusters never straddle "
                     "the split",
    "dedup_cluster_size": "faces in the near-duplicate cluster, this one included (before removal)",
}


def uncalibrated_warning(stages: dict | None) -> str | None:
    """What to say when the annotate stage's probabilities are uncalibrated (its plan says so); else None."""
    s = (stages or {}).get("annotate") or {}
    if s.get("status") != "on" or s.get("calibration") != "uncalibrated":
        return None
    return (f"UNCALIBRATED attribute probabilities: the annotate model ({s.get('model') or s.get('backend')}) is a "
            "zero-shot CLIP without a fitted calibration, so `attribute_probs` are CLIP's own two-way softmax "
            "scores (near 0 or 1), not probabilities, and the keep threshold "
            f"({s.get('keep_threshold', 'attributes.keep_threshold')}) keeps guesses. Fit a calibration with "
            "`facecap calibrate-attributes` and re-curate, or use the farl backend.")


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
    warning = uncalibrated_warning(info.get("stages"))
    if warning:
        lines[-3:-3] = ["", f"> **Warning: {warning}**"]  # right under the verdict, before the numbers
    lines += [f"- {k}: {val}" for k, val in (report.get("headline") or {}).items()]
    lines += ["", "## Counts", "", "| split | face records |", "|---|---|"]
    lines += [f"| {k} | {n:,} |" for k, n in splits.items()]
    split_by = info.get("split_by") or "image_id"
    lines += ["", f"Splits are assigned by {split_by}: faces of one source image"
              + (" or one near-duplicate cluster (`dedup_cluster`)" if "near-duplicate" in split_by else "")
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
    lines += [f"| `{c}` | {FIELD_NOTES.get(c, '')} |" for c in columns]
    lines += [
        "", "## Licence and ethics", "",
        "- The images keep the rights of their sources; this release does not relicense them. Check each "
        "source's terms (see `source`) before redistribution or training.",
        "- Annotations are generic facial attributes (hair, expression, accessories...) and captions built "
        "from them. No identities, names or biometric templates are annotated or released."
        + (" Face embeddings (FaceNet) grouped likely photos of one person so that they share a split; the "
           "embeddings, their hashes and the groups were used for the split only and are never released."
           if "identity" in split_by else ""),
        "- Attribute predictions are model outputs and can be wrong or biased across demographic groups; "
        "do not use them to make decisions about people.",
        "- Remove any sample on request of the person shown or the rights holder; faces of one source image "
        "share `image_id`, which makes removal by source possible.",
        "",
    ]
    storage.write_bytes_atomic(os.path.join(release_dir, "README.md"), "\n".join(lines).encode())
