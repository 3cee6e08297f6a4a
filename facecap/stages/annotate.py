"""Annotate: 40 CelebA attribute probabilities per face; keep the confident labels and the faces with enough.

For each face crop the attribute model gives 40 probabilities (CelebA order).
An attribute is kept when its probability is above ``keep_threshold`` and
confidently absent below ``absent_threshold`` (negative evidence the caption
grammar uses: "no beard"). Kept attributes that contradict each other
(facecap.attributes.CONTRADICTIONS) are resolved in favour of the more
probable side, and the rule is recorded. A face with fewer than
``min_attributes`` kept labels is rejected as ``few_attributes``.

With ``attributes.backend=farl`` the model does not see the margin crop: the
stage reads the source image again with the face's 5 landmarks, and FaRL warps
the face onto its own template (as facer does). A source that is gone or
changed, or does not decode, is a reject with its reason, as in detect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa

from facecap.attributes import ATTRIBUTES, CONTRADICTIONS, INDEX
from pydantic import Field

from facecap.settings import ImageLimits, Section
from facecap.records import SOURCE_IMAGE, SOURCE_PROBLEM
from facecap.schema import Reason, keyed_schema
from facecap.sources.images import decode_rgb
from facecap.stages.base import (FACE_REJECT_COLUMNS, Chunk, Counters, ReportSection, Stage, StagePlan, reject_row,
                                 rejected)


# attributes.backend when unset: full annotates with FaRL; offline keeps zero-shot (off unless a local model is set).
ATTRIBUTE_BACKEND_DEFAULTS: dict[str, str] = {"full": "farl", "offline": "zero-shot"}


class AttributeTrainSettings(Section):
    """`facecap train-attributes`: fine-tune the classifier backend on CelebA-format data."""

    init: str | None = Field(
        None, description="Start from this image backbone: a local directory (save_pretrained, safetensors) or a hub "
                          "id (full profile), e.g. google/vit-base-patch16-224-in21k; its head is replaced by a "
                          "40-way one. Unset: random init of `arch` (only sensible for tests and smoke runs).")
    arch: Literal["vit-base", "vit-tiny"] = Field(
        "vit-base", description="Architecture when init is unset: vit-base = ViT-B/16 at 224 px; vit-tiny = 2 layers, "
                                "32 hidden, 32 px (tests).")
    image_size: int | None = Field(None, ge=16, description="Input side in pixels; unset: the backbone's own.")
    epochs: int = Field(3, ge=1, description="Passes over the train split (when max_steps is unset).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps in total.")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0, description="Peak AdamW learning rate (after warm-up, then cosine decay to 0).")
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps (capped at a tenth of the run).")
    augment: bool = Field(True, description="Random horizontal flips of train images (CelebA labels are flip-invariant).")
    held_out_fraction: float = Field(
        0.1, gt=0, lt=1, description="Parquet data without a split column: share of images (by content hash) held out "
                                     "for calibration and metrics. The official layout uses list_eval_partition.txt.")
    seed: int = Field(0, description="Seeds init, data order and augmentation: the same seed reproduces a run.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images.")
    checkpoint_every: int = Field(1000, ge=1, description="Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    log_every: int = Field(50, ge=1, description="Progress line every this many steps.")
    eval_batch_size: int = Field(128, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: cuda if torch sees one.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (unset: torch's default, all cores).")


class AttributeSettings(Section):
    """The annotate stage: 40 CelebA attributes per face (and `train` for `facecap train-attributes`)."""

    backend: Literal["farl", "zero-shot", "classifier"] | None = Field(
        None, description="farl: facer's FaRL ViT-B/16 CelebA-40 classifier (one .pt file, faces aligned by their 5 "
                          "landmarks); zero-shot: a CLIP-style model scores prompt pairs; classifier: a 40-way sigmoid "
                          "head. Unset: the profile's default (full: farl; offline: zero-shot)."
    )
    model: str | None = Field(
        None, description="The attribute model: for farl a local .pt file (unset: models.cache_dir/"
                          "face_attribute.farl.celeba.pt, filled by `facecap models fetch`); otherwise a local "
                          "directory or hub id (unset: full: a public CLIP ViT-B/16 from the hub). Offline, the "
                          "stage is off unless this names a local model."
    )
    weights_sha256: str | None = Field(
        None, description="Pin the FaRL weights: the sha256 printed on first download. A file with another hash "
                          "stops the run before any work."
    )
    keep_threshold: float = Field(0.85, ge=0, le=1, description="An attribute is kept above this probability.")
    absent_threshold: float = Field(0.15, ge=0, le=1, description="An attribute is confidently absent below this.")
    min_attributes: int = Field(6, ge=0, le=40, description="Keep a face only with at least this many kept labels.")
    batch_size: int = Field(32, ge=1, description="Faces per model call.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="cuda annotates the task GPU=1.")
    threads: int | None = Field(
        None, ge=1, description="torch threads per worker process (unset: the cores shared among local workers).")
    train: AttributeTrainSettings = Field(default_factory=AttributeTrainSettings)


class AnnotateReason(Reason):
    FEW_ATTRIBUTES = "few_attributes"


# Columns the annotate stage adds. Probabilities are in CelebA order
# (facecap.attributes.ATTRIBUTES); the name lists follow that order too.
ATTRIBUTE_FIELDS: list[pa.Field] = [
    pa.field("attribute_probs", pa.list_(pa.float32(), 40), nullable=False),
    pa.field("attributes", pa.list_(pa.string()), nullable=False),  # kept: prob > keep threshold, after rules
    pa.field("absent_attributes", pa.list_(pa.string()), nullable=False),  # prob < absent threshold
    pa.field("attribute_rules", pa.list_(pa.string()), nullable=False),  # contradiction rules that fired
    pa.field("attribute_model", pa.string(), nullable=False),  # backend:identity incl. weights hash
    pa.field("attr_keep_threshold", pa.float32(), nullable=False),
    pa.field("attr_absent_threshold", pa.float32(), nullable=False),
]

ANNOTATED_SCHEMA = keyed_schema(ATTRIBUTE_FIELDS)  # what annotate writes: sample_id + attribute columns


@dataclass(frozen=True)
class FaceAttributes:
    kept: list[str]  # CelebA order, after contradiction rules
    absent: list[str]  # CelebA order
    rules: list[str]  # names of the contradiction rules that fired, in table order


def resolve_attributes(probs: np.ndarray, keep_threshold: float, absent_threshold: float) -> FaceAttributes:
    """One face's kept and absent attributes from its 40 probabilities, contradictions resolved.

    For each rule in table order: when kept attributes sit on both sides, the
    side holding the single most probable attribute wins and the other side's
    kept attributes are dropped (they are not marked absent: the model did not
    say they were). Rules see the result of the rules before them.
    """
    kept = {name for name, p in zip(ATTRIBUTES, probs) if p > keep_threshold}
    fired = []
    for rule in CONTRADICTIONS:
        left = [a for a in rule.left if a in kept]
        right = [a for a in rule.right if a in kept]
        if not left or not right:
            continue
        best_left = max(probs[INDEX[a]] for a in left)
        best_right = max(probs[INDEX[a]] for a in right)
        # Ties go to the left side: deterministic, and the table lists the narrower claim there.
        kept.difference_update(right if best_left >= best_right else left)
        fired.append(rule.name)
    return FaceAttributes(
        kept=[a for a in ATTRIBUTES if a in kept],
        absent=[name for name, p in zip(ATTRIBUTES, probs) if p < absent_threshold],
        rules=fired,
    )


def annotate_faces(batches: Iterable[pa.RecordBatch | pa.Table], model, settings: AttributeSettings,
                   limits: ImageLimits, counters: Counters) -> Iterator[Chunk]:
    """Face records in, annotated face records and rejects out, ``settings.batch_size`` faces per model call.

    Records hold either the face crop (``image``) or, for a model that aligns faces
    itself (farl), the source image and ``landmarks``.
    """
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for start in range(0, table.num_rows, settings.batch_size):
            yield _annotate_group(table.slice(start, settings.batch_size), model, settings, limits, counters)


def _reject(row: dict, reason: str, detail: str) -> dict:
    return reject_row("annotate", row, reason, detail)


def _crops(group: pa.Table, meta: list[dict], limits: ImageLimits, rejects: list[dict]) -> tuple[list, list[int]]:
    images, rows = [], []
    for i, data in enumerate(group.column("image").to_pylist()):
        rgb, p = decode_rgb(data, limits)
        if rgb is None:  # crops come from detect, so this means a damaged shard; record it, do not crash
            rejects.append(_reject(meta[i], p.reason, f"face crop: {p.detail}"))
        else:
            images.append(rgb)
            rows.append(i)
    return images, rows


# Decoded source pixels held for one model call (about 200 MB of RGB); more go to the next call.
SOURCE_PIXEL_BUDGET = 64_000_000


def _source_faces(group: pa.Table, meta: list[dict], limits: ImageLimits,
                  rejects: list[dict]) -> Iterator[tuple[list, list[int]]]:
    """Chunks of (source RGB, 5 landmarks) per face, with their rows; faces of one image (adjacent rows)
    share one decode, and a chunk holds at most SOURCE_PIXEL_BUDGET decoded pixels (or one image)."""
    faces, rows, held = [], [], 0
    last_id, last_rgb, last_problem = None, None, None
    blobs, problems = group.column(SOURCE_IMAGE).to_pylist(), group.column(SOURCE_PROBLEM).to_pylist()
    for i, (blob, problem, points) in enumerate(zip(blobs, problems, group.column("landmarks").to_pylist())):
        if meta[i]["image_id"] != last_id:
            last_id, last_rgb, last_problem = meta[i]["image_id"], None, None
            if problem:
                last_problem = (Reason.SOURCE_CHANGED, problem)
            else:
                last_rgb, p = decode_rgb(blob, limits)
                if last_rgb is None:
                    last_problem = (p.reason, f"source image: {p.detail}")
                elif faces and held + p.width * p.height > SOURCE_PIXEL_BUDGET:
                    yield faces, rows
                    faces, rows, held = [], [], 0
                if last_rgb is not None:
                    held += p.width * p.height
        if last_rgb is None:
            rejects.append(_reject(meta[i], *last_problem))
            continue
        landmarks = np.asarray(points if points is not None else [], np.float64)
        if landmarks.size != 10 or not np.isfinite(landmarks).all():
            # detect always records 5 points, so this means a damaged shard; record it, do not crash
            rejects.append(_reject(meta[i], Reason.DECODE_ERROR, f"landmarks unusable for alignment: {points}"))
            continue
        faces.append((last_rgb, landmarks.reshape(5, 2)))
        rows.append(i)
    if faces:
        yield faces, rows


def _annotate_group(group: pa.Table, model, settings: AttributeSettings, limits: ImageLimits,
                    counters: Counters) -> Chunk:
    counters.rows_in += group.num_rows
    meta = group.select(list(FACE_REJECT_COLUMNS)).to_pylist()
    rejects: list[dict] = []
    if SOURCE_IMAGE in group.column_names:
        chunks = _source_faces(group, meta, limits, rejects)
    else:
        chunks = [_crops(group, meta, limits, rejects)]
    decoded_rows, parts = [], []
    for images, rows in chunks:
        if not images:
            continue
        probs = np.asarray(model.predict(images), dtype=np.float32)
        if probs.shape != (len(images), len(ATTRIBUTES)):
            raise RuntimeError(f"attribute model {model.identity} returned shape {probs.shape}, "
                               f"expected ({len(images)}, {len(ATTRIBUTES)})")
        del images  # decoded source images can be large: drop them before decoding the next chunk
        decoded_rows += rows
        parts.append(probs)
    keep_rows, columns = [], {f.name: [] for f in ATTRIBUTE_FIELDS}
    if parts:
        probs = np.concatenate(parts)
        for row, p in zip(decoded_rows, probs):
            result = resolve_attributes(p, settings.keep_threshold, settings.absent_threshold)
            for rule in result.rules:
                counters.extra[f"rule:{rule}"] += 1
            if len(result.kept) < settings.min_attributes:
                shown = ", ".join(result.kept) or "none"
                rejects.append(_reject(meta[row], AnnotateReason.FEW_ATTRIBUTES,
                                       f"{len(result.kept)} attribute(s) above keep_threshold="
                                       f"{settings.keep_threshold} ({shown}) < attributes.min_attributes="
                                       f"{settings.min_attributes}"))
                continue
            keep_rows.append(row)
            counters.extra["attributes_kept"] += len(result.kept)
            columns["attribute_probs"].append(p.tolist())
            columns["attributes"].append(result.kept)
            columns["absent_attributes"].append(result.absent)
            columns["attribute_rules"].append(result.rules)
            columns["attribute_model"].append(model.identity)
            columns["attr_keep_threshold"].append(settings.keep_threshold)
            columns["attr_absent_threshold"].append(settings.absent_threshold)
    kept = None
    if keep_rows:
        ids = group.column("sample_id").take(pa.array(keep_rows, pa.int64()))
        kept = pa.table([ids] + [pa.array(columns[f.name], f.type) for f in ATTRIBUTE_FIELDS],
                        schema=ANNOTATED_SCHEMA)
    return counters.count(Chunk(kept=kept, rejected=rejected(rejects)))


def _attribute_threads(cfg) -> int | None:
    if cfg.attributes.threads or cfg.execution.dask_address:
        return cfg.attributes.threads
    # Local workers share the machine's cores instead of each taking all of them.
    cores = os.cpu_count() or 1
    return max(1, cores // (cfg.execution.n_workers or cores))


class Annotate(Stage):
    """Face crops in, 40 CelebA attribute probabilities and the kept labels out."""

    name = "annotate"
    section, settings_model, section_after = "attributes", AttributeSettings, "models"
    output_fields, reasons = tuple(ATTRIBUTE_FIELDS), AnnotateReason
    own_scan = ("attributes", "attribute_probs")
    column_docs = {
        "attribute_probs": "40 CelebA attribute probabilities, CelebA order",
        "attributes": "kept attributes (probability above the keep threshold, after contradiction rules)",
    }
    version = "2"
    reads = FACE_REJECT_COLUMNS + ("image",)
    # farl aligns faces itself: it reads the source image again (as detect does) and the landmarks.
    farl_reads = FACE_REJECT_COLUMNS + (SOURCE_IMAGE, SOURCE_PROBLEM, "landmarks")
    keyed_sections = ("attributes", "image")
    # The model is in the key through its identity; device, threads, batch size and training do not change outputs.
    unkeyed = frozenset({"attributes.model", "attributes.device", "attributes.threads", "attributes.batch_size",
                         "attributes.train", "attributes.weights_sha256"})
    priority = 2
    device_section = "attributes"

    def __init__(self, cfg, plan: StagePlan | None = None, out: str | None = None):
        super().__init__(cfg, plan, out)
        if cfg.attributes.backend == "farl":
            self.reads = self.farl_reads
            self.batch_rows = 16  # decoded source images in flight, as in detect: bounds memory on large photos

    suite = "attributes"

    @classmethod
    def quality_checks(cls, cfg) -> list:
        from facecap.quality.primitives import Check

        a = cfg.attributes
        keep = a.keep_threshold
        names = "[" + ", ".join(f"'{name}'" for name in ATTRIBUTES) + "]"
        return [
            Check("min_kept_attributes", "attributes",
                  f"at least attributes.min_attributes ({a.min_attributes}) kept attributes",
                  f"count(*) FILTER (attributes IS NULL OR len(attributes) < {a.min_attributes})", ("attributes",)),
            Check("attribute_probs_valid", "attributes", "attribute_probs has 40 values within [0, 1]",
                  "count(*) FILTER (attribute_probs IS NULL OR len(attribute_probs) != 40 "
                  "OR list_min(attribute_probs) < 0 OR list_max(attribute_probs) > 1 "
                  "OR list_max(attribute_probs) IS NULL)", ("attribute_probs",)),
            Check("kept_attributes_match_probs", "attributes",
                  f"every kept attribute is a CelebA name whose probability > attributes.keep_threshold ({keep})",
                  f"count(*) FILTER (len(attributes) > 0 AND coalesce(list_min(list_transform(attributes, "
                  f"lambda n: coalesce(attribute_probs[list_position({names}, n)], -1))) <= CAST({keep} AS FLOAT), "
                  f"true))", ("attributes", "attribute_probs")),
        ]

    @classmethod
    def card_notes(cls, info: dict) -> dict[str, str]:
        # The plan says when the probabilities are uncalibrated; the card and the report then warn.
        s = (info.get("stages") or {}).get(cls.name) or {}
        if s.get("status") != "on" or s.get("calibration") != "uncalibrated":
            return {}
        return {"warning": (
            f"UNCALIBRATED attribute probabilities: the annotate model ({s.get('model') or s.get('backend')}) is a "
            "zero-shot CLIP without a fitted calibration, so `attribute_probs` are CLIP's own two-way softmax "
            "scores (near 0 or 1), not probabilities, and the keep threshold "
            f"({s.get('keep_threshold', 'attributes.keep_threshold')}) keeps guesses. Fit a calibration with "
            "`facecap calibrate-attributes` and re-curate, or use the farl backend.")}

    @classmethod
    def resolve_settings(cls, cfg) -> None:
        # Resolved when the config is built, so every reader of attributes.backend (and the written
        # config.yaml) sees the backend the run uses.
        if cfg.attributes.backend is None:
            cfg.attributes.backend = ATTRIBUTE_BACKEND_DEFAULTS[cfg.profile]

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        from facecap.models.attributes import configured_model, has_local_model, plan_attribute_model

        ref = configured_model(cfg)
        if cfg.profile == "offline" and not has_local_model(cfg):
            # The one switch that runs without attributes: offline, with no local model given.
            farl = cfg.attributes.backend == "farl"
            return StagePlan(False, why=(
                "offline profile: no local attribute model configured (attributes.model); set it to a model "
                "directory (e.g. one written by `facecap train-attributes`), or with attributes.backend=farl to "
                "facer's face_attribute.farl.celeba.pt, to annotate the 40 CelebA attributes"
                + (f"; {ref!r} is not a local {'file' if farl else 'directory'}" if ref else "")))
        # Resolving (and in the full profile fetching) the model here fails the run before any work.
        a = cfg.attributes
        identity, calibration = plan_attribute_model(cfg)
        return StagePlan(True, identity, info={
            "backend": a.backend, "model_ref": ref, "calibration": calibration, "keep_threshold": a.keep_threshold,
            "absent_threshold": a.absent_threshold, "min_attributes": a.min_attributes})

    def load(self) -> None:
        from facecap.models.attributes import load_attribute_model

        self.model = load_attribute_model(self.cfg, _attribute_threads(self.cfg), expect=self.stage_plan.model)
        self.check_loaded("attribute model", self.model.identity)

    def schema(self) -> pa.Schema:
        return ANNOTATED_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return annotate_faces(records, self.model, self.cfg.attributes, self.cfg.image, counters)


# --- report ----------------------------------------------------------------------------------------
class AnnotateReport(ReportSection):
    """Kept attributes per face, attribute frequency and category shares (vs FaceCaption-15M)."""

    def aggregates(self, db) -> tuple[dict[str, str], dict[str, str]]:
        return ({"per_face": "histogram(len(attributes))"} if "attributes" in db.columns else {}), {}

    def figures(self, db, agg) -> dict:
        from facecap.attributes import CATEGORY_OF, PAPER_CATEGORY_SHARES
        from facecap.quality.primitives import NOT_APPLICABLE

        rows = int(agg.get("n_rows") or 0)
        if not (rows and "per_face" in agg):
            off = db.stage_off_reason(Annotate.name)
            return {"attributes": {NOT_APPLICABLE: f"stage annotate off ({off})" if off else "no attributes column"}}
        per_face = {int(k): int(v) for k, v in (agg["per_face"] or {}).items() if k is not None}
        freq = dict(db.con.execute("SELECT a, count(*) FROM (SELECT unnest(attributes) AS a FROM faces) GROUP BY a")
                    .fetchall())
        kept = sum(freq.values()) or 1
        shares = {cat: 0 for cat in PAPER_CATEGORY_SHARES}
        for name, n in freq.items():
            if name in CATEGORY_OF:
                shares[CATEGORY_OF[name]] += n
        return {"attributes": {
            "mean_per_face": round(sum(k * v for k, v in per_face.items()) / rows, 2),
            "per_face": {str(k): v for k, v in sorted(per_face.items())},
            "frequency": {name: int(freq.get(name, 0)) for name in ATTRIBUTES},
            "category_share_pct": {cat: round(100 * n / kept, 1) for cat, n in shares.items()},
            "paper_category_share_pct": PAPER_CATEGORY_SHARES,
        }}

    def headline(self, fig) -> dict:
        from facecap.quality.primitives import NOT_APPLICABLE

        a = fig.get("attributes") or {}
        return {} if not a or NOT_APPLICABLE in a else {"kept attributes per face": a["mean_per_face"]}

    def html(self, report) -> str:
        from html import escape

        from facecap.quality import svg
        from facecap.quality.primitives import NOT_APPLICABLE

        a = report["figures"]["attributes"]
        if NOT_APPLICABLE in a:
            return f'<p class="na">Attributes: not applicable: {escape(a[NOT_APPLICABLE])}</p>'
        per = a["per_face"]
        cats = list(a["category_share_pct"])
        return (svg.bars(list(per), list(per.values()), f"kept attributes per face (mean {a['mean_per_face']})")
                + svg.bars(list(a["frequency"]), list(a["frequency"].values()), "attribute frequency (faces)")
                + svg.bars(cats, [a["category_share_pct"][k] for k in cats],
                           "category share of kept labels, % (red tick: FaceCaption-15M)",
                           reference=[a["paper_category_share_pct"][k] for k in cats], unit="%"))

    def gallery_columns(self, db) -> dict[str, str]:
        return {"attributes": "attributes"} if "attributes" in db.columns else {}

    def gallery_html(self, face) -> str:
        from html import escape

        return f"<br><i>{escape(', '.join(face['attributes']))}</i>" if face.get("attributes") else ""


Annotate.report = AnnotateReport()
