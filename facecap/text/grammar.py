"""Raw captions from attributes: a probabilistic context-free grammar, sampled top-down.

The grammar is nltk PCFG text in a data file (facecap/data/caption_grammar.pcfg,
or `caption.grammar`). nltk parses it and checks that each left-hand side's
probabilities sum to one; this module checks the FaceCap conventions on top
(every attribute has phrasings, every group sentence can say all of its
group's attributes) and samples from it.

nltk's `generate` enumerates sentences; it does not sample. Here each
nonterminal picks one of ``grammar.productions(lhs=...)`` with its probability,
drawing from a `random.Random` seeded per record (sample id + grammar version),
so a rerun gives the same text. The names the sampler fills from a record
(groups, ``<GROUP>_LIST``, ``OPT_x``, ``X_G``) are documented at the top of the
grammar file.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from facecap.data import data_file, file_state
from pathlib import Path
from typing import Iterable

from facecap.attributes import ATTRIBUTES, CATEGORIES
from facecap.settings import ConfigError

START = "CAPTION"
# Grammar nonterminal of each of the paper's five categories, in the default sentence order.
GROUPS: dict[str, str] = {
    "elementary traits": "SUBJECT",
    "facial characteristics": "FACE",
    "hair": "HAIR",
    "beard": "BEARD",
    "accessories": "ACCESSORIES",
}
GROUP_ATTRIBUTES: dict[str, tuple[str, ...]] = {GROUPS[cat]: names for cat, names in CATEGORIES.items()}
GROUP_OF: dict[str, str] = {name: group for group, names in GROUP_ATTRIBUTES.items() for name in names}
GENDER_SUFFIXES = ("_MALE", "_FEMALE", "_PERSON")
_KNOWN = frozenset(ATTRIBUTES)
MAX_DEPTH = 40  # guards against a recursive rule in an edited grammar

_VERSION_LINE = re.compile(r"^#\s*grammar_version:\s*(\S+)", re.MULTILINE)


def default_grammar_path() -> Path:
    return data_file("caption_grammar.pcfg")


def grammar_version_of(text: str) -> str:
    """The declared ``# grammar_version:`` plus a hash of the text: any edit changes it."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    declared = _VERSION_LINE.search(text)
    return f"{declared.group(1)}+{digest}" if declared else f"sha-{digest}"


@dataclass(frozen=True)
class _Choice:
    """One nonterminal's productions: right-hand sides and cumulative probabilities."""

    rhs: tuple[tuple[object, ...], ...]  # str = terminal, _NT = nonterminal
    cumulative: tuple[float, ...]

    def pick(self, rng: random.Random) -> tuple[object, ...]:
        return self.rhs[bisect.bisect_right(self.cumulative, rng.random())]


class _NT(str):
    """A nonterminal name (terminals are plain str)."""


# How the sampler treats a nonterminal (precomputed: sampling is the hot path).
_RULE, _OPT, _LIST, _GENDERED = range(4)


def _kind(symbol: str) -> tuple[int, str]:
    if symbol.startswith("OPT_"):
        return _OPT, symbol[4:]
    if symbol.endswith("_LIST") and symbol[:-5] in GROUP_ATTRIBUTES:
        return _LIST, symbol[:-5]
    if symbol.endswith("_G"):
        return _GENDERED, symbol
    return _RULE, symbol


@dataclass(frozen=True)
class CaptionText:
    text: str
    stated_negatives: tuple[str, ...]  # confidently absent attributes the text says are absent


