"""Caption grammar: coverage, determinism, production frequencies, negative evidence, bad files, the preview command."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from facecap.attributes import ATTRIBUTES, CONTRADICTIONS
from facecap.cli import main
from facecap.settings import ConfigError, LLMSettings
from facecap.stages.caption import CaptionSettings
from facecap.stages.caption import Captioner
from facecap.text.faithfulness import check_caption, grammar_lexicon_mismatches, load_lexicon
from facecap.text.grammar import GROUP_OF, caption_seed, default_grammar_path, load_grammar


@pytest.fixture(scope="module")
def grammar():
    return load_grammar()


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


def _consistent_sample(rng: random.Random) -> tuple[list[str], list[str]]:
    """A random attribute set that obeys the contradiction rules, like annotate's output."""
    kept: list[str] = []
    for name in rng.sample(ATTRIBUTES, rng.randint(1, 14)):
        if not any((name in r.left and set(r.right) & set(kept)) or (name in r.right and set(r.left) & set(kept))
                   for r in CONTRADICTIONS):
            kept.append(name)
    absent = rng.sample([a for a in ATTRIBUTES if a not in kept], rng.randint(0, 12))
    return kept, absent


@pytest.mark.slow
def test_every_attribute_and_every_phrasing_can_appear(grammar, lexicon):
    for name in ATTRIBUTES:
        # As rendered: "a oval face" reads "an oval face".
        phrasings = {re.sub(r"\ba (?=[aeiou])", "an ", p) for p in grammar.phrasings(f"ATTR_{name}")}
        assert len(phrasings) >= 2, f"{name} needs several phrasings"
        seen = set()
        for seed in range(120):
            text = grammar.caption([name], [], seed).text
            assert name in lexicon.read(text)[0], (name, text)
            seen |= {p for p in phrasings if p in text.lower()}
        assert seen == phrasings, f"{name}: phrasings never sampled: {phrasings - seen}"


@pytest.mark.slow
def test_raw_captions_pass_their_own_check(grammar, lexicon):
    assert grammar_lexicon_mismatches(grammar, lexicon) == []
    rng = random.Random(7)
    for i in range(1500):
        kept, absent = _consistent_sample(rng)
        text = grammar.caption(kept, absent, seed=i).text
        result = check_caption(text, kept, absent, lexicon)
        assert result.passed, (kept, absent, text, result.reason)


