"""The FLIP-80M text path: keywords, pre-cleaner, classifier training (real MiniLM, offline),
LLM denoise, the text stage, and a curate run over a URL list ending in a release.

The LLM is the only test double: tests/llm_server.py, an OpenAI-compatible server on
127.0.0.1 standing in for vLLM at the HTTP boundary. The classifier is trained on a small
synthetic corpus this file writes; its scores mean only that it separates that corpus.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from facecap.cli import main
from facecap.settings import ConfigError, LLMSettings
from facecap.stages.text import TextSettings
from facecap.config import Config
from facecap.chain import plan_run
from facecap.stages.text import TEXT_FIELDS
from facecap.stages.base import Counters
from facecap.stages.text import TextTools, filter_captions, text_schema
from facecap.text.clean import clean_text
from facecap.text.denoise import denoise_many, denoise_settings, load_prompt, reply_problem
from facecap.text.keywords import KeywordMatcher, load_keywords
from facecap.text.llm import LLMClient
from facecap.text.text_filter import (HEAD_CONFIG, HEAD_WEIGHTS, EmbeddingClassifier, KeywordFilter,
                                      load_text_filter, planned_identity)

sys.path.insert(0, str(Path(__file__).parent))
from helpers import read_release, run_curate  # noqa: E402
from http_fixture_server import ServerThread, astronaut_jpeg, generated_png  # noqa: E402
from llm_server import FakeVLLM, Reply  # noqa: E402

# --------------------------------------------------------------------------- keywords


@pytest.fixture(scope="module")
def matcher() -> KeywordMatcher:
    return KeywordMatcher.from_file()


@pytest.mark.parametrize("text, expected", [
    ("A Smiling girl with EARRINGS", ["earrings", "smiling"]),
    ("close-up: blue eyes, red lips and a big nose", ["nose", "eyes", "lips"]),
    ("bride wearing eye-shadow and make-up", ["make-up", "eye shadow"]),  # phrases match across hyphens
    ("He smiles; SAD eyes!", ["eyes", "sad", "smiles"]),  # list order, each once
    ("Eye-catching sofa in a showroom", []),  # no keyword inside another word
    ("Facebook eyesore smileys", []),
    ("", []),
])
def test_keyword_matcher_finds_whole_words_and_phrases(matcher, text, expected):
    assert sorted(matcher.find(text)) == sorted(expected)
    assert matcher.find(text) == sorted(matcher.find(text), key=matcher.keywords.index)


def test_keyword_list_has_the_paper_seeds_and_an_editable_file(tmp_path, matcher):
    seeds = ["smile", "nose", "eyes", "mouth", "cheek", "sad", "angry", "upset", "scared", "surprised",
             "eyeglasses", "earrings"]
    assert matcher.keywords[:12] == seeds and 140 <= len(matcher.keywords) <= 170
    custom = tmp_path / "kw.txt"
    custom.write_text("# mine\nFreckles  \nfreckles\n\nred   hair # a phrase\n")
    assert load_keywords(custom) == ["freckles", "red hair"]
    other = KeywordMatcher.from_file(custom)
    assert other.find("Red hair and freckles") == ["freckles", "red hair"] and other.identity != matcher.identity
    with pytest.raises(ConfigError, match="does not exist"):
        load_keywords(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- pre-cleaner


@pytest.mark.parametrize("raw, clean", [
    ("Smiling woman with red lipstick - Stock Photo | Shutterstock", "Smiling woman with red lipstick"),
    ("&lt;b&gt;Portrait&lt;/b&gt; of a man &amp;amp; his dog\\nIMG_2034.JPG", "Portrait of a man & his dog"),
    ("Image 3 of 12: angry boy crying. Click to enlarge", "angry boy crying."),
    ("caf\\u00e9 owner\x00 smiling\u200b  www.example.com/x.jpg", "café owner smiling"),
    ("<a href=\"/p/1\">Happy girl</a>   -  Free download", "Happy girl"),
    ("Bride with earrings | Photo 4/20 | © 2019 All rights reserved", "Bride with earrings"),
    ("Close-up of a surprised face", "Close-up of a surprised face"),
    (None, ""),
])
def test_pre_cleaner_removes_markup_escapes_and_boilerplate(raw, clean):
    result = clean_text(raw)
    assert result.text == clean
    assert result.chars_removed == len(raw or "") - len(clean)
    assert clean_text(raw) == result  # deterministic


# --------------------------------------------------------------------------- classifier


def synthetic_corpus(seed: int, n: int) -> list[str]:
    """Face captions (with keywords) and everyday non-face captions, shuffled."""
    r = random.Random(seed)
    who = ["woman", "man", "girl", "boy", "old lady", "young man", "bride", "actor"]
    face = ["a {w} smiling with bright eyes", "close up of a {w} with a big nose and red lips",
            "an angry {w} frowning", "portrait of a sad {w} with tears on the cheek",
            "a surprised {w} with wide open mouth", "{w} wearing eyeglasses and earrings",
            "a scared {w} with raised eyebrows", "the {w} has a beard and a mustache"]
    other = ["a red sofa in a bright living room", "sunset over snowy mountains", "a bowl of fresh fruit on a table",
             "vintage car parked on a city street", "wooden chair, oak, handmade", "aerial view of a harbour",
             "blue ceramic vase with flowers", "laptop and coffee cup on a desk", "map of europe 1900",
             "running shoes for men, size 42"]
    caps = [r.choice(face).format(w=r.choice(who)) + r.choice(["", " at the beach", " in the park"]) for _ in range(n)]
    caps += [r.choice(other) + r.choice(["", " - sale", " photo"]) for _ in range(n)]
    r.shuffle(caps)
    return caps


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory) -> Path:
    """A head trained through the CLI on a corpus written here (real MiniLM embeddings, offline)."""
    root = tmp_path_factory.mktemp("textfilter")
    pq.write_table(pa.table({"TEXT": synthetic_corpus(0, 60), "URL": ["http://example.invalid/x.jpg"] * 120}),
                   root / "laion-meta.parquet")
    out = root / "head"
    assert main(["train-text-filter", str(root / "laion-meta.parquet"), "--out", str(out), "--profile", "offline"]) == 0
    return out


def test_train_text_filter_separates_face_captions_and_stores_no_pickle(trained_head, matcher):
    assert sorted(p.name for p in trained_head.iterdir()) == [HEAD_WEIGHTS, HEAD_CONFIG]
    info = json.loads((trained_head / HEAD_CONFIG).read_text())
    assert info["metrics"]["positives"] == 60 and info["metrics"]["negatives"] == 60
    assert info["metrics"]["accuracy"] >= 0.9  # held-out share of the keyword-labelled corpus
    settings = TextSettings(classifier=str(trained_head))
    classifier = load_text_filter(settings, matcher)
    assert isinstance(classifier, EmbeddingClassifier)
    assert classifier.identity == planned_identity(settings, matcher)  # the plan names what workers load
    # Unseen captions, none with a keyword: the embedding generalises past the keyword list.
    faces = ["a young girl looking at the camera", "an elderly gentleman in a suit, head and shoulders",
             "teenager making a silly grimace"]
    things = ["a green tractor in a field", "kitchen knife set, stainless steel", "city skyline at night"]
    scores = classifier.score(faces + things)
    assert scores.shape == (6,) and np.all((scores >= 0) & (scores <= 1))
    assert scores[:3].min() > scores[3:].max()


def test_a_bert_style_sequence_classifier_loads_from_a_local_directory(tmp_path, matcher):
    """A tiny randomly initialised BERT (2 layers, hidden 32): checks the loading code, not its scores."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from facecap.text.text_filter import SequenceClassifier, resolve_encoder

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(None))  # BERT-uncased WordPiece
    for name, labels in (("face-last", {0: "other", 1: "face"}), ("face-first", {0: "face", 1: "other"})):
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, num_labels=2, id2label=labels,
                            label2id={v: k for k, v in labels.items()})
        BertForSequenceClassification(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        settings = TextSettings(classifier=str(tmp_path / name))
        classifier = load_text_filter(settings, matcher)
        assert isinstance(classifier, SequenceClassifier)
        assert classifier.positive == (1 if name == "face-last" else 0)
        assert classifier.identity == planned_identity(settings, matcher) and "seqcls:" in classifier.identity
        scores = classifier.score(["a smiling woman", "a red sofa", "x " * 400])  # long text is truncated
        assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))