class CaptionGrammar:
    """A parsed, checked caption grammar that samples raw captions for attribute sets."""

    def __init__(self, text: str, source: str = "<text>"):
        import nltk

        self.source = source
        self.text = text
        self.version = grammar_version_of(text)
        try:
            self.pcfg = nltk.PCFG.fromstring(text)
        except ValueError as exc:
            raise ConfigError(f"caption grammar {source} is invalid: {exc}. Fix the file (nltk PCFG syntax: "
                              "LHS -> 'word' OTHER [probability], probabilities of one LHS summing to 1).") from exc
        self.table: dict[str, _Choice] = {}
        for lhs in {p.lhs() for p in self.pcfg.productions()}:
            prods = self.pcfg.productions(lhs=lhs)
            rhs = tuple(tuple(_NT(s.symbol()) if isinstance(s, nltk.Nonterminal) else s for s in p.rhs())
                        for p in prods)
            total, cumulative = 0.0, []
            for p in prods:
                total += p.prob()
                cumulative.append(total)
            cumulative[-1] = 2.0  # rounding: a draw just below 1 still lands on the last rule
            self.table[lhs.symbol()] = _Choice(rhs, tuple(cumulative))
        self.negatable = frozenset(a for a in ATTRIBUTES if f"NEG_{a}" in self.table)
        self._stateable = self.negatable - {"Male"}  # Male's absence is said by the nouns, not a NEG phrase
        self._check()
        symbols = set(self.table) | {s for c in self.table.values() for rhs in c.rhs for s in rhs if type(s) is _NT}
        self._kinds = {s: _kind(s) for s in symbols}
        # Sampling is the hot path: runs of terminals are pre-joined, and a rule
        # of terminals only ("leaf", e.g. ATTR_x) picks its text directly.
        self._compiled = {name: _Choice(tuple(_join_terminals(r) for r in c.rhs), c.cumulative)
                          for name, c in self.table.items()}
        self._leaves = {name: _Choice(tuple(" ".join(r) for r in c.rhs), c.cumulative)
                        for name, c in self.table.items() if all(type(x) is not _NT for r in c.rhs for x in r)}

    # -- conventions ----------------------------------------------------------
    def _fail(self, problems: list[str]) -> None:
        raise ConfigError(f"caption grammar {self.source} is invalid:\n  " + "\n  ".join(problems))

    def _check(self) -> None:
        problems: list[str] = []
        if self.pcfg.start().symbol() != START:
            problems.append(f"the first rule must define {START} (found {self.pcfg.start().symbol()})")
        for name in ATTRIBUTES:
            if f"ATTR_{name}" not in self.table:
                problems.append(f"no phrasings for attribute {name}: add ATTR_{name} -> 'words' [1.0]")
        for symbol in self.table:
            for prefix in ("ATTR_", "NEG_", "OPT_"):
                if symbol.startswith(prefix) and symbol[len(prefix):] not in ATTRIBUTES:
                    problems.append(f"{symbol}: {symbol[len(prefix):]} is not one of the 40 CelebA attributes")
        used = {s for choice in self.table.values() for rhs in choice.rhs for s in rhs if isinstance(s, _NT)}
        for symbol in sorted(used):
            if symbol.endswith("_G"):
                missing = [symbol + suf for suf in GENDER_SUFFIXES if symbol + suf not in self.table]
                if missing:
                    problems.append(f"{symbol} is used but {', '.join(missing)} not defined")
            elif symbol.startswith("OPT_"):
                if symbol[4:] not in ATTRIBUTES:
                    problems.append(f"{symbol}: {symbol[4:]} is not one of the 40 CelebA attributes")
            elif symbol.endswith("_LIST") and symbol[:-5] in GROUP_ATTRIBUTES:
                pass
            elif symbol not in self.table:
                problems.append(f"{symbol} is used but has no rule")
        for group, names in GROUP_ATTRIBUTES.items():
            if group not in self.table:
                problems.append(f"no rule for the group sentence {group}")
                continue
            for rhs in self.table[group].rhs:
                said = set(names) if f"{group}_LIST" in rhs else {s[4:] for s in rhs if str(s).startswith("OPT_")}
                if any(isinstance(s, _NT) and s.endswith("_G") for s in rhs):
                    said.add("Male")
                missing = [n for n in names if n not in said]
                if missing:
                    problems.append(f"{group} -> {' '.join(map(str, rhs))}: cannot say {', '.join(missing)} "
                                    f"(use {group}_LIST or OPT_x for each)")
        if START in self.table:
            for rhs in self.table[START].rhs:
                if sorted(map(str, rhs)) != sorted(GROUP_ATTRIBUTES):
                    problems.append(f"{START} -> {' '.join(map(str, rhs))}: must name each of "
                                    f"{', '.join(GROUP_ATTRIBUTES)} once")
        if problems:
            self._fail(problems)

    # -- sampling -------------------------------------------------------------
    def caption(self, attributes: Iterable[str], absent: Iterable[str] = (), seed: int = 0,
                negatives: int = 2) -> CaptionText:
        """Sample one raw caption. Same attributes, absent set, seed and grammar -> same text.

        `negatives` bounds how many confidently absent attributes (with NEG_x
        phrasings) are stated; Male's absence always picks the female nouns.
        """
        kept = frozenset(attributes)
        absent_set = frozenset(absent) - kept
        if not (kept <= _KNOWN and absent_set <= _KNOWN):
            raise ValueError(f"not CelebA attribute names: {', '.join(sorted((kept | absent_set) - _KNOWN))}")
        rng = random.Random(seed)
        stated: tuple[str, ...] = ()
        if negatives:
            candidates = sorted(absent_set & self._stateable)
            if candidates:
                stated = tuple(sorted(rng.sample(candidates, min(negatives, len(candidates)))))
        female = "Male" in absent_set
        gender = "_MALE" if "Male" in kept else "_FEMALE" if female else "_PERSON"
        ctx = _Context(rng, kept, frozenset(stated), gender)
        groups = {GROUP_OF[a] for a in kept}
        groups.update(GROUP_OF[a] for a in stated)
        if female:
            groups.add(GROUP_OF["Male"])
        tokens: list[str] = []
        for symbol in self.table[START].pick(rng):
            if symbol not in groups:
                continue  # an empty group is skipped
            first = len(tokens)
            self._expand(symbol, ctx, tokens, 0)
            for i in range(first, len(tokens)):  # capitalise the sentence's first word
                if tokens[i]:
                    tokens[i] = tokens[i][:1].upper() + tokens[i][1:]
                    break
        return CaptionText(_render(tokens), stated)

    def _expand(self, symbol: str, ctx: "_Context", out: list[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ConfigError(f"caption grammar {self.source}: rules nest deeper than {MAX_DEPTH} "
                              f"(a recursive rule?) at {symbol}")
        kind, arg = self._kinds[symbol]
        if kind == _OPT:
            target = self._opt_target(arg, ctx)
            if target:
                self._expand(target, ctx, out, depth + 1)
            return
        if kind == _LIST:
            out.append(self._list(arg, ctx, depth))
            return
        if kind == _GENDERED:
            symbol = arg + ctx.gender
        leaves, kinds, rng = self._leaves, self._kinds, ctx.rng
        for item in self._compiled[symbol].pick(rng):
            if type(item) is not _NT:
                out.append(item)
                continue
            leaf = leaves.get(item)
            if leaf is None:
                # OPT_x and X_G usually end in a leaf: resolve them here, without a call.
                kind, arg = kinds[item]
                target = self._opt_target(arg, ctx) if kind == _OPT else arg + ctx.gender if kind == _GENDERED \
                    else item
                if not target:
                    continue
                leaf = leaves.get(target)
                if leaf is None:
                    self._expand(target, ctx, out, depth + 1)
                    continue
            out.append(leaf.pick(rng))

    @staticmethod
    def _opt_target(name: str, ctx: "_Context") -> str | None:
        if name in ctx.kept:
            return "ATTR_" + name
        if name in ctx.stated:
            return "NEG_" + name
        return None

    def _list(self, group: str, ctx: "_Context", depth: int) -> str:
        """A group's kept attributes, then its stated negatives after "but", each part shuffled."""
        names = GROUP_ATTRIBUTES[group]
        parts = []
        for chosen, prefix in (([a for a in names if a in ctx.kept], "ATTR_"),
                               ([a for a in names if a in ctx.stated], "NEG_")):
            ctx.rng.shuffle(chosen)
            phrases = []
            for name in chosen:
                leaf = self._leaves.get(prefix + name)
                if leaf is not None:
                    phrases.append(leaf.pick(ctx.rng))
                    continue
                words: list[str] = []
                self._expand(prefix + name, ctx, words, depth + 1)
                phrases.append(" ".join(w for w in words if w))
            if phrases:
                # Negatives each keep their own "no ...": "no hat and glasses" would read as two absences.
                parts.append(_join_list(phrases))
        return " but ".join(parts)

    def phrasings(self, symbol: str) -> list[str]:
        """Every text a phrase nonterminal (ATTR_x, NEG_x) can give; for checks and previews."""
        import nltk
        from nltk.parse.generate import generate

        return [" ".join(words) for words in generate(self.pcfg, start=nltk.Nonterminal(symbol), depth=12, n=500)]


@dataclass
class _Context:
    rng: random.Random
    kept: frozenset
    stated: frozenset
    gender: str


def _join_terminals(rhs: tuple) -> tuple:
    out: list = []
    for item in rhs:
        if type(item) is not _NT and out and type(out[-1]) is not _NT:
            out[-1] = f"{out[-1]} {item}"
        else:
            out.append(item)
    return tuple(out)


def _join_list(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _render(tokens: list[str]) -> str:
    text = " ".join(t for t in tokens if t)
    text = text.replace(" ,", ",").replace(" .", ".")
    # "a" before a vowel reads "an" (terminals are lower case; "A" only starts a sentence).
    for vowel in "aeiou":
        text = text.replace(f" a {vowel}", f" an {vowel}").replace(f"A {vowel}", f"An {vowel}")
    return text


def caption_seed(sample_id: str, grammar_version: str, run_seed: int = 0) -> int:
    """The per-record sampling seed (fits int64): sample id + grammar version + caption.seed."""
    digest = hashlib.sha256(f"{run_seed}\x00{grammar_version}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def load_grammar(path: str | os.PathLike[str] | None = None) -> CaptionGrammar:
    """The grammar at `path` (default: the built-in one); cached per process while the file is unchanged."""
    p = Path(path) if path else default_grammar_path()
    return _load_cached(*file_state(p, "caption grammar", "caption.grammar"))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> CaptionGrammar:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"caption grammar {path} cannot be read: {exc}") from exc
    return CaptionGrammar(text, path)
