"""Annotate stage and attribute backends: thresholds, few_attributes, contradiction rules, provenance, planning.

Models are tiny randomly initialised ViT / CLIP models of the real architectures
(tests/attribute_helpers.py): their probabilities mean nothing, so the tests
derive every expectation from the probabilities the model actually returns.
"""

from __future__ import annotations

import io
import json
import shutil
from importlib import resources

import numpy as np
import pyarrow as pa
import pytest
from attribute_helpers import tiny_classifier_dir, tiny_clip_dir, write_calibration
from PIL import Image
from skimage import data as skdata

from facecap.attributes import CONTRADICTIONS, INDEX
from facecap.settings import ConfigError
from facecap.config import Config
from facecap.models.attributes import (ClassifierAttributeModel, ZeroShotAttributeModel, locate_model,
                                       load_attribute_model, model_identity)
from facecap.models.weights import WeightsError
from facecap.schema import IMAGE_SCHEMA, Reason, extend_schema
from facecap.stages.annotate import ATTRIBUTE_FIELDS, AnnotateReason
from facecap.stages.detect import FACE_SCHEMA
from facecap.stages.annotate import ANNOTATED_SCHEMA, Annotate, annotate_faces, resolve_attributes

# What annotate reads: detect's face columns joined with their source image's columns.
FACE_VIEW = extend_schema(FACE_SCHEMA, [f for f in IMAGE_SCHEMA if f.name not in ('image_id', 'source_image', 'source_size', 'source_fingerprint')])
from facecap.stages.base import Counters


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def face_table(n: int = 10) -> pa.Table:
    """Face records in detect's schema, cut from NASA's astronaut portrait (real photo) at shifting offsets."""
    photo = skdata.astronaut()
    rows = []
    for i in range(n):
        y, x = 10 + 7 * i, 140 + 5 * i
        crop = photo[y:y + 200, x:x + 200]
        if i % 2:
            crop = crop[:, ::-1].copy()
        rows.append({
            "sample_id": f"img{i:02d}-00", "image_id": f"img{i:02d}", "source": "/data/folder",
            "source_offset": f"astronaut_{i}.png", "source_caption": "an astronaut", "source_meta": None,
            "source_width": 512, "source_height": 512, "source_format": "PNG", "face_index": 0,
            "image": _jpeg(np.ascontiguousarray(crop)), "width": 200, "height": 200, "det_score": 0.99,
            "bbox": [float(x), float(y), x + 150.0, y + 180.0], "landmarks": [float(v) for v in range(10)],
            "crop_box": [float(x), float(y), x + 200.0, y + 200.0], "align_angle": 0.0,
            "detector": "retinaface-mobilenet0.25@sha256:test", "det_min_score": 0.98, "min_face_px": 128,
            "crop_margin": 0.2})
    return pa.Table.from_pylist(rows, schema=FACE_VIEW)


def _settings(**kw):
    return Config(attributes=kw).attributes


def _run(model, table, **settings):
    counters = Counters()
    chunks = list(annotate_faces(table.to_batches(max_chunksize=4), model, _settings(**settings),
                                 Config().image, counters))
    kept = [c.kept for c in chunks if c.kept is not None]
    rejects = [c.rejected for c in chunks if c.rejected is not None]
    return (pa.concat_tables(kept) if kept else ANNOTATED_SCHEMA.empty_table(),
            pa.concat_tables(rejects) if rejects else None, counters)


# --- rules ------------------------------------------------------------------------
def _probs(**values) -> np.ndarray:
    p = np.full(40, 0.5, np.float32)
    for name, v in values.items():
        p[INDEX[name]] = v
    return p


def test_keep_and_absent_thresholds_are_strict_and_in_celeba_order():
    p = _probs(Young=0.9, Smiling=0.85, Male=0.86, Bald=0.1, Eyeglasses=0.15, Wearing_Hat=0.149)
    result = resolve_attributes(p, keep_threshold=0.85, absent_threshold=0.15)
    assert result.kept == ["Male", "Young"]  # 0.85 is not above 0.85; CelebA order, not probability order
    assert result.absent == ["Bald", "Wearing_Hat"]
    assert result.rules == []