def test_classifier_settings_fail_clearly(tmp_path, matcher):
    assert isinstance(load_text_filter(TextSettings(), matcher), KeywordFilter)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train-text-filter"):
        load_text_filter(TextSettings(classifier=str(tmp_path / "empty")), matcher)
    cfg = Config.model_validate({"profile": "offline", "text": {"caption_path": "flip80m", "denoise": True}})
    with pytest.raises(ConfigError, match="llm.endpoint"):
        plan_run(cfg)


# --------------------------------------------------------------------------- denoise + the stage


def alt_text_of(body: dict) -> str:
    return body["messages"][-1]["content"].removeprefix("Alt-text: ")


def scripted_denoiser(raw: str, n: int, body: dict) -> Reply:
    """Keeps the part before ' , ' lists; invents words for INVENT; fails for FAIL."""
    text = alt_text_of(body)
    if "FAIL" in text:
        return Reply(status=400, text="bad request")
    if "INVENT" in text:
        return Reply("A completely different caption about a cat")
    return Reply(text.split(", ")[0])


def face_batch(captions: list[str | None]) -> pa.RecordBatch:
    n = len(captions)
    return pa.RecordBatch.from_pydict({
        "sample_id": [f"img{i}-00" for i in range(n)], "image_id": [f"img{i}" for i in range(n)],
        "source": ["list.parquet"] * n, "source_offset": [str(i) for i in range(n)],
        "source_caption": captions, "det_score": pa.array([0.99] * n, pa.float32()),
        "bbox": pa.array([[0.0, 0.0, 10.0, 10.0]] * n, pa.list_(pa.float32(), 4))})


