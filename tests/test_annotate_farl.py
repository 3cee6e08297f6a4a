"""The annotate stage with the farl backend, end to end on a real photo; and uncalibrated zero-shot marking.

The FaRL checkpoint here has the published key layout (facecap/data/farl_celeba_keys.txt)
but RANDOM weights: its 40 probabilities mean nothing. These tests prove only the
plumbing: annotate plans FaRL's identity (with the file's sha256), reads the source
image again with detect's landmarks (not the margin crop), writes 40 probabilities
per face through the real runner, rejects sources that changed, and refuses a
missing or unpinned file before any work.

The zero-shot CLIP is a tiny randomly initialised one (tests/attribute_helpers.py):
only its calibration status matters here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from attribute_helpers import tiny_clip_dir, write_calibration
from helpers import offline_config,  published_layout
from PIL import Image

from facecap.chain import plan_run
from facecap.config import Config
from facecap.example_data import astronaut, generated
from facecap.models.attributes import load_attribute_model
from facecap.models.farl import FARL_CELEBA_FILE, FARL_CELEBA_URL, FarlAttributes
from facecap.models.weights import WeightsError
from facecap.runner import run_ingest, run_stage
from facecap.schema import Reason
from facecap.shards import ShardInput
from facecap.sources.plan import plan_shards
from facecap.stages.annotate import Annotate
from facecap.stages.detect import Detect


def _published_layout() -> list[tuple[str, tuple[int, ...]]]:
    return published_layout("farl_celeba_keys.txt")


@pytest.fixture(scope="module")
def farl_file(tmp_path_factory) -> Path:
    """RANDOM weights in facer's layout, saved as facer's file is (torch.save of the state dict). Not real weights."""
    torch.set_num_threads(2)
    pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(11)) * 0.05
    state = {}
    for i, (name, shape) in enumerate(_published_layout()):
        n = math.prod(shape)  # slices of one random pool: 86M fresh normals cost seconds on a busy machine
        if n < pool.numel():
            values = pool[(i * 7919) % (pool.numel() - n):][:n]
        else:
            values = pool.repeat(n // pool.numel() + 1)[:n]
        state[name] = values.reshape(shape).clone()
    path = tmp_path_factory.mktemp("farl") / FARL_CELEBA_FILE
    torch.save(state, path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _farl_config(farl_file: Path, **attributes) -> Config:
    # A local model turns annotate on in the offline profile; min_attributes=0 keeps every face of a random model.
    return offline_config(attributes={"backend": "farl", "model": str(farl_file), "min_attributes": 0, **attributes})


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    face = astronaut()
    (root / "a.jpg").write_bytes(_jpeg(face))
    (root / "b.jpg").write_bytes(_jpeg(face.rotate(8).resize((600, 600))))
    (root / "noface.jpg").write_bytes(_jpeg(generated("noise", seed=1)))
    return root


def _ingest_and_detect(photos: Path, out: Path, cfg: Config) -> ShardInput:
    specs, _ = plan_shards([str(photos)], cfg.ingest)
    ingested = run_ingest(specs[0], str(out), cfg)
    shard = ShardInput(specs[0], (ingested.ref,), {"ingest": cfg.ingest.model_dump(mode="json"),
                                                   "image": cfg.image.model_dump(mode="json")})
    detected = run_stage(Detect, shard, str(out), cfg, plan_run(cfg).stages["detect"])
    return shard.then(detected.ref)


@pytest.mark.slow
def test_farl_annotates_faces_from_the_source_image_and_landmarks(farl_file, photos, tmp_path):
    cfg = _farl_config(farl_file)
    plan = plan_run(cfg).stages["annotate"]
    assert plan.on and plan.model == f"farl:farl-vit-b16-celeba40@sha256:{_sha256(farl_file)[:16]}"
    assert plan.info["backend"] == "farl" and plan.info["calibration"] == "sigmoid"
    assert Annotate(cfg, plan).reads == Annotate.farl_reads, "farl reads the source and landmarks, not the crop"

    out = tmp_path / "out"
    shard = _ingest_and_detect(photos, out, cfg)
    annotated = run_stage(Annotate, shard, str(out), cfg, plan)
    table = pq.read_table(annotated.output)
    faces = pq.read_table(shard.outputs[-1].data).to_pylist()
    assert table.num_rows == len(faces) >= 2 and annotated.rejects == {}
    probs = np.asarray(table.column("attribute_probs").to_pylist(), np.float32)
    assert probs.shape == (len(faces), 40) and ((probs >= 0) & (probs <= 1)).all()
    assert set(table.column("attribute_model").to_pylist()) == {plan.model}

    # The stage scored each face on its source image and detect's landmarks (FaRL's own alignment), not the crop.
    model = FarlAttributes(farl_file)
    by_offset = {}
    for face in faces:
        source = next(r for r in pq.read_table(shard.outputs[0].data).to_pylist() if r["image_id"] == face["image_id"])
        by_offset[face["sample_id"]] = source["source_offset"]
    expected = model.predict([(np.asarray(Image.open(photos / by_offset[f["sample_id"]]).convert("RGB")),
                               np.asarray(f["landmarks"]).reshape(5, 2)) for f in faces])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    from_crops = model.predict([(np.asarray(Image.open(io.BytesIO(f["image"])).convert("RGB")),
                                 np.asarray(f["landmarks"]).reshape(5, 2)) for f in faces])
    assert not np.allclose(probs, from_crops, atol=1e-3), "landmarks are in source pixels: the crop is not used"

    # A source that changed after ingest is a reject with its reason, as in detect.
    (photos / "b.jpg").write_bytes(_jpeg(generated("shapes", seed=3)))
    again = run_stage(Annotate, shard, str(tmp_path / "out2"), cfg, plan)
    rejects = pq.read_table(again.rejects_output).to_pylist()
    changed = [r for r in rejects if r["reason"] == Reason.SOURCE_CHANGED]
    assert changed and {r["source_offset"] for r in changed} == {"b.jpg"}
    assert again.rows_out == sum(by_offset[f["sample_id"]] == "a.jpg" for f in faces)


def test_a_missing_farl_file_says_where_to_place_it(tmp_path):
    cfg = Config(profile="full", models={"cache_dir": str(tmp_path / "cache")})
    assert cfg.attributes.backend == "farl", "farl is the full profile's default"
    with pytest.raises(WeightsError) as err:
        Annotate.plan(cfg)
    message = str(err.value)
    assert FARL_CELEBA_URL in message and str(tmp_path / "cache" / FARL_CELEBA_FILE) in message
    assert "facecap models fetch --profile full" in message and "--profile offline" in message
    # Offline, a missing file (or none given) leaves the stage off, saying why.
    assert Config(profile="offline").attributes.backend == "zero-shot"
    off = Annotate.plan(_farl_config(tmp_path / "nowhere.pt"))
    assert not off.on and "not a local file" in off.why
    assert not Annotate.plan(offline_config(attributes={"backend": "farl"})).on


def test_a_wrong_weights_sha256_is_refused(farl_file):
    with pytest.raises(WeightsError, match="weights_sha256") as err:
        plan_run(_farl_config(farl_file, weights_sha256="0" * 64))
    assert _sha256(farl_file) in str(err.value)
    with pytest.raises(WeightsError, match="weights_sha256"):
        load_attribute_model(_farl_config(farl_file, weights_sha256="0" * 64))  # a worker refuses it too
    pinned = plan_run(_farl_config(farl_file, weights_sha256=_sha256(farl_file).upper()))
    assert pinned.stages["annotate"].model == plan_run(_farl_config(farl_file)).stages["annotate"].model, \
        "the pin is checked, not keyed: the identity already holds the hash"


# --- zero-shot without a fitted calibration --------------------------------------------------
@pytest.mark.slow
def test_uncalibrated_zero_shot_is_marked_in_plan_card_and_report(tmp_path):
    from quality_helpers import write_synthetic_release

    from facecap.quality.validate import validate_release

    clip = tiny_clip_dir(tmp_path / "clip")
    cfg = offline_config(attributes={"backend": "zero-shot", "model": str(clip)})
    summary = plan_run(cfg).summary()["annotate"]
    assert summary["calibration"] == "uncalibrated"

    fitted = tmp_path / "clip-fitted"
    shutil.copytree(clip, fitted)
    write_calibration(fitted, 1.0, 0.0)
    assert plan_run(offline_config(attributes={"backend": "zero-shot", "model": str(fitted)})) \
        .summary()["annotate"]["calibration"] == "fitted"

    staged = write_synthetic_release(tmp_path / "release", n_images=8, annotate=summary)
    validate_release(str(staged), log=lambda _line: None)
    assert json.loads((staged / "release.json").read_text())["stages"]["annotate"]["calibration"] == "uncalibrated"
    card = (staged / "README.md").read_text()
    assert "> **Warning: UNCALIBRATED attribute probabilities" in card and "calibration: **uncalibrated**" in card
    html = (staged / "report" / "index.html").read_text()
    assert '<div class="banner warn">UNCALIBRATED attribute probabilities' in html
    assert "<b>uncalibrated</b>" in html

    calibrated = write_synthetic_release(tmp_path / "release2", n_images=8,
                                         annotate={**summary, "calibration": "fitted"})
    validate_release(str(calibrated), log=lambda _line: None)
    assert "uncalibrated" not in (calibrated / "README.md").read_text().lower()
    assert "uncalibrated" not in (calibrated / "report" / "index.html").read_text().lower()


def test_source_faces_share_a_decode_bound_memory_and_reject_bad_sources(monkeypatch):
    """annotate_faces with a stub model that records its calls (no network involved, nothing meaningful scored)."""
    import pyarrow as pa

    from facecap.settings import ImageLimits
    from facecap.stages.annotate import AttributeSettings
    from facecap.stages import annotate
    from facecap.stages.base import Counters

    class Stub:
        identity = "stub"
        calls: list[list[int]] = []

        def predict(self, faces):
            self.calls.append([id(rgb) for rgb, _ in faces])
            return np.full((len(faces), 40), 0.9, np.float32)

    photo = _jpeg(astronaut())
    points = [180.0, 110.0, 240.0, 110.0, 210.0, 140.0, 185.0, 170.0, 235.0, 170.0]
    rows = [  # image_id, face index, source bytes, source problem, landmarks
        ("img-a", 0, photo, None, points), ("img-a", 1, photo, None, points),
        ("img-b", 0, photo, None, points), ("img-c", 0, None, "source file differs from what ingest read", points),
        ("img-d", 0, b"not an image", None, points), ("img-e", 0, photo, None, [float("nan")] * 10)]
    table = pa.table({
        "image_id": [r[0] for r in rows], "sample_id": [f"{r[0]}-{r[1]}" for r in rows],
        "source": ["/photos"] * len(rows), "source_offset": [f"{r[0]}.jpg" for r in rows],
        "det_score": [0.99] * len(rows), "bbox": [[150.0, 80.0, 270.0, 200.0]] * len(rows),
        "source_image": pa.array([r[2] for r in rows], pa.binary()),
        "source_problem": pa.array([r[3] for r in rows], pa.string()),
        "landmarks": [r[4] for r in rows]})
    monkeypatch.setattr(annotate, "SOURCE_PIXEL_BUDGET", 1)  # every new source image starts a new model call
    model = Stub()
    settings = AttributeSettings(min_attributes=0)
    chunks = list(annotate.annotate_faces([table], model, settings, ImageLimits(), Counters()))
    kept = pa.concat_tables([c.kept for c in chunks if c.kept is not None])
    rejected = pa.concat_tables([c.rejected for c in chunks if c.rejected is not None]).to_pylist()
    assert kept.column("sample_id").to_pylist() == ["img-a-0", "img-a-1", "img-b-0"]
    assert [len(c) for c in model.calls] == [2, 1] and len(set(model.calls[0])) == 1, \
        "faces of one image share one decoded array and one call; the next image goes to the next call"
    reasons = {r["sample_id"]: r["reason"] for r in rejected}
    assert reasons == {"img-c-0": Reason.SOURCE_CHANGED, "img-d-0": Reason.DECODE_ERROR,
                       "img-e-0": Reason.DECODE_ERROR}, rejected
    details = {r["sample_id"]: r["detail"] for r in rejected}
    assert details["img-d-0"].startswith("source image:") and "landmarks" in details["img-e-0"]