@pytest.mark.slow
def test_same_seed_same_text_in_another_process(grammar):
    kept, absent = ["Male", "Young", "Smiling", "Wavy_Hair", "Goatee", "Eyeglasses"], ["Wearing_Hat", "Bald"]
    seed = caption_seed("abc123-00", grammar.version)
    here = grammar.caption(kept, absent, seed).text
    assert grammar.caption(kept, absent, seed).text == here
    code = ("import json,sys; from facecap.text.grammar import load_grammar, caption_seed; g=load_grammar(); "
            f"s=caption_seed('abc123-00', g.version); print(json.dumps([s, g.caption({kept!r}, {absent!r}, s).text]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert other == [seed, here]
    # Seeds differ per sample and per caption.seed, and different seeds give different text.
    assert caption_seed("abc123-01", grammar.version) != seed
    assert caption_seed("abc123-00", grammar.version, run_seed=1) != seed
    assert len({grammar.caption(kept, absent, s).text for s in range(30)}) > 20


def test_sampled_production_frequencies_match_probabilities(grammar):
    n = 6000
    photo_words = {"photo": 0.45, "picture": 0.3, "portrait": 0.15, "close-up": 0.1}
    gray = {"gray hair": 0.5, "grey hair": 0.3, "silver hair": 0.2}
    photo_counts, gray_counts = Counter(), Counter()
    for seed in range(n):
        text = grammar.caption(["Young", "Gray_Hair"], [], seed).text.lower()
        photo_counts.update(w for w in photo_words if f" {w} " in text.split(".")[0] + " ")
        gray_counts.update(w for w in gray if w in text)
    for counts, probs in ((photo_counts, photo_words), (gray_counts, gray)):
        assert sum(counts.values()) == n
        for word, p in probs.items():
            # 5 standard deviations of a binomial share at n=6000 is under 0.035.
            assert abs(counts[word] / n - p) < 0.035, (word, counts[word] / n, p)


def test_sentence_orders_follow_the_start_rule_probabilities(grammar, lexicon):
    n = 4000
    kept = ["Young", "Smiling", "Bangs", "Goatee", "Wearing_Hat"]
    expected = {("Smiling", "Bangs", "Goatee", "Wearing_Hat"): 0.4, ("Bangs", "Smiling", "Goatee", "Wearing_Hat"): 0.3,
                ("Smiling", "Goatee", "Bangs", "Wearing_Hat"): 0.15, ("Wearing_Hat", "Smiling", "Bangs", "Goatee"): 0.15}
    # The grammar's own words for each (checked against the lexicon once, not per sample: that is slow).
    words = {"Smiling": ("smil", "grin"), "Bangs": ("bangs", "fringe"), "Goatee": ("goatee",),
             "Wearing_Hat": (" hat", " cap")}
    for name, forms in words.items():
        assert all(any(f.strip() in p for f in forms) and name in lexicon.read(p)[0]
                   for p in grammar.phrasings(f"ATTR_{name}"))
    orders = Counter()
    for seed in range(n):
        sentences = grammar.caption(kept, [], seed).text.split(". ")
        orders[tuple(next(a for a, forms in words.items() if any(f in s for f in forms)) for s in sentences[1:])] += 1
    assert set(orders) == set(expected)
    for order, p in expected.items():
        assert abs(orders[order] / n - p) < 0.04, (order, orders[order] / n, p)


def test_groups_are_skipped_when_empty_and_ordered_by_the_grammar(grammar):
    text = grammar.caption(["Smiling"], [], 3).text
    assert text.count(".") == 1 and "hair" not in text and "wear" not in text
    groups = {GROUP_OF[a] for a in ("Male", "Smiling", "Bangs", "Goatee", "Wearing_Hat")}
    text = grammar.caption(["Male", "Smiling", "Bangs", "Goatee", "Wearing_Hat"], [], 3).text
    assert text.count(".") == len(groups) == 5


def test_negative_evidence(grammar, lexicon):
    texts = [grammar.caption(["Smiling", "Male"], ["Eyeglasses"], s, negatives=1).text for s in range(10)]
    assert all("no glasses" in t for t in texts)
    assert all("Eyeglasses" in lexicon.read(t)[1] for t in texts)
    assert not any("glasses" in grammar.caption(["Smiling", "Male"], ["Eyeglasses"], s, negatives=0).text
                   for s in range(10))
    woman = grammar.caption(["Smiling"], ["Male"], 1, negatives=0).text
    assert "Male" in lexicon.read(woman)[1] and "Male" not in lexicon.read(woman)[0]
    neutral = grammar.caption(["Smiling"], [], 1).text
    assert "Male" not in lexicon.read(neutral)[0] | lexicon.read(neutral)[1]
    with pytest.raises(ValueError, match="Smilng"):
        grammar.caption(["Smilng"], [], 1)


def _edited(tmp_path, old: str, new: str, name="edited.pcfg"):
    text = default_grammar_path().read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, message", [
    ("ATTR_Goatee -> 'a' 'goatee' [0.7]", "ATTR_Goatee -> 'a' 'goatee' [0.6]", "do not sum to 1"),
    ("ATTR_Goatee -> 'a' 'goatee' [0.7]", "ATTR_Goatee -> 'a' 'goatee [0.7]", "Unable to parse"),
    ("ATTR_Goatee ->", "ATTR_Goatie ->", "no phrasings for attribute Goatee"),
    ("HAIR -> PRON_G 'has' HAIR_LIST '.' [0.6]", "HAIR -> PRON_G 'has' HAIR_WORDS '.' [0.6]", "HAIR_WORDS is used"),
    ("'a' OPT_Attractive OPT_Young NOUN_G '.' [0.5]", "'a' OPT_Attractive NOUN_G '.' [0.5]", "cannot say Young"),
])
def test_invalid_grammar_is_a_clear_error_naming_the_file(tmp_path, old, new, message):
    path = _edited(tmp_path, old, new)
    with pytest.raises(ConfigError) as err:
        load_grammar(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_grammar_file(tmp_path):
    with pytest.raises(ConfigError, match="caption.grammar"):
        load_grammar(tmp_path / "nope.pcfg")


def test_edited_grammar_changes_version_and_must_agree_with_the_lexicon(tmp_path, grammar):
    path = _edited(tmp_path, "'a' 'goatee' [0.7]", "'a' 'chin' 'beard' [0.7]")
    edited = load_grammar(path)
    assert edited.version != grammar.version and edited.version.startswith("1+")
    with pytest.raises(ConfigError, match="chin beard"):
        Captioner(CaptionSettings(grammar=str(path)), LLMSettings())


def test_caption_preview_prints_seeded_captions(capsys):
    args = ["caption-preview", "--attributes", "Male,Smiling,Eyeglasses,Black_Hair", "--absent", "No_Beard",
            "--seed", "5", "-n", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    lines = [line for line in first.splitlines() if line.startswith("[seed")]
    assert [line.split("]")[0] for line in lines] == ["[seed 5", "[seed 6", "[seed 7"]
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main(["caption-preview", "--attributes", "Male,Smilng"]) == 2
    assert "did you mean Smiling" in capsys.readouterr().err


def test_caption_preview_with_a_bad_grammar_file_exits_2(tmp_path, capsys):
    path = _edited(tmp_path, "[0.7] | 'a' 'small' 'goatee' [0.3]", "[0.7] | 'a' 'small' 'goatee' [0.2]")
    assert main(["caption-preview", "--attributes", "Goatee", "--grammar", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "sum to 1" in err


def test_invalid_lexicon_is_a_clear_error(tmp_path):
    from facecap.text.faithfulness import default_lexicon_path

    data = json.loads(default_lexicon_path().read_text())
    data["attributes"]["Smiling"]["expressed"].append("smil(e")
    del data["attributes"]["Goatee"]
    path = tmp_path / "lexicon.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_lexicon(path)
    assert str(path) in str(err.value) and "Goatee: missing" in str(err.value) and "smil(e" in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_lexicon(path)
