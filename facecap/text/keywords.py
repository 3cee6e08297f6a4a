"""Face-description keywords: the editable list and a word-boundary matcher.

FLIP-80M recalled face-related captions with keywords (12 seeds expanded to
about 155); the list lives in facecap/data/face_keywords.txt (or
`text.keywords_file`). `KeywordMatcher.find` returns the keywords a caption
contains, in list order, each once: "smiling" matches "Smiling girl", "eye"
matches neither "eyesore" nor "eye-catching", and "eye shadow" also matches
"eye-shadow".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from facecap.data import data_file
from pathlib import Path

from facecap.settings import ConfigError


def default_keywords_path() -> Path:
    return data_file("face_keywords.txt")


def load_keywords(path: str | Path | None = None) -> list[str]:
    """Keywords from a file: one per line, `#` comments and blank lines ignored, duplicates dropped."""
    p = Path(path) if path else default_keywords_path()
    if not p.is_file():
        raise ConfigError(f"text.keywords_file: {p} does not exist (one keyword per line)")
    words: list[str] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        word = " ".join(line.split("#", 1)[0].lower().split())
        if word and word not in words:
            words.append(word)
    if not words:
        raise ConfigError(f"text.keywords_file: {p} holds no keywords")
    return words


@dataclass
class KeywordMatcher:
    keywords: list[str]

    def __post_init__(self) -> None:
        # Longest first, so "eye shadow" wins over "eye" where both start.
        ordered = sorted(self.keywords, key=len, reverse=True)
        alternatives = "|".join(r"[\s\-]+".join(re.escape(part) for part in k.split()) for k in ordered)
        # \b would split "make-up" and accept "eye" inside "eye-catching"; look at letters and digits instead.
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)
        self._canonical = {k: k for k in self.keywords}
        self._rank = {k: i for i, k in enumerate(self.keywords)}

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "KeywordMatcher":
        return cls(load_keywords(path))

    @property
    def identity(self) -> str:
        """Names the list's content (part of the text stage's key)."""
        return "keywords-" + hashlib.sha256("\n".join(self.keywords).encode()).hexdigest()[:12]

    def find(self, text: str | None) -> list[str]:
        if not text:
            return []
        found = {" ".join(re.split(r"[\s\-]+", m.group(0).lower())) for m in self._pattern.finditer(text)}
        hits = [self._canonical.get(f) or self._match_hyphenated(f) for f in found]
        return sorted({h for h in hits if h}, key=self._rank.__getitem__)

    def _match_hyphenated(self, found: str) -> str | None:
        # "make-up" is listed with its hyphen; the split above turned it into "make up".
        for k in self.keywords:
            if " ".join(re.split(r"[\s\-]+", k)) == found:
                return k
        return None