def test_contradictions_keep_the_more_probable_side_and_record_the_rule():
    p = _probs(Bald=0.9, Black_Hair=0.95, Bangs=0.88, No_Beard=0.97, Goatee=0.9, Mustache=0.86,
               Straight_Hair=0.87, Wavy_Hair=0.93)
    result = resolve_attributes(p, 0.85, 0.15)
    # Rules apply in table order: Bald (0.9) beats Bangs (0.88), then Black_Hair (0.95) beats Bald.
    assert "Bangs" not in result.kept and "Bald" not in result.kept and "Black_Hair" in result.kept
    assert "No_Beard" in result.kept and "Goatee" not in result.kept and "Mustache" not in result.kept
    assert "Wavy_Hair" in result.kept and "Straight_Hair" not in result.kept
    assert result.rules == ["bald_vs_bangs", "bald_vs_hair_colour", "no_beard_vs_facial_hair", "straight_vs_wavy"]
    # What survives never contains both sides of any rule.
    for rule in CONTRADICTIONS:
        assert not (set(rule.left) & set(result.kept) and set(rule.right) & set(result.kept))


def test_facial_hair_beats_no_beard_when_more_probable():
    result = resolve_attributes(_probs(No_Beard=0.9, Goatee=0.99, Sideburns=0.86), 0.85, 0.15)
    assert "No_Beard" not in result.kept and {"Goatee", "Sideburns"} <= set(result.kept)
    assert result.rules == ["no_beard_vs_facial_hair"]


# --- backends ----------------------------------------------------------------------
def test_classifier_backend_shapes_identity_and_calibration(classifier_dir, tmp_path):
    cfg = Config(profile="offline", attributes={"backend": "classifier", "model": str(classifier_dir)})
    model = load_attribute_model(cfg)
    assert isinstance(model, ClassifierAttributeModel)
    assert model.identity.startswith("classifier:tiny-vit@sha256:") and len(model.identity.split(":")[-1]) == 16
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in face_table(3).column("image").to_pylist()]
    probs = model.predict(images)
    assert probs.shape == (3, 40) and probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    # Head columns are mapped by id2label: a logit permutation in the checkpoint must not move attributes.
    logits = model.logits(images)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5)

    calibrated = tmp_path / "calibrated"
    shutil.copytree(classifier_dir, calibrated)
    write_calibration(calibrated, scale=0.0, bias=2.0)  # every probability becomes sigmoid(2)
    other = ClassifierAttributeModel(locate_model(cfg.model_copy(update={"attributes": cfg.attributes.model_copy(
        update={"model": str(calibrated)})})))
    np.testing.assert_allclose(other.predict(images), 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    assert other.identity != model.identity, "the calibration file is part of the model identity"


def test_classifier_without_celeba_labels_or_safetensors_is_refused(classifier_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(classifier_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(40)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(40)}
    (bad / "config.json").write_text(json.dumps(config))
    cfg = Config(profile="offline", attributes={"backend": "classifier", "model": str(bad)})
    with pytest.raises(WeightsError, match="id2label"):
        ClassifierAttributeModel(locate_model(cfg))
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="safetensors"):
        ClassifierAttributeModel(locate_model(cfg))


def test_zero_shot_backend_loads_a_clip_checkpoint_and_uses_its_prompts(clip_dir, tmp_path):
    cfg = Config(profile="offline", attributes={"backend": "zero-shot", "model": str(clip_dir)})
    model = load_attribute_model(cfg)
    assert isinstance(model, ZeroShotAttributeModel)
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in face_table(4).column("image").to_pylist()]
    probs = model.predict(images)
    assert probs.shape == (4, 40) and ((probs >= 0) & (probs <= 1)).all()
    # Uncalibrated: CLIP's own two-way softmax over the prompt pair at its learned temperature.
    temperature = float(model.model.logit_scale.detach().exp())
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-model.logits(images) * temperature)), rtol=1e-4)

    # A model directory's own prompts change the outputs and the identity.
    own = tmp_path / "own-prompts"
    shutil.copytree(clip_dir, own)
    builtin = json.loads(resources.files("facecap.data").joinpath("attribute_prompts.json").read_text())
    builtin["attributes"]["Bald"] = {"positive": ["a shiny head", "no hair at all"], "negative": "long hair"}
    (own / "attribute_prompts.json").write_text(json.dumps(builtin))
    other = ZeroShotAttributeModel(locate_model(Config(profile="offline", attributes={"model": str(own)})))
    assert other.identity != model.identity
    changed = np.abs(other.logits(images) - model.logits(images)).max(axis=0)
    assert changed[INDEX["Bald"]] > 0 and np.all(np.delete(changed, INDEX["Bald"]) < 1e-5)


