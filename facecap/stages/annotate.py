"""Annotate: 40 CelebA attribute probabilities per face; keep the confident labels and the faces with enough.

For each face crop the attribute model gives 40 probabilities (CelebA order).
An attribute is kept when its probability is above ``keep_threshold`` and
confidently absent below ``absent_threshold`` (negative evidence the caption
grammar uses: "no beard"). Kept attributes that contradict each other
(facecap.attributes.CONTRADICTIONS) are resolved in favour of the more
probable side, and the rule is recorded. A face with fewer than
``min_attributes`` kept labels is rejected as ``few_attributes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from facecap.attributes import ATTRIBUTES, CONTRADICTIONS, INDEX
from facecap.config import AttributeSettings, ImageLimits
from facecap.schema import ATTRIBUTE_FIELDS, FACE_SCHEMA, Reason, extend_schema
from facecap.stages.base import Chunk, Counters, rejected
from facecap.stages.images import decode_rgb

ANNOTATED_SCHEMA = extend_schema(FACE_SCHEMA, ATTRIBUTE_FIELDS)


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
    """Face records in, annotated face records and rejects out, ``settings.batch_size`` faces per model call."""
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for start in range(0, table.num_rows, settings.batch_size):
            yield _annotate_group(table.slice(start, settings.batch_size), model, settings, limits, counters)


def _reject(row: dict, reason: str, detail: str) -> dict:
    return {"stage": "annotate", "reason": reason, "detail": detail, "image_id": row["image_id"],
            "sample_id": row["sample_id"], "source": row["source"], "source_offset": row["source_offset"],
            "det_score": row["det_score"], "bbox": row["bbox"]}


def _annotate_group(group: pa.Table, model, settings: AttributeSettings, limits: ImageLimits,
                    counters: Counters) -> Chunk:
    counters.rows_in += group.num_rows
    meta = group.select(["image_id", "sample_id", "source", "source_offset", "det_score", "bbox"]).to_pylist()
    images, decoded_rows, rejects = [], [], []
    for i, data in enumerate(group.column("image").to_pylist()):
        rgb, p = decode_rgb(data, limits)
        if rgb is None:  # crops come from detect, so this means a damaged shard; record it, do not crash
            rejects.append(_reject(meta[i], p.reason, f"face crop: {p.detail}"))
        else:
            images.append(rgb)
            decoded_rows.append(i)
    keep_rows, columns = [], {f.name: [] for f in ATTRIBUTE_FIELDS}
    if images:
        probs = np.asarray(model.predict(images), dtype=np.float32)
        if probs.shape != (len(images), len(ATTRIBUTES)):
            raise RuntimeError(f"attribute model {model.identity} returned shape {probs.shape}, "
                               f"expected ({len(images)}, {len(ATTRIBUTES)})")
        for row, p in zip(decoded_rows, probs):
            result = resolve_attributes(p, settings.keep_threshold, settings.absent_threshold)
            for rule in result.rules:
                counters.extra[f"rule:{rule}"] += 1
            if len(result.kept) < settings.min_attributes:
                shown = ", ".join(result.kept) or "none"
                rejects.append(_reject(meta[row], Reason.FEW_ATTRIBUTES,
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
        base = group.take(pa.array(keep_rows, pa.int64()))
        arrays = {f.name: pa.array(columns[f.name], f.type) for f in ATTRIBUTE_FIELDS}
        kept = pa.table({name: (arrays[name] if name in arrays else base.column(name))
                         for name in ANNOTATED_SCHEMA.names}, schema=ANNOTATED_SCHEMA)
    chunk = Chunk(kept=kept, rejected=rejected(rejects))
    counters.rows_out += len(keep_rows)
    counters.add_rejects(chunk.rejected)
    return chunk