def test_text_stage_filters_cleans_and_denoises_through_an_llm(tmp_path, matcher, trained_head):
    prompt = load_prompt()
    assert len(prompt.examples) == 3 and prompt.messages("x")[0]["role"] == "system"
    captions = ["Smiling woman with red lipstick, beauty, makeup, model - Stock Photo",
                "angry man shouting at the camera, INVENT",
                "surprised girl with wide eyes, FAIL",
                "aerial view of a harbour with boats | Shutterstock",
                "&nbsp;<br/>",
                None]
    settings = TextSettings(caption_path="flip80m", classifier=str(trained_head), denoise=True)
    with FakeVLLM(scripted_denoiser) as llm:
        client = LLMClient(denoise_settings(LLMSettings(endpoint=llm.url, model="test-model", retries=0)),
                           tmp_path / "llm-cache")
        tools = TextTools(matcher, load_text_filter(settings, matcher), "clean-1+llm:test-model",
                          lambda texts: denoise_many(texts, prompt, client))
        batch = face_batch(captions)
        schema = text_schema(settings)
        counters = Counters()
        chunks = list(filter_captions(iter([batch]), tools, settings, schema, counters))
    kept = pa.concat_tables([c.kept for c in chunks if c.kept is not None]).to_pylist()
    rejects = pa.concat_tables([c.rejected for c in chunks if c.rejected is not None]).to_pylist()
    assert {r["source_offset"]: r["reason"] for r in rejects} == {
        "3": "not_face_caption", "4": "no_caption", "5": "no_caption"}
    assert all(r["sample_id"] and r["stage"] == "text" for r in rejects)
    # The stage writes only its own columns, keyed by sample_id ("img<offset>-00" here).
    by_offset = {r["sample_id"].removeprefix("img").removesuffix("-00"): r for r in kept}
    assert "source_caption" not in kept[0]
    assert by_offset["0"]["text_caption"] == by_offset["0"]["caption"] == "Smiling woman with red lipstick"
    assert by_offset["0"]["text_denoise"] == "llm" and by_offset["0"]["keywords"] == ["smiling", "lipstick"]
    # A reply that adds words, and a failed request, keep the pre-cleaned text and say why.
    assert by_offset["1"]["text_denoise"] == "rules:added_words"
    assert by_offset["1"]["text_caption"] == "angry man shouting at the camera, INVENT"
    assert by_offset["2"]["text_denoise"] == "rules:llm_error"
    assert all(r["text_score"] > 0.5 and r["text_filter"].startswith("minilm-logistic:") for r in kept)
    removed = sum(r["text_chars_removed"] for r in kept)
    assert counters.extra["text_chars_removed"] == removed > 0
    assert counters.extra["alt_text_chars"] == sum(len(captions[int(offset)]) for offset in by_offset)
    assert {f.name for f in TEXT_FIELDS} | {"caption"} <= set(schema.names)
    assert reply_problem("a b c", "a c") is None and reply_problem("a b", "") == "empty_reply"


# --------------------------------------------------------------------------- the whole flow


