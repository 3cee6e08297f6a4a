"""What the demo shows: the example data's people, their alt-text, and the face-caption pairs a curate makes of them."""

from __future__ import annotations

import io
import json
import re
from html import escape
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from helpers import example_sources, run_curate
from PIL import Image
from test_detect import _detect

from facecap import example_data
from facecap.config import Config
from facecap.package_photos import photo_bytes
from facecap.schema import image_id_for
from facecap.text.clean import clean_text
from facecap.text.keywords import KeywordMatcher


def test_the_example_data_holds_several_distinct_people(example_dir, detector):
    folder = example_dir / "folder"
    for name, packaged in (("kafka.jpg", "kafka"), ("group.jpg", "group"), ("hanks.png", "hanks")):
        assert (folder / name).read_bytes() == photo_bytes(packaged), name  # the real photos, not look-alikes
    photos = {name: (folder / name).read_bytes() for name in ("astronaut.png", "kafka.jpg", "group.jpg", "hanks.png")}
    kept, rejects, _ = _detect(detector, photos)
    name_of = {image_id_for("mem://test", name): name for name in photos}
    faces = {}
    for image_id in kept.column("image_id").to_pylist():
        faces[name_of[image_id]] = faces.get(name_of[image_id], 0) + 1
    assert faces == {"astronaut.png": 1, "kafka.jpg": 1, "group.jpg": 6}
    assert sum(faces.values()) == example_data.DISTINCT_PEOPLE
    # Tom Hanks' 112 px face is found but holds fewer real pixels than detect.min_face_px.
    assert {(name_of[r["image_id"]], r["reason"]) for r in rejects.to_pylist()} == {("hanks.png", "too_small")}


def test_face_images_carry_alt_text_the_text_path_must_judge():
    matcher = KeywordMatcher.from_file()
    verdicts, cleaned_some = set(), False
    for _, caption in {**example_data.face_images(), **example_data.people_images()}.values():
        c = clean_text(caption)
        verdicts.add("no_caption" if not c.text else "face_caption" if matcher.find(c.text) else "not_face_caption")
        cleaned_some |= bool(c.text) and len(c.text) < len(caption)
    assert verdicts == {"face_caption", "not_face_caption", "no_caption"}
    assert cleaned_some, "some alt-text must be noisy enough for the pre-cleaner to remove something"


def test_with_no_attribute_model_the_text_stage_says_no_stage_captions():
    from facecap.chain import plan_run
    from facecap.stages.text import NO_CAPTION_PATH, Text

    plan = plan_run(Config(profile="offline")).stages
    assert not plan["annotate"].on and not plan["caption"].on
    assert not plan["text"].on and plan["text"].why.startswith(NO_CAPTION_PATH)
    notes = Text.card_notes({"stages": {"text": {"status": "off", "why": plan["text"].why}}})
    assert "NO CAPTIONS" in notes["warning"] and "text.caption_path=flip80m" in notes["warning"]
    flip = plan_run(Config(profile="offline", text={"caption_path": "flip80m"})).stages
    assert flip["text"].on and Text.card_notes({"stages": {"text": {"status": "on"}}}) == {}


@pytest.fixture(scope="module")
def demo_release(prefect_api_url, example_dir, tmp_path_factory) -> Path:
    """The demo's curate: offline, the FLIP-80M text path, every other setting at its default."""
    out = tmp_path_factory.mktemp("demo") / "out"
    cfg = Config.model_validate({"profile": "offline", "text": {"caption_path": "flip80m"},
                                 "execution": {"n_workers": 2}})
    run_curate(example_sources(example_dir), out, cfg)
    return out


def test_the_demo_release_holds_one_face_per_person_with_its_alt_text_caption(demo_release):
    data = ds.dataset(demo_release / "release" / "data", format="parquet").to_table(
        columns=["sample_id", "source_offset", "caption", "text_caption", "source_caption", "text_verdict"]).to_pylist()
    assert len(data) == example_data.DISTINCT_PEOPLE
    assert all(r["caption"] and r["caption"] == r["text_caption"] and r["text_verdict"] == "face_caption"
               for r in data)
    assert {r["source_offset"] for r in data if r["source_offset"] in ("kafka.jpg", "group.jpg")} == {"kafka.jpg",
                                                                                                     "group.jpg"}
    group = [r for r in data if r["source_offset"] == "group.jpg"]
    assert len(group) == 6 and "Stock Photo" in group[0]["source_caption"] and "Stock" not in group[0]["caption"]


