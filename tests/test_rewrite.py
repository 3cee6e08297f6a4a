"""LLM rewrite: the client against a local OpenAI-compatible server (the test double for vLLM),
the faithfulness check on hand-written captions, and the caption stage and its shard job.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facecap.attributes import ATTRIBUTES
from facecap.chain import plan_run
from facecap.settings import ConfigError, LLMSettings
from facecap.stages.caption import CaptionSettings
from facecap.config import Config
from facecap.runner import run_stage
from facecap.schema import IMAGE_SCHEMA, Reason, extend_schema
from facecap.stages.annotate import ATTRIBUTE_FIELDS
from facecap.stages.caption import CAPTION_FIELDS, CaptionReason
from facecap.stages.detect import FACE_SCHEMA
from facecap.shards import OutputRef, ShardInput
from facecap.sources.spec import ShardSpec
from facecap.stages.base import Counters
from facecap.stages.caption import NOT_REWRITTEN, PASSED, Caption, Captioner
from facecap.text.faithfulness import SentenceSimilarity, check_caption, load_lexicon, shared_similarity
from facecap.text.llm import LLMClient, LLMUnavailable
from facecap.text.prompt import load_prompt
from llm_server import FakeVLLM, always, faithful, scripted

MODEL = "test-model"


def llm(server: FakeVLLM, **kw) -> LLMSettings:
    return LLMSettings(endpoint=server.url, model=MODEL, backoff_s=0.01, **kw)


def conversation(text: str) -> list[dict]:
    return [{"role": "system", "content": "rewrite"}, {"role": "user", "content": f"Description: {text}"}]


# --- the client ----------------------------------------------------------------
def test_concurrency_is_reached_and_a_rerun_is_served_from_the_cache(tmp_path):
    texts = [f"A photo of person number {i}. They smile." for i in range(24)]
    with FakeVLLM(always("faithful", delay=0.2)) as server:
        client = LLMClient(llm(server, concurrency=8), tmp_path / "cache")
        results = client.chat_many([conversation(t) for t in texts])
        assert [r.text for r in results] == [faithful(t) for t in texts]
        assert server.requests == 24
        assert server.max_in_flight == 8 == client.stats.max_in_flight  # reached, never exceeded
        # A rerun (a new client, as in another worker process) sends nothing.
        again = LLMClient(llm(server, concurrency=8), tmp_path / "cache")
        cached = again.chat_many([conversation(t) for t in texts])
        assert server.requests == 24 and again.stats.requests == 0 and again.stats.cache_hits == 24
        assert [r.text for r in cached] == [r.text for r in results] and all(r.cached for r in cached)
        # The key covers sampling settings: another temperature is another request.
        LLMClient(llm(server, concurrency=8, temperature=0.1), tmp_path / "cache").chat(conversation(texts[0]))
        assert server.requests == 25
        # Identical requests in one call are sent once.
        fresh = LLMClient(llm(server), tmp_path / "cache2")
        assert len({r.text for r in fresh.chat_many([conversation("Same. Text.")] * 5)}) == 1
        assert server.by_raw["Same. Text."] == 1


def test_retries_5xx_timeouts_and_connection_errors_but_not_4xx(tmp_path, monkeypatch):
    script = {"alpha": ["500", "503", "faithful"], "beta": ["timeout", "faithful"], "gamma": ["400"],
              "delta": ["500"], "eps": ["malformed"]}
    monkeypatch.setenv("FACECAP_LLM_API_KEY", "sk-test-123")
    with FakeVLLM(scripted(script)) as server:
        client = LLMClient(llm(server, retries=2, timeout_s=0.5), tmp_path)
        alpha, beta, gamma, delta, eps = client.chat_many([conversation(w) for w in script])
        assert alpha.ok and alpha.attempts == 3 and server.by_raw["alpha"] == 3
        assert beta.ok and beta.attempts == 2 and server.by_raw["beta"] == 2
        assert not gamma.ok and not gamma.transient and "HTTP 400" in gamma.error and server.by_raw["gamma"] == 1
        assert not delta.ok and delta.transient and server.by_raw["delta"] == 3  # 1 + 2 retries
        assert not eps.ok and "malformed" in eps.error and server.by_raw["eps"] == 1
        assert {h.get("Authorization") or h.get("authorization") for h in server.headers} == {"Bearer sk-test-123"}
        # Failures are not cached: they are asked again next time.
        client.chat(conversation("gamma"))
        assert server.by_raw["gamma"] == 2
    dead = LLMClient(LLMSettings(endpoint=server.url, retries=1, backoff_s=0.01), None).chat(conversation("x"))
    assert dead.transient and "connection error" in dead.error and dead.attempts == 2


def test_bad_endpoints_are_clear_errors():
    with pytest.raises(ConfigError, match="http"):
        LLMClient(LLMSettings(endpoint="file:///etc/passwd"))
    with pytest.raises(ConfigError, match="llm.endpoint is not set"):
        LLMClient(LLMSettings())


# --- the faithfulness check on hand-written captions -------------------------
@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


GOOD = [
    (["Male", "Young", "Smiling", "Black_Hair", "Eyeglasses", "No_Beard"], [],
     "A smiling young man with black hair and no beard, wearing glasses."),
    (["Wavy_Hair", "Blond_Hair", "Heavy_Makeup", "Wearing_Lipstick", "Attractive"], ["Male"],
     "An attractive woman with wavy, blonde hair, bold make-up and red lipstick."),
    (["Gray_Hair", "Receding_Hairline", "Mustache", "Bags_Under_Eyes"], ["Eyeglasses"],
     "A person with grey hair, a receding hairline, a moustache and bags under the eyes, not wearing glasses."),
    (["5_o_Clock_Shadow", "Big_Nose", "Bushy_Eyebrows"], [],
     "Someone with stubble, a prominent nose and thick eyebrows."),
]
BAD = [
    # (kept, absent, caption, omitted, hallucinated, contradicting)
    (["Male", "Smiling", "Black_Hair"], [], "A smiling man.", ["Black_Hair"], [], []),
    (["Male", "Smiling"], [], "A smiling man wearing glasses.", [], ["Eyeglasses"], []),
    (["Male", "No_Beard", "Smiling"], [], "A smiling man with a goatee and no beard.", [], ["Goatee"], ["Goatee"]),
    (["Smiling", "Young"], ["Male"], "A young man smiling.", [], ["Male"], ["Male"]),
    (["Eyeglasses", "Smiling"], [], "A smiling person with no glasses.", ["Eyeglasses"], ["Eyeglasses"],
     ["Eyeglasses"]),
    (["Smiling", "Bangs"], [], "He has bangs and smiles.", [], ["Male"], []),
    (["Blond_Hair", "Young"], [], "A young person with brown hair.", ["Blond_Hair"], ["Brown_Hair"], ["Brown_Hair"]),
]


@pytest.mark.parametrize("kept, absent, text", GOOD)
def test_faithful_captions_pass(lexicon, kept, absent, text):
    result = check_caption(text, kept, absent, lexicon)
    assert result.passed, result.reason
    # ... and each becomes unfaithful when one kept attribute is dropped from the record's list
    # (the caption then asserts something the record does not keep).
    assert not check_caption(text, kept[1:], absent, lexicon).passed


@pytest.mark.parametrize("kept, absent, text, omitted, hallucinated, contradicting", BAD)
def test_unfaithful_captions_fail_with_counts(lexicon, kept, absent, text, omitted, hallucinated, contradicting):
    result = check_caption(text, kept, absent, lexicon)
    assert not result.passed
    assert list(result.omitted) == omitted
    assert list(result.hallucinated) == hallucinated
    assert list(result.contradicting) == contradicting
    assert result.reason.startswith("hallucination" if hallucinated else "omission")


def test_prompt_examples_are_faithful(lexicon):
    prompt = load_prompt()
    assert prompt.examples and prompt.version.startswith("1+")
    for ex in prompt.examples:
        assert check_caption(ex.raw, ex.attributes, ex.absent, lexicon).passed, ex.raw
        assert check_caption(ex.rewrite, ex.attributes, ex.absent, lexicon).passed, ex.rewrite
    messages = prompt.messages("RAW TEXT")
    assert messages[0]["role"] == "system" and messages[-1]["content"].endswith("RAW TEXT")
    assert len(messages) == 2 + 2 * len(prompt.examples)


def test_minilm_similarity_from_the_bundled_model(lexicon):
    model = shared_similarity()
    assert isinstance(model, SentenceSimilarity)
    raw = "A photo of a young man. He has a smile. He has black hair."
    close, far = model.scores([raw, raw], ["A smiling young man with black hair.", "A red bus parked on a street."])
    assert close > far
    result = check_caption("A smiling young man with black hair.", ["Male", "Young", "Smiling", "Black_Hair"], [],
                           lexicon, similarity=far, min_similarity=(close + far) / 2)
    assert not result.passed and result.reason.startswith("low_similarity")


# --- the stage logic -------------------------------------------------------------
ITEMS = [
    ("s-00", ["Male", "Young", "Smiling", "Black_Hair", "Eyeglasses"], ["Wearing_Hat"]),
    ("s-01", ["Wavy_Hair", "Blond_Hair", "Heavy_Makeup", "Wearing_Earrings"], ["Male"]),
    ("s-02", ["Gray_Hair", "Mustache", "Big_Nose", "Attractive"], []),
]


def test_rewrite_passes_retries_and_falls_back_with_counts(tmp_path):
    settings = CaptionSettings(max_attempts=3, negatives=0)
    # s-00: invents a hat then rewrites faithfully; s-01: always omits its last sentence; s-02: faithful.
    raws = {sid: Captioner(settings, LLMSettings()).raw(sid, kept, absent)[0] for sid, kept, absent in ITEMS}
    script = {raws["s-00"]: ["hallucinating", "faithful"], raws["s-01"]: ["omitting"]}
    with FakeVLLM(scripted(script)) as server:
        captioner = Captioner(settings, llm(server), tmp_path / "cache")
        counters = Counters()
        s00, s01, s02 = captioner.caption_many(ITEMS, counters)
        assert (s00.check, s00.model, s00.caption) == (PASSED, MODEL, faithful(raws["s-00"]))
        assert (s02.check, s02.model) == (PASSED, MODEL)
        assert s01.caption == s01.raw == raws["s-01"] and s01.model == "none"
        assert s01.check.startswith("omission") and s01.check.endswith("(3 attempts)")
        assert s00.prompt_version == s01.prompt_version == captioner.prompt.version
        assert server.by_raw[raws["s-00"]] == 2 and server.by_raw[raws["s-01"]] == 3
        assert server.by_raw[raws["s-02"]] == 1
        # Every attempt used its own request seed.
        assert len({b["seed"] for b in server.bodies if raws["s-01"] in b["messages"][-1]["content"]}) == 3
        x = counters.extra
        assert x["rewrites_passed"] == 2 and x["rewrite_fallbacks"] == 1 and x["fallback_omission"] == 1
        assert x["hallucinated_attributes"] == 2  # the hat and the goatee, once
        assert x["omitted_attributes"] >= 3 and x["rewrite_attempts"] == 6 and x["llm_requests"] == 6
        # Rerun: the same outcomes, from the cache, with zero requests.
        again = Captioner(settings, llm(server), tmp_path / "cache").caption_many(ITEMS, Counters())
        assert [o.__dict__ for o in again] == [o.__dict__ for o in (s00, s01, s02)]
        assert server.requests == 6


def test_an_unavailable_endpoint_fails_the_shard_instead_of_keeping_raw_text(tmp_path):
    with FakeVLLM(always("503")) as server:
        captioner = Captioner(CaptionSettings(), llm(server, retries=1), tmp_path)
        with pytest.raises(LLMUnavailable, match="rerun to resume"):
            captioner.caption_many(ITEMS, Counters())


def test_without_an_endpoint_captions_are_the_grammar_text():
    counters = Counters()
    outcomes = Captioner(CaptionSettings(), LLMSettings()).caption_many(ITEMS, counters)
    assert all(o.caption == o.raw and o.model == "none" and o.check == NOT_REWRITTEN and o.prompt_version is None
               for o in outcomes)
    assert counters.extra["captions_not_rewritten"] == 3


# --- the shard job on a real shard file -------------------------------------------
def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40 * i % 255, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _annotated_shard(path) -> dict:
    # A joined record: the face, its source image's columns and the attributes.
    source = [f for f in IMAGE_SCHEMA if f.name in ("source", "source_offset", "source_caption", "source_meta",
                                                    "source_width", "source_height", "source_format")]
    schema = extend_schema(extend_schema(FACE_SCHEMA, source), ATTRIBUTE_FIELDS)
    attribute_sets = [kept for _, kept, _ in ITEMS] + [[], ["Male", "Sparkly_Hat"]]
    rows = []
    for i, kept in enumerate(attribute_sets):
        rows.append({
            "sample_id": f"img{i}-00", "image_id": f"img{i}", "source": "/data/folder", "source_offset": f"{i}.jpg",
            "face_index": 0, "image": _jpeg(i), "width": 32, "height": 32, "det_score": 0.99,
            "bbox": [0, 0, 32, 32], "landmarks": [1.0] * 10, "crop_box": [0, 0, 32, 32], "align_angle": 0.0, "pad_fraction": 0.0,
            "detector": "test", "det_min_score": 0.98, "min_face_px": 16, "crop_margin": 0.2,
            "source_caption": f"alt text {i}", "source_meta": "{}", "source_width": 32, "source_height": 32,
            "source_format": "JPEG", "attribute_probs": [0.5] * 40, "attributes": kept,
            "absent_attributes": [a for a in ("Wearing_Hat", "Eyeglasses") if a not in kept],
            "attribute_rules": [], "attribute_model": "test", "attr_keep_threshold": 0.85,
            "attr_absent_threshold": 0.15})
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    # One output that holds every column the caption stage reads (as a joined chain would).
    output = OutputRef("annotate", "annotated-key-1", str(path), "sample_id", tuple(schema.names), len(rows))
    return ShardInput(ShardSpec("folder", "/data/folder", members=("0.jpg",)), (output,))


def test_run_caption_on_a_shard_file(tmp_path):
    previous = _annotated_shard(tmp_path / "annotated.parquet")
    cfg = Config(profile="offline")
    plan = Caption.plan(cfg)
    assert plan.on and plan.model.endswith("llm:none")
    stats = run_stage(Caption, previous, str(tmp_path / "out"), cfg, plan)
    assert not stats.cached and stats.stage == Caption.name
    assert (stats.rows_in, stats.rows_out, stats.rejects) == (
        5, 3, {CaptionReason.NO_ATTRIBUTES: 1, CaptionReason.UNKNOWN_ATTRIBUTE: 1})
    data = pq.read_table(stats.output)
    # Only what the stage adds, keyed by sample_id: the crops and attributes are not copied.
    assert data.schema.names == ["sample_id"] + [f.name for f in CAPTION_FIELDS]
    assert data.column("sample_id").to_pylist() == ["img0-00", "img1-00", "img2-00"]
    assert data.column("caption_model").to_pylist() == ["none"] * 3
    assert data.column("caption_check").to_pylist() == [NOT_REWRITTEN] * 3
    assert data.column("caption").to_pylist() == data.column("raw_caption").to_pylist()
    rejects = pq.read_table(stats.rejects_output)
    assert "Sparkly_Hat" in " ".join(rejects.column("detail").to_pylist())
    # A rerun skips; another output directory gets the same bytes.
    assert run_stage(Caption, previous, str(tmp_path / "out"), cfg, plan).cached
    other = run_stage(Caption, previous, str(tmp_path / "out2"), cfg, plan)
    assert open(other.output, "rb").read() == open(stats.output, "rb").read()


def test_run_caption_with_an_endpoint_and_the_plan(tmp_path):
    previous = _annotated_shard(tmp_path / "annotated.parquet")
    assert not plan_run(Config(profile="offline")).stages["caption"].on  # annotate is off there
    assert not Caption.plan(Config(text={"caption_path": "flip80m"})).on
    with FakeVLLM() as server:
        cfg = Config(profile="offline", llm={"endpoint": server.url, "model": MODEL, "backoff_s": 0.01})
        plan = Caption.plan(cfg)
        assert plan.on and f"llm:{MODEL}@" in plan.model and plan.info["rewrite"] == "on"
        stats = run_stage(Caption, previous, str(tmp_path / "out"), cfg, plan)
        data = pq.read_table(stats.output)
        assert data.column("caption_check").to_pylist() == [PASSED] * 3
        assert data.column("caption_model").to_pylist() == [MODEL] * 3
        assert stats.extra["rewrites_passed"] == 3 and server.requests == 3
        assert (tmp_path / "out" / "cache" / "llm").is_dir()
        # Changing sampling settings re-keys the stage; the cache is keyed by them too.
        hotter = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"temperature": 0.2})})
        assert run_stage(Caption, previous, str(tmp_path / "out"), hotter, plan).key != stats.key
        assert server.requests == 6
        with pytest.raises(ConfigError, match="not served"):
            Caption.plan(cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"model": "other"})}))
    with pytest.raises(ConfigError, match="did not answer"):
        Caption.plan(cfg)


def test_every_attribute_name_is_known_to_the_lexicon(lexicon):
    assert {name for name, _, _ in lexicon.patterns} == set(ATTRIBUTES)


def _write_cache_entries(args) -> int:
    cache_dir, worker = args
    client = LLMClient(LLMSettings(endpoint="http://127.0.0.1:9/v1"), cache_dir)
    for round_ in range(30):
        for i in range(10):
            client._cache_put(client.cache_key(conversation(f"text {i}")), f"reply {i} " + "x" * 2000)
    return worker


def test_cache_is_safe_with_several_processes_writing_the_same_keys(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        assert sorted(pool.map(_write_cache_entries, [(tmp_path, 0), (tmp_path, 1)])) == [0, 1]
    client = LLMClient(LLMSettings(endpoint="http://127.0.0.1:9/v1"), tmp_path)
    results = client.chat_many([conversation(f"text {i}") for i in range(10)])
    assert all(r.cached for r in results) and client.stats.requests == 0
    assert [r.text.split(" x")[0] for r in results] == [f"reply {i}" for i in range(10)]
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_caption_preview_rewrites_and_checks_with_an_endpoint(capsys, tmp_path):
    from facecap.cli import main

    with FakeVLLM(always("hallucinating")) as server:
        code = main(["caption-preview", "--attributes", "Male,Smiling,Black_Hair", "-n", "2",
                     "--set", f"llm.endpoint={server.url}", "--set", f"llm.model={MODEL}",
                     "--set", f"llm.cache_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and server.requests == 2
    assert out.count("raw: ") == 2 and out.count("check:   hallucination: Goatee, Wearing_Hat") == 2
    assert "0 of 2 rewrites passed" in out


def test_min_similarity_gates_rewrites_in_the_stage(tmp_path):
    # The stand-in's faithful rewrite merges sentences; MiniLM scores it about 0.98-0.99 against the raw text.
    with FakeVLLM() as server:
        strict = Captioner(CaptionSettings(min_similarity=0.999, max_attempts=2), llm(server), tmp_path)
        counters = Counters()
        (outcome,) = strict.caption_many(ITEMS[:1], counters)
        assert outcome.check.startswith("low_similarity") and outcome.caption == outcome.raw
        assert counters.extra["fallback_low_similarity"] == 1
        lenient = Captioner(CaptionSettings(min_similarity=0.5, max_attempts=2), llm(server), tmp_path)
        (outcome,) = lenient.caption_many(ITEMS[:1], Counters())
        assert outcome.check == PASSED and outcome.caption == faithful(outcome.raw)