def test_curate_a_url_list_on_the_flip80m_path_and_retry_its_failures(tmp_path, prefect_api_url, trained_head,
                                                                        capsys):
    astronaut = astronaut_jpeg()
    mirrored = io.BytesIO()  # another face image (the release's quality suite counts duplicate images)
    ImageOps.mirror(Image.open(io.BytesIO(astronaut))).save(mirrored, format="JPEG", quality=90)
    images = {"astronaut.jpg": astronaut, "astro-car.jpg": astronaut, "astro-nocap.jpg": astronaut,
              "astro-busy.jpg": mirrored.getvalue(), "noise.png": generated_png(7, 256)}
    rows = [("/img/astronaut.jpg", "&lt;b&gt;Smiling astronaut&lt;/b&gt; portrait with bright eyes - Stock Photo"),
            ("/img/astro-car.jpg", "vintage car parked on a city street"),
            ("/img/noise.png", "a smiling girl with earrings"),
            ("/status/404", "a sad boy"),
            ("/img/astro-nocap.jpg", None),
            ("/flaky/1/astro-busy.jpg", "Surprised astronaut with wide eyes | Shutterstock")]  # 503 once
    out = tmp_path / "out"
    with ServerThread(images) as server:
        pq.write_table(pa.table({"URL": [server.url(p) for p, _ in rows], "TEXT": [t for _, t in rows],
                                 "SAMPLE_ID": list(range(10, 10 + len(rows))), "NSFW": ["UNLIKELY"] * len(rows)}),
                       tmp_path / "laion.parquet")
        argv = ["curate", str(tmp_path / "laion.parquet"), "--out", str(out), "--profile", "offline",
                "--workers", "1", "--allow-addresses", "127.0.0.1/32", "--set", "text.caption_path=flip80m",
                "--set", f"text.classifier={trained_head}", "--set", "download.retries=0",
                "--set", "download.timeout_s=5", "--set", "dedup.keep=all"]  # astro-busy mirrors astronaut
        assert main(argv) == 0
        first = json.loads((out / "release" / "release.json").read_text())
        data, rejects = read_release(out)
        assert server.count("/flaky/1/astro-busy.jpg") == 1 and server.count("/status/404") == 1

        assert data.num_rows == 1
        face = data.to_pylist()[0]
        assert face["caption"] == face["text_caption"] == "Smiling astronaut portrait with bright eyes"
        assert face["keywords"] == ["eyes", "smiling", "portrait"]  # in the keyword file's order
        assert json.loads(face["source_meta"])["SAMPLE_ID"] == 10 and face["source_offset"] == "0"
        assert face["url"] == server.url(rows[0][0]) and face["nsfw"] == "UNLIKELY"
        reasons = {(r["stage"], r["source_offset"]): r["reason"] for r in rejects.to_pylist()}
        assert reasons == {("ingest", "3"): "http_404", ("ingest", "5"): "http_503", ("detect", "2"): "no_face",
                           ("text", "1"): "not_face_caption", ("text", "4"): "no_caption"}
        funnel = {row["stage"]: row for row in first["funnel"]}
        assert funnel["ingest"]["rows_in"] == 6 and funnel["ingest"]["rejects"] == {"http_404": 1, "http_503": 1}
        assert funnel["text"]["rows_in"] == 3 and funnel["text"]["rows_out"] == 1
        alt = len(rows[0][1])
        assert funnel["text"]["extra"]["alt_text_chars"] == alt
        assert funnel["text"]["extra"]["text_chars_removed"] == alt - len(face["caption"])
        assert f"cleaning removed {(alt - len(face['caption'])) / alt:.1%}" in capsys.readouterr().out
        assert first["stages"]["text"]["status"] == "on" and first["stages"]["caption"]["status"] == "off"
        # The quality report shows the reachable share and the characters cleaning removed.
        figures = json.loads((out / "release" / "report" / "report.json").read_text())["figures"]
        assert figures["download"]["records_in"] == 6 and figures["download"]["images_out"] == 4
        assert figures["download"]["reachable_share"] == round(4 / 6, 4)
        assert figures["alt_text"]["chars"] == alt and figures["alt_text"]["removed_share"] == round(
            (alt - len(face["caption"])) / alt, 4) and figures["alt_text"]["paper_removed_share"] == 0.095
        html = (out / "release" / "report" / "index.html").read_text()
        assert "listed records reached" in html and "Alt-text cleaning removed" in html

        # Re-curation with --retry-failed: only the transient failure is fetched again and merged.
        assert main(argv + ["--retry-failed"]) == 0
        assert server.count("/flaky/1/astro-busy.jpg") == 2 and server.count("/status/404") == 1
        assert server.count("/img/astronaut.jpg") == 1
    data, rejects = read_release(out)
    assert sorted(data.column("source_offset").to_pylist()) == ["0", "5"]  # nothing lost, nothing twice
    captions = dict(zip(data.column("source_offset").to_pylist(), data.column("caption").to_pylist()))
    assert captions["5"] == "Surprised astronaut with wide eyes"
    assert ("ingest", "5") not in {(r["stage"], r["source_offset"]) for r in rejects.to_pylist()}