def test_pairs_prints_crops_and_captions_of_distinct_faces(demo_release, tmp_path, capsys):
    from facecap.cli import main

    to = tmp_path / "pairs"
    assert main(["pairs", str(demo_release), "--n", "6", "--to", str(to)]) == 0
    printed = capsys.readouterr().out
    pairs = re.findall(r"^(\S+\.jpg)\n    caption: (.+)\n    from:    (.+)$", printed, re.MULTILINE)
    assert len(pairs) == 6
    release = {r["sample_id"]: r for r in ds.dataset(demo_release / "release" / "data", format="parquet").to_table(
        columns=["sample_id", "image_id", "caption", "dedup_cluster", "image"]).to_pylist()}
    ids = [Path(path).stem for path, _, _ in pairs]
    assert len(set(ids)) == 6 and len({release[i]["dedup_cluster"] for i in ids}) == 6
    assert len({release[i]["image_id"] for i in ids}) == 3, "the first pairs spread over the astronaut, Kafka, group"
    for (path, caption, source), sample_id in zip(pairs, ids):
        crop = Path(path).read_bytes()
        assert Path(path).parent == to and crop == release[sample_id]["image"]["bytes"]
        assert Image.open(io.BytesIO(crop)).format == "JPEG"
        assert caption == release[sample_id]["caption"] and caption.strip()
        assert source.startswith("alt-text (FLIP-80M path)") and "keyword filter" in source


def test_pairs_refuses_a_release_without_captions(demo_release, tmp_path, capsys):
    import shutil

    import pyarrow.parquet as pq

    from facecap.cli import main

    copy = tmp_path / "release"
    shutil.copytree(demo_release / "release", copy)
    for f in (copy / "data").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["caption"]), f)
    assert main(["pairs", str(copy), "--to", str(tmp_path / "pairs")]) == 1
    assert "no caption column" in capsys.readouterr().err and not (tmp_path / "pairs").exists()


def test_the_report_gallery_shows_captions_and_where_they_came_from(demo_release):
    report = json.loads((demo_release / "release" / "report" / "report.json").read_text())
    captions = {r["sample_id"]: r["caption"] for r in ds.dataset(
        demo_release / "release" / "data", format="parquet").to_table(columns=["sample_id", "caption"]).to_pylist()}
    gallery = report["gallery"]
    # A row-group sample spread over the split files: most of a small release, not necessarily all of it.
    assert len(captions) // 2 <= len(gallery) <= len(captions)
    assert len({face["sample_id"] for face in gallery}) == len(gallery)
    for face in gallery:
        assert face["caption"] == captions[face["sample_id"]] and face["caption"]
        assert face["caption_source"].startswith("alt-text (FLIP-80M path)")
    html = (demo_release / "release" / "report" / "index.html").read_text()
    assert html.count("caption source: alt-text (FLIP-80M path)") == len(gallery)
    assert all(escape(face["caption"]) in html for face in gallery)


def test_caption_source_tells_the_paths_apart():
    from facecap.quality.report import caption_source

    grammar = {"caption": "A smiling man.", "caption_model": "none", "caption_check": "not_rewritten",
               "attribute_model": "classifier:model@sha256:abc"}
    assert caption_source(grammar).startswith("grammar: attributes from classifier:model@sha256:abc")
    assert "not rewritten (no LLM)" in caption_source(grammar)
    rewritten = grammar | {"caption_model": "Qwen/Qwen2.5-7B-Instruct", "caption_check": "passed"}
    assert "rewritten by Qwen/Qwen2.5-7B-Instruct" in caption_source(rewritten)
    fallback = grammar | {"caption_model": "Qwen/Qwen2.5-7B-Instruct", "caption_check": "omission: Smiling"}
    assert "was not used (omission: Smiling)" in caption_source(fallback)
    alt = {"caption": "smiling girl", "text_verdict": "face_caption", "text_denoise": "llm",
           "text_filter": "minilm-logistic:abc"}
    assert caption_source(alt) == ("alt-text (FLIP-80M path): judged about a face by minilm-logistic:abc, "
                                   "denoised by the LLM")
    assert caption_source({"caption": None}).startswith("no caption")