# --- the stage -----------------------------------------------------------------------
def test_annotate_keeps_faces_with_enough_labels_and_rejects_the_rest(classifier_dir):
    cfg = Config(profile="offline", attributes={"backend": "classifier", "model": str(classifier_dir)})
    model = load_attribute_model(cfg)
    table = face_table(10)
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in table.column("image").to_pylist()]
    probs = model.predict(images)
    # A random model's outputs barely depend on the image: pick the keep threshold where the faces' label
    # counts differ most, and min_attributes between them, so both outcomes occur.
    def counts_at(threshold):
        return [len(resolve_attributes(p, threshold, 0.3).kept) for p in probs]

    keep = float(max(np.unique(probs), key=lambda t: (np.ptp(counts_at(t)), -abs(t - 0.5))))
    counts = counts_at(keep)
    minimum = max(counts)
    want_kept = [table.column("sample_id")[i].as_py() for i, c in enumerate(counts) if c >= minimum]
    assert 0 < len(want_kept) < 10

    kept, rejects, counters = _run(model, table, keep_threshold=keep, absent_threshold=0.3, min_attributes=minimum,
                                   batch_size=3)
    assert kept.schema.equals(ANNOTATED_SCHEMA)
    assert kept.column("sample_id").to_pylist() == want_kept
    assert kept.num_rows + rejects.num_rows == table.num_rows == counters.rows_in
    assert set(rejects.column("reason").to_pylist()) == {AnnotateReason.FEW_ATTRIBUTES}
    assert set(rejects.column("stage").to_pylist()) == {"annotate"}
    assert counters.rows_out == kept.num_rows and counters.rejects[AnnotateReason.FEW_ATTRIBUTES] == rejects.num_rows
    detail = rejects.column("detail")[0].as_py()
    assert f"min_attributes={minimum}" in detail and "keep_threshold" in detail
    assert rejects.column("det_score").to_pylist() == [pytest.approx(0.99)] * rejects.num_rows

    # Provenance and attribute columns.
    by_id = {s: i for i, s in enumerate(table.column("sample_id").to_pylist())}
    for row in kept.to_pylist():
        i = by_id[row["sample_id"]]
        np.testing.assert_allclose(row["attribute_probs"], probs[i], rtol=1e-6)
        result = resolve_attributes(probs[i], keep, 0.3)
        assert row["attributes"] == result.kept and len(row["attributes"]) >= minimum
        assert row["absent_attributes"] == result.absent and row["attribute_rules"] == result.rules
        assert row["attribute_model"] == model.identity
        assert row["attr_keep_threshold"] == pytest.approx(keep) and row["attr_absent_threshold"] == pytest.approx(0.3)
    # Written once: annotate adds only sample_id and its own columns (the crop stays in detect's output).
    assert kept.column_names == ["sample_id"] + [f.name for f in ATTRIBUTE_FIELDS]


