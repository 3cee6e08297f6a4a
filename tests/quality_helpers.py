"""A synthetic release with every column (faces + attributes + captions), built through release.assemble.

The face crops are real JPEGs cut from the astronaut photo at varied boxes
and sizes, hashed as the dedup stage hashes them (near-duplicates all, kept
with dedup.keep=all); attribute probabilities and captions are generated (seeded) so
that a clean release passes every check, and `DEFECTS` breaks exactly one.
The attribute "model" here is a name only: no model produced these values.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import offline_config

from facecap import release
from facecap.attributes import ATTRIBUTES
from facecap.config import Config
from facecap.example_data import astronaut
from facecap.shards import OutputRef, ShardInput
from facecap.schema import IMAGE_SCHEMA, extend_schema, image_id_for, sample_id_for
from facecap.stages.annotate import ATTRIBUTE_FIELDS
from facecap.stages.caption import CAPTION_FIELDS
from facecap.stages.detect import FACE_SCHEMA
from facecap.stages.face_quality import QUALITY_FIELDS, measure_face
from facecap.sources.spec import ShardSpec
from facecap.stages.dedup import DEDUP_SCHEMA, NearDuplicates, face_hashes, grey_thumbnail

# A release record: detect's face columns, then its source image's, attributes and captions.
_SOURCE_FIELDS = [f for f in IMAGE_SCHEMA if f.name != "source_image"]
FULL_SCHEMA = extend_schema(extend_schema(extend_schema(extend_schema(extend_schema(
    FACE_SCHEMA, _SOURCE_FIELDS), QUALITY_FIELDS), list(DEDUP_SCHEMA)[1:]), ATTRIBUTE_FIELDS), CAPTION_FIELDS)
KEEP = 0.85


def _face_rows(n_images: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    photo = astronaut()
    rows = []
    for i in range(n_images):
        source_offset = f"img{i:04d}.jpg"
        image_id = image_id_for("/synthetic/folder", source_offset)
        for face in range(1 + (i % 3 == 0)):  # every third image holds two faces
            side = rng.randint(140, 220)
            x1, y1 = rng.uniform(150, 200), rng.uniform(40, 80)
            x2, y2 = x1 + rng.uniform(80, 110), y1 + rng.uniform(100, 125)
            crop = photo.crop((int(x1) - 30, int(y1) - 30, int(x2) + 30, int(y2) + 30)).resize((side, side))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=85)
            phash, phash_mirror = (int(h[0]) for h in face_hashes(grey_thumbnail(np.asarray(crop))[None]))
            probs = [rng.uniform(0.0, 0.8) for _ in ATTRIBUTES]
            for k in rng.sample(range(40), rng.randint(6, 10)):
                probs[k] = rng.uniform(0.9, 0.999)
            kept = [name for name, p in zip(ATTRIBUTES, probs) if p > KEEP]
            words = [name.lower().replace("_", " ") for name in kept]
            caption = (f"A portrait of a person with {', '.join(words[:-1])} and {words[-1]}, "
                       f"photographed in {rng.choice(['soft', 'warm', 'cool', 'bright'])} light.")
            lx = [x1 + (x2 - x1) * f for f in (0.3, 0.7, 0.5, 0.35, 0.65)]
            ly = [y1 + (y2 - y1) * f for f in (0.4, 0.4, 0.6, 0.8, 0.8)]
            rows.append({
                "sample_id": sample_id_for(image_id, face), "image_id": image_id, "face_index": face,
                "image": buf.getvalue(), "width": side, "height": side, "phash": phash, "phash_mirror": phash_mirror,
                "det_score": rng.uniform(0.985, 0.9999), "bbox": [x1, y1, x2, y2],
                "landmarks": [v for pair in zip(lx, ly) for v in pair],
                "crop_box": [x1 - 30, y1 - 30, x2 + 30, y2 + 30], "align_angle": rng.uniform(-10, 10),
                "pad_fraction": 0.0 if i % 5 else rng.uniform(0.01, 0.2),
                "detector": "retinaface-mobilenet0.25@sha256:synthetic", "det_min_score": 0.98, "min_face_px": 128,
                "crop_margin": 0.2, "source": "/synthetic/folder", "source_offset": source_offset,
                "source_caption": f"photo {i}", "source_meta": None, "source_width": 512, "source_height": 512,
                "source_format": "JPEG", "source_size": 40_000, "source_fingerprint": f"synthetic-{i}",
                "attribute_probs": probs, "attributes": kept,
                "absent_attributes": [name for name, p in zip(ATTRIBUTES, probs) if p < 0.15],
                "attribute_rules": [], "attribute_model": "synthetic:not-a-model", "attr_keep_threshold": KEEP,
                "attr_absent_threshold": 0.15,
                "caption": caption, "raw_caption": caption, "grammar_version": "synthetic", "caption_seed": i,
                "caption_model": "none" if i % 4 == 0 else "qwen-test", "prompt_version": "v1",
                "caption_check": ("not_rewritten" if i % 4 == 0
                                  else f"omission: {kept[0] if kept else 'Smiling'} (3 attempts)" if i % 8 == 1
                                  else "passed"),
            })
            rows[-1].update(measure_face(np.asarray(crop.convert("RGB")), rows[-1]))
    return rows


def _defect(rows: list[dict], name: str | None) -> None:
    """Break one thing the suites must catch."""
    if name == "duplicate_id":
        rows[1]["sample_id"] = rows[0]["sample_id"]
    elif name == "low_score":
        rows[2]["det_score"] = 0.6
    elif name == "short_crop":
        rows[3]["width"] = 64
    elif name == "bad_probs":
        rows[4]["attribute_probs"] = [1.5] + rows[4]["attribute_probs"][1:]
    elif name == "empty_caption":
        rows[5]["caption"] = "   "
    elif name == "html_caption":
        rows[6]["caption"] = "A <b>smiling</b> woman with black hair &amp; earrings in a portrait photo"
    elif name == "padded_crops":  # a crop more padded than detect's per-face rule lets through: a bug
        rows[7]["pad_fraction"] = 0.45
    elif name == "duplicate_image":  # one crop's bytes twice (no check fails: dedup's to remove, per face)
        rows[10]["image"] = rows[9]["image"]
    elif name == "duplicate_caption":  # one caption twice (no check fails: a share that is a policy)
        rows[12]["caption"] = rows[11]["caption"]
    elif name == "blurry_kept":  # a face the too_blurry rule should have rejected
        rows[8]["sharpness"] = 3.0
    elif name is not None and name not in ("funnel_mismatch",):
        raise ValueError(name)


# defect -> the check that must fail
DEFECTS = {
    "duplicate_id": "sample_id_unique",
    "low_score": "det_score_at_least_threshold",
    "short_crop": "crop_at_least_min_px",
    "padded_crops": "pad_fraction_within_rule",
    "blurry_kept": "no_too_blurry_kept",
    "bad_probs": "attribute_probs_valid",
    "empty_caption": "caption_not_empty",
    "html_caption": "caption_no_html",
    "funnel_mismatch": "rows_match_funnel",
}


def synthetic_config() -> Config:
    return offline_config(quality={"gallery_size": 4, "ngram_sample": 200})


def write_synthetic_release(out: Path, n_images: int = 30, defect: str | None = None, seed: int = 0,
                            cfg: Config | None = None, annotate: dict | None = None,
                            pad_fraction: float | None = None) -> Path:
    """Stage a release under OUT/staging/<run id> from one synthetic stage shard; return its folder.

    `pad_fraction` sets every face's padding (as if every photo were an edge crop).

    `annotate` replaces the annotate stage's plan entry in release.json (e.g. a real plan's summary).
    """
    cfg = cfg or synthetic_config()
    rows = _face_rows(n_images, seed)
    if pad_fraction is not None:
        for row in rows:
            row["pad_fraction"] = pad_fraction
    _defect(rows, defect)
    shard = out / "shards" / "caption" / "synthetic.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FULL_SCHEMA), shard)
    n = len(rows)
    funnel = [{"stage": "ingest", "rows_in": n_images, "rows_out": n_images, "rejects": {}},
              {"stage": "detect", "rows_in": n_images, "rows_out": n, "rejects": {}},
              {"stage": "face_quality", "rows_in": n, "rows_out": n, "rejects": {}},
              {"stage": "annotate", "rows_in": n, "rows_out": n, "rejects": {}},
              {"stage": "caption", "rows_in": n, "rows_out": n + (defect == "funnel_mismatch"), "rejects": {},
               "extra": {"omitted_attributes": 7, "hallucinated_attributes": 2, "llm_cache_hits": 5}}]
    detector = "retinaface-mobilenet0.25@sha256:synthetic"
    stages = {"ingest": {"status": "on"}, "detect": {"status": "on", "model": detector},
              "face_quality": {"status": "on"}, "dedup": {"status": "on"},
              "annotate": annotate or {"status": "on", "model": "synthetic:not-a-model"},
              "caption": {"status": "on", "model": "synthetic"}}
    # One output holding every column, as a release reads a joined chain.
    output = OutputRef("caption", "synthetic", str(shard), "sample_id", tuple(FULL_SCHEMA.names), n)
    staged, _ = release.assemble(str(out), f"synthetic-{defect or 'clean'}", [
        ShardInput(ShardSpec("folder", "/synthetic/folder"), (output,))], [], cfg,
        {"detector": detector, "stages": stages, "funnel": funnel, "sources": ["/synthetic/folder"]},
        passes=[NearDuplicates(cfg.dedup, cfg.quality.test_fraction)])
    return Path(staged)
