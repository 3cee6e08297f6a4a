"""The detect stage on real photos with the real RetinaFace mobilenet0.25 weights."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from helpers import offline_config
from PIL import Image

from facecap.example_data import astronaut, bomb_png, exif_rotated, generated
from facecap.records import in_memory_images
from facecap.stages.detect import FACE_SCHEMA
from facecap.sources.images import decode_rgb, letterbox, probe
from facecap.stages.align import eye_angle
from facecap.stages.base import Counters
from facecap.stages.detect import detect_faces


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _images(named: dict[str, bytes]) -> pa.Table:
    return in_memory_images(named, offline_config().image, "mem://test")


def _detect(detector, named: dict[str, bytes], **detect) -> tuple[pa.Table, pa.Table, Counters]:
    cfg = offline_config(detect=detect)
    counters = Counters()
    chunks = list(detect_faces([_images(named)], detector, cfg.detect, cfg.image, counters))
    kept = [c.kept for c in chunks if c.kept is not None]
    rejected = [c.rejected for c in chunks if c.rejected is not None]
    kept_t = pa.concat_tables(kept) if kept else FACE_SCHEMA.empty_table()
    rej_t = pa.concat_tables(rejected) if rejected else None
    return kept_t, rej_t, counters


def test_astronaut_is_one_confident_face(detector):
    kept, rejects, counters = _detect(detector, {"astronaut.png": _jpeg(astronaut())})
    assert rejects is None and kept.num_rows == 1
    face = kept.to_pylist()[0]
    assert face["det_score"] > 0.98
    x1, y1, x2, y2 = face["bbox"]
    # The face sits in the upper middle of the 512x512 portrait.
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200
    lm = np.array(face["landmarks"]).reshape(5, 2)
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
    assert lm[0, 0] < lm[1, 0], "left eye (image left) comes first"
    crop = Image.open(io.BytesIO(face["image"]))
    assert crop.format == "JPEG" and crop.size == (face["width"], face["height"])
    assert face["width"] >= 128 and face["sample_id"].endswith("-00")
    assert face["detector"].startswith("retinaface-mobilenet0.25@sha256:")
    assert counters.rows_in == 1 and counters.rows_out == 1


@pytest.mark.parametrize("kind", ["noise", "gradient", "shapes"])
def test_generated_non_faces_are_no_face(detector, kind):
    kept, rejects, _ = _detect(detector, {kind: _jpeg(generated(kind, seed=7))})
    assert kept.num_rows == 0
    assert rejects.column("reason").to_pylist() == ["no_face"]


def test_alignment_levels_the_eyes(detector):
    upright, _, _ = _detect(detector, {"a": _jpeg(astronaut())})
    tilted, _, _ = _detect(detector, {"t": _jpeg(astronaut().rotate(25, resample=Image.BICUBIC, expand=True))})
    base = upright.column("align_angle")[0].as_py()
    angle = tilted.column("align_angle")[0].as_py()
    # PIL rotates counter-clockwise, so the eye line tilts by -25 degrees.
    assert angle == pytest.approx(base - 25, abs=6)
    # Detect again on the aligned crop: its eyes must now be level.
    crop = np.asarray(Image.open(io.BytesIO(tilted.column("image")[0].as_py())).convert("RGB"))
    canvas, _ = letterbox(crop, 640)
    again = detector.detect(canvas[None], 0.5, 0.4)[0]
    assert again and abs(eye_angle(again[0].landmarks)) < 6


def test_two_faces_in_one_image_are_two_records(detector):
    face = astronaut()
    pair = Image.new("RGB", (1024, 512))
    pair.paste(face, (0, 0))
    pair.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    kept, _, counters = _detect(detector, {"pair": _jpeg(pair)})
    assert kept.num_rows == 2
    ids = kept.column("sample_id").to_pylist()
    assert sorted(i[-3:] for i in ids) == ["-00", "-01"] and len(set(kept.column("image_id").to_pylist())) == 1
    centres = sorted((b[0] + b[2]) / 2 for b in kept.column("bbox").to_pylist())
    assert centres[0] < 512 < centres[1]
    assert counters.extra["faces_found"] == 2


def test_exif_orientation_gives_upright_coordinates(detector):
    upright, _, _ = _detect(detector, {"a": _jpeg(astronaut())})
    sideways, _, _ = _detect(detector, {"e": exif_rotated(astronaut())})
    assert _images({"e": exif_rotated(astronaut())}).column("source_width")[0].as_py() == 512  # ingest's probe
    np.testing.assert_allclose(sideways.column("bbox")[0].as_py(), upright.column("bbox")[0].as_py(), atol=4)


def test_small_and_uncertain_faces_are_rejected_with_reasons(detector):
    small = _jpeg(astronaut().resize((160, 160)))
    kept, rejects, _ = _detect(detector, {"small": small})
    assert kept.num_rows == 0
    row = rejects.to_pylist()[0]
    assert row["reason"] == "too_small" and row["det_score"] > 0.9 and row["sample_id"].endswith("-00")
    assert "min_face_px=128" in row["detail"]
    # The same face passes when the minimum is lowered...
    kept, _, _ = _detect(detector, {"small": small}, min_face_px=32)
    assert kept.num_rows == 1
    # ...and a face below a strict score threshold is low_score, with its score recorded.
    kept, rejects, _ = _detect(detector, {"a": _jpeg(astronaut())}, min_score=0.99999)
    assert kept.num_rows == 0 and rejects.column("reason").to_pylist() == ["low_score"]
    assert 0.98 < rejects.column("det_score")[0].as_py() <= 0.99999


def test_padding_never_makes_a_face_pass_the_size_rule(detector):
    """The size rule counts real source pixels: a crop grown past the image edge does not pass on padding."""
    tight = astronaut().crop((170, 40, 300, 200))  # 130 x 160: the face box nearly fills it
    # Its crop region runs past the edges; the real part (130 x 160 px) meets min_face_px=128, and the
    # crop records how much of it is black padding.
    kept, _, _ = _detect(detector, {"tight": _jpeg(tight)})
    assert kept.num_rows == 1 and 0.1 < kept.column("pad_fraction")[0].as_py() < 0.5
    # The same photo at 112 x 138: the crop side (incl. padding) is still above 128, which used to pass;
    # only 112 real pixels across do not.
    small = tight.resize((112, 138))
    kept, rejects, _ = _detect(detector, {"small": _jpeg(small)}, min_face_px=128)
    assert kept.num_rows == 0 and rejects.column("reason").to_pylist() == ["too_small"]
    detail = rejects.column("detail")[0].as_py()
    side = float(detail.split("(side ")[1].split("px")[0])
    assert side > 128 and "holds 112x" in detail, detail
    # No photo below min_face_px on a side yields a kept face, however the detector boxes it.
    for size in ((96, 118), (120, 148), (127, 156)):
        kept, _, _ = _detect(detector, {"s": _jpeg(tight.resize(size))}, min_face_px=128)
        assert kept.num_rows == 0, size
    # A face well inside its photo has no padding.
    kept, _, _ = _detect(detector, {"a": _jpeg(astronaut())})
    assert kept.column("pad_fraction").to_pylist() == [0.0]


def test_broken_images_are_rejected_not_raised(detector):
    jpeg = _jpeg(astronaut())
    kept, rejects, counters = _detect(detector, {"truncated": jpeg[: len(jpeg) // 2], "bomb": bomb_png(),
                                                 "ok": jpeg})
    assert kept.num_rows == 1
    reasons = dict(zip(rejects.column("source_offset").to_pylist(), rejects.column("reason").to_pylist()))
    assert reasons == {"truncated": "decode_error", "bomb": "too_large"}
    assert counters.rows_in == 3


def test_detect_is_deterministic_and_batch_size_does_not_change_records(detector):
    images = {f"img{i}": _jpeg(astronaut().rotate(i * 7, expand=True)) for i in range(5)}
    a, _, _ = _detect(detector, images, batch_size=8)
    b, _, _ = _detect(detector, images, batch_size=8)
    assert a.equals(b), "same inputs and settings must give the same records"
    c, _, _ = _detect(detector, images, batch_size=1)
    assert a.column("sample_id").to_pylist() == c.column("sample_id").to_pylist()
    np.testing.assert_allclose(a.column("det_score").to_pylist(), c.column("det_score").to_pylist(), atol=1e-4)
    np.testing.assert_allclose(a.column("bbox").to_pylist(), c.column("bbox").to_pylist(), atol=0.5)


def test_decode_checks_header_before_pixels():
    cfg = offline_config()
    rgb, p = decode_rgb(bomb_png(), cfg.image)
    assert rgb is None and p.reason == "too_large" and "40000x40000" in p.detail
    assert probe(b"", cfg.image).reason == "empty_file"
    assert probe(b"x" * 100, cfg.image.model_copy(update={"max_bytes": 10})).reason == "too_large"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    assert probe(buf.getvalue(), cfg.image).reason == "unsupported_format"