def test_min_attributes_zero_keeps_every_face_and_a_broken_crop_is_a_reject(classifier_dir):
    model = load_attribute_model(Config(profile="offline", attributes={"backend": "classifier",
                                                                      "model": str(classifier_dir)}))
    table = face_table(4)
    rows = table.to_pylist()
    rows[2]["image"] = rows[2]["image"][:200]  # truncated JPEG
    kept, rejects, counters = _run(model, pa.Table.from_pylist(rows, schema=FACE_VIEW), min_attributes=0)
    assert kept.num_rows == 3 and rejects.num_rows == 1
    assert rejects.column("reason")[0].as_py() == Reason.DECODE_ERROR
    assert rejects.column("sample_id")[0].as_py() == rows[2]["sample_id"]


# --- planning --------------------------------------------------------------------------
def test_offline_without_a_local_model_plans_annotate_off_with_the_reason():
    plan = Annotate.plan(Config(profile="offline"))
    assert not plan.on and "attributes.model" in plan.why
    plan = Annotate.plan(Config(profile="offline", attributes={"model": "openai/clip-vit-base-patch16"}))
    assert not plan.on and "not a local directory" in plan.why


def test_local_model_turns_annotate_on_with_its_identity(classifier_dir):
    cfg = Config(profile="offline", attributes={"backend": "classifier", "model": str(classifier_dir)})
    plan = Annotate.plan(cfg)
    assert plan.on and plan.model == model_identity(locate_model(cfg))
    assert plan.info["min_attributes"] == 6 and plan.info["keep_threshold"] == 0.85


def test_a_model_that_does_not_fit_the_backend_stops_the_plan(classifier_dir, clip_dir):
    with pytest.raises(ConfigError, match="backend=classifier"):
        Annotate.plan(Config(profile="offline", attributes={"backend": "zero-shot", "model": str(classifier_dir)}))
    with pytest.raises(ConfigError, match="backend=zero-shot"):
        Annotate.plan(Config(profile="offline", attributes={"backend": "classifier", "model": str(clip_dir)}))


def test_full_profile_without_hub_access_says_what_to_place_where(tmp_path):
    # Hub boundary: no model hub is reachable from here, so this exercises the real fetch failing.
    # (The full profile's default backend is farl, tested in test_annotate_farl.py; zero-shot is chosen here.)
    cfg = Config(profile="full", attributes={"backend": "zero-shot"}, models={"cache_dir": str(tmp_path)})
    with pytest.raises(WeightsError) as err:
        Annotate.plan(cfg)
    message = str(err.value)
    assert "openai/clip-vit-base-patch16" in message and "attributes.model" in message
    assert "--profile offline" in message
    with pytest.raises(ConfigError, match="attributes.model"):
        Annotate.plan(Config(profile="full", attributes={"backend": "classifier"}))
    with pytest.raises(WeightsError, match="not a directory"):
        Annotate.plan(Config(profile="full", attributes={"backend": "zero-shot",
                                                         "model": str(tmp_path / "missing" / "model")}))


def test_calibrate_attributes_fits_and_writes_a_zero_shot_calibration(clip_dir, tmp_path, capsys):
    from attribute_helpers import write_celeba_official

    from facecap.cli import main

    model_dir = tmp_path / "clip"
    shutil.copytree(clip_dir, model_dir)
    before = ZeroShotAttributeModel(locate_model(Config(profile="offline", attributes={"model": str(model_dir)})))
    data, _ = write_celeba_official(tmp_path / "celeba", n=40)
    assert main(["calibrate-attributes", str(data), "--model", str(model_dir), "--profile", "offline"]) == 0
    assert "mean AP" in capsys.readouterr().out
    calibration = json.loads((model_dir / "attribute_calibration.json").read_text())
    metrics = json.loads((model_dir / "calibration_metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["samples"] == 6
    after = ZeroShotAttributeModel(locate_model(Config(profile="offline", attributes={"model": str(model_dir)})))
    assert after.identity != before.identity, "a new calibration must rerun annotate"
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in face_table(2).column("image").to_pylist()]
    logits = after.logits(images)
    np.testing.assert_allclose(logits, before.logits(images), rtol=1e-5)
    z = logits * np.asarray(calibration["scale"]) + np.asarray(calibration["bias"])
    np.testing.assert_allclose(after.predict(images), 1 / (1 + np.exp(-z)), rtol=1e-4)
