"""The text stage (FLIP-80M path): keep faces whose alt-text describes a face, with cleaned text.

Per face record, from its `source_caption` (the alt-text):
1. the deterministic pre-cleaner (facecap.text.clean); empty -> rejected `no_caption`
2. the face-caption classifier's score (facecap.text.text_filter); not above
   `text.threshold` -> rejected `not_face_caption`
3. optionally the LLM denoise (facecap.text.denoise) on the kept captions
4. face keywords found in the final text (facecap.text.keywords) -> `keywords`
The cleaned text is `text_caption`; with text.caption_path = flip80m it is
also the record's `caption`. Counts of characters in and removed go to the
shard's stats (extra: alt_text_chars, text_chars_removed), so a run reports
the share of characters removed. Plain generator: no Prefect, no Dask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa

from facecap.config import TextSettings
from facecap.schema import TEXT_CAPTION_FIELD, TEXT_FIELDS, Reason, extend_schema
from facecap.stages.base import Chunk, Counters, rejected
from facecap.text.clean import clean_text
from facecap.text.keywords import KeywordMatcher


def text_schema(input_schema: pa.Schema, settings: TextSettings) -> pa.Schema:
    fields = list(TEXT_FIELDS)
    if settings.caption_path == "flip80m":
        fields.append(TEXT_CAPTION_FIELD)
    return extend_schema(input_schema, fields)


@dataclass
class TextTools:
    """What the stage needs, loaded once per worker."""

    matcher: KeywordMatcher
    classifier: object  # facecap.text.text_filter.TextFilter
    cleaner: str  # identity of the cleaning: pre-cleaner version (+ LLM model and prompt version)
    denoise: Callable[[list[str]], list] | None = None  # texts -> [Denoised]


def filter_captions(batches: Iterator[pa.RecordBatch], tools: TextTools, settings: TextSettings, schema: pa.Schema,
                    counters: Counters) -> Iterator[Chunk]:
    """Score, filter and clean each batch of face records."""
    for batch in batches:
        rows = batch.to_pylist()
        counters.rows_in += len(rows)
        cleaned = [clean_text(r.get("source_caption")) for r in rows]
        texts = sorted({c.text for c in cleaned if c.text})  # faces of one image share a caption: score it once
        scores = dict(zip(texts, tools.classifier.score(texts).tolist())) if texts else {}
        kept, kept_clean, rejects = [], [], []
        for row, c in zip(rows, cleaned):
            if not c.text:
                rejects.append(_reject(row, Reason.NO_CAPTION, "no alt-text left after cleaning"
                                       if row.get("source_caption") else "the source has no caption"))
                continue
            score = float(scores[c.text])
            if not score > settings.threshold:
                rejects.append(_reject(row, Reason.NOT_FACE_CAPTION,
                                       f"text score {score:.3f} <= text.threshold={settings.threshold}: {c.text[:200]}"))
                continue
            row["text_score"] = score
            kept.append(row)
            kept_clean.append(c)
        denoised = tools.denoise([c.text for c in kept_clean]) if tools.denoise and kept else None
        for i, (row, c) in enumerate(zip(kept, kept_clean)):
            text, method = (denoised[i].text, denoised[i].method) if denoised else (c.text, "rules")
            alt_chars = len(row.get("source_caption") or "")
            row.update({"text_caption": text, "keywords": tools.matcher.find(text),  # of the text released
                        "text_filter": tools.classifier.identity,
                        "text_threshold": settings.threshold, "text_denoise": method, "text_cleaner": tools.cleaner,
                        "alt_text_chars": alt_chars, "text_chars_removed": max(0, alt_chars - len(text))})
            row["url"], row["nsfw"] = _url_and_nsfw(row.get("source_meta"))
            if settings.caption_path == "flip80m":
                row["caption"] = text
            counters.extra["alt_text_chars"] += alt_chars
            counters.extra["text_chars_removed"] += row["text_chars_removed"]
            counters.extra["llm_denoised"] += method == "llm"
            counters.extra["with_keywords"] += bool(row["keywords"])
        counters.rows_out += len(kept)
        chunk = Chunk(kept=pa.Table.from_pylist(kept, schema=schema) if kept else None, rejected=rejected(rejects))
        counters.add_rejects(chunk.rejected)
        yield chunk


def _url_and_nsfw(meta: str | None) -> tuple[str | None, str | None]:
    """FLIP-80M releases carry url and NSFW tag; URL lists keep them in source_meta."""
    try:
        data = json.loads(meta) if meta else {}
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    nsfw = next((data[k] for k in ("NSFW", "nsfw", "punsafe") if data.get(k) is not None), None)
    url = data.get("url") or data.get("URL")
    return (str(url) if url else None), (str(nsfw) if nsfw is not None else None)


def _reject(row: dict, reason: str, detail: str) -> dict:
    return {"stage": "text", "reason": reason, "detail": detail, "image_id": row.get("image_id"),
            "sample_id": row.get("sample_id"), "source": row.get("source"), "source_offset": row.get("source_offset"),
            "det_score": row.get("det_score"), "bbox": row.get("bbox")}
