"""facer's FaRL CelebA-40 attribute classifier: layout, safe loading and face alignment.

The real weights (facer's ``face_attribute.farl.celeba.pt``) cannot be downloaded
here. Every model below holds RANDOM weights, so its outputs mean nothing: these
tests prove only that the module tree matches the published checkpoint's key
layout (as generated from facer's code into ``facecap/data/farl_celeba_keys.txt``),
that a file in the published container format loads and runs end to end, that bad
files fail clearly without running code, and that the alignment puts a real face
(scikit-image's astronaut, landmarks from the bundled RetinaFace) onto facer's template.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import published_layout
import skimage.data
import torch

from facecap.attributes import ATTRIBUTES
from facecap.models.farl import (
    FACER_CELEBA_CLASSES,
    FARL_CELEBA_URL,
    FARL_TEMPLATE_224,
    FarlAttributeNet,
    FarlAttributes,
    align_face,
    farl_align_matrix,
    load_farl_checkpoint,
    normalise,
    read_farl_state_dict,
)
from facecap.models.retinaface_net import CheckpointError
from facecap.models.weights import WeightsError
from facecap.sources.images import letterbox

CANVAS = 640


def _published_layout() -> list[tuple[str, tuple[int, ...]]]:
    return published_layout("farl_celeba_keys.txt")


def _detect_one(detector, rgb: np.ndarray):
    canvas, scale = letterbox(rgb, CANVAS)
    faces = detector.detect(canvas[None], 0.5, 0.4)[0]
    assert faces, "the bundled RetinaFace should find a face"
    best = max(faces, key=lambda d: d.score)
    return best, best.landmarks / scale


@pytest.fixture(scope="module")
def astronaut_landmarks(detector) -> np.ndarray:
    _, landmarks = _detect_one(detector, skimage.data.astronaut())
    return landmarks


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A RANDOM state dict in the published layout, saved the way facer's file is (torch.save of the dict).

    Every tensor (LayerNorms and the head's pooling weights too) is random, so a
    swapped or skipped tensor changes the outputs. Not the real weights. Large
    tensors are cut from one random pool at different offsets (86M fresh normals
    would cost seconds on a busy machine).
    """
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(7)
    pool = torch.randn(1 << 22, generator=generator) * 0.05
    state = {}
    for i, (name, shape) in enumerate(_published_layout()):
        n = math.prod(shape)
        start = (i * 7919) % (pool.numel() - n) if n < pool.numel() else 0
        values = pool[start:start + n] if n < pool.numel() else pool.repeat(n // pool.numel() + 1)[:n]
        state[name] = values.reshape(shape).clone()
    path = tmp_path_factory.mktemp("farl") / "face_attribute.farl.celeba.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def attributes(random_checkpoint) -> FarlAttributes:
    """facer's classifier as the pipeline will use it, loaded from the RANDOM checkpoint file."""
    return FarlAttributes(random_checkpoint[0])


def test_state_dict_matches_the_published_layout():
    """Names, shapes and order of every tensor equal facer's (no weights involved)."""
    model = FarlAttributeNet(device="meta")
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = _published_layout()
    assert len(expected) == 158
    assert actual == expected


def test_facer_label_order_is_celeba_order():
    assert FACER_CELEBA_CLASSES == ATTRIBUTES


@pytest.mark.slow
def test_random_checkpoint_round_trip(random_checkpoint, attributes, astronaut_landmarks):
    """RANDOM weights: the published container loads and runs; outputs prove plumbing, not accuracy."""
    path, state = random_checkpoint
    reference = FarlAttributeNet(device="meta")  # the same tensors, straight from memory, not from the file
    reference.load_state_dict(state, strict=True, assign=True)
    reference.eval()

    assert not attributes.model.training
    loaded = attributes.model.state_dict()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert attributes.identity == f"farl:farl-vit-b16-celeba40@sha256:{digest[:16]}"
    rgb = skimage.data.astronaut()
    probs = attributes.predict([(rgb, astronaut_landmarks.reshape(-1).tolist())])  # flat, as records store them
    assert probs.shape == (1, 40) and probs.dtype == np.float32
    assert np.all((probs > 0) & (probs < 1))

    with torch.inference_mode():
        aligned = torch.from_numpy(align_face(rgb, astronaut_landmarks)).permute(2, 0, 1)[None]
        expected = torch.sigmoid(reference(normalise(aligned))).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)
    assert probs.std() > 1e-3, "random weights still give different outputs per attribute"


def test_predict_batches_in_order(attributes, astronaut_landmarks, monkeypatch):
    """Chunking and column order only: the network is replaced by a stand-in that echoes the input's mean."""
    monkeypatch.setattr(attributes, "batch_size", 2)
    seen = []

    def stand_in(pixels):
        seen.append(pixels)
        return pixels.mean((1, 2, 3))[:, None] + torch.arange(40.0)

    monkeypatch.setattr(attributes, "model", stand_in)
    rgb = skimage.data.astronaut()
    faces = [(np.clip(rgb.astype(int) + 40 * k - 80, 0, 255).astype(np.uint8), astronaut_landmarks)
             for k in range(5)]
    logits = attributes.logits(faces)
    assert [len(p) for p in seen] == [2, 2, 1]
    first = torch.from_numpy(align_face(faces[0][0], astronaut_landmarks)).permute(2, 0, 1)
    assert torch.equal(seen[0][0], normalise(first[None])[0]), "the network sees the aligned, CLIP-normalised face"
    assert logits.shape == (5, 40)
    assert np.all(np.diff(logits[:, 0]) > 0), "faces come back in the order given"
    np.testing.assert_allclose(logits - logits[:, :1], np.tile(np.arange(40.0), (5, 1)), atol=1e-5)
    assert attributes.predict([]).shape == (0, 40)


def test_wrong_layout_names_the_keys(random_checkpoint, tmp_path):
    _, state = random_checkpoint
    bad = dict(state)
    bad["head.fc.weight"] = bad.pop("head.final_fc.weight")
    bad["head.weights"] = torch.ones(1, 6, 1)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        load_farl_checkpoint(path)
    message = str(err.value)
    assert "missing 1 keys: head.final_fc.weight" in message
    assert "unexpected 1 keys: head.fc.weight" in message
    assert "head.weights (1, 6, 1) != (1, 3, 1)" in message


def test_wrapped_and_prefixed_state_dicts_are_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"module.head.weights": torch.ones(1, 3, 1)}, "epoch": 3}, path)
    assert list(read_farl_state_dict(path)) == ["head.weights"]


class _Payload:
    """Unpickling this would create a file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_arbitrary_pickles_are_refused(tmp_path, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"head.weights": torch.ones(1, 3, 1), "x": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_farl_checkpoint(path)
    assert not marker.exists()


def test_torchscript_archives_are_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_farl_checkpoint(path)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(WeightsError, match="releases/download/models-v1") as err:
        load_farl_checkpoint(tmp_path / "face_attribute.farl.celeba.pt")
    assert FARL_CELEBA_URL in str(err.value)


def test_align_face_puts_the_astronaut_on_facers_template(detector, astronaut_landmarks):
    """Real photo, real detector; no attribute weights involved."""
    rgb = skimage.data.astronaut()
    aligned = align_face(rgb, astronaut_landmarks)
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.float32
    assert 0.0 <= aligned.min() and aligned.max() <= 1.0
    assert aligned.mean() > 0.2, "the face region lies inside the photo: no large black border"

    # The landmarks mapped through the similarity land near the template (least-squares residual).
    matrix = farl_align_matrix(astronaut_landmarks)
    mapped = (matrix @ np.c_[astronaut_landmarks, np.ones(5)].T).T[:, :2]
    assert np.abs(mapped - FARL_TEMPLATE_224).max() < 6.0
    assert abs(matrix[0, 0] - matrix[1, 1]) < 1e-12 and abs(matrix[0, 1] + matrix[1, 0]) < 1e-12

    # Detecting again on the aligned image finds an upright face with the eyes where the template has them.
    face, landmarks = _detect_one(detector, np.round(aligned * 255).astype(np.uint8))
    assert face.score > 0.9
    assert np.abs(landmarks[:2] - FARL_TEMPLATE_224[:2]).max() < 5.0
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 5.0
    assert landmarks[0, 0] < landmarks[2, 0] < landmarks[1, 0] and landmarks[2, 1] < landmarks[3:, 1].min()


def test_align_face_follows_a_rotated_face(astronaut_landmarks):
    """Rotating the photo and its landmarks together leaves the aligned face (nearly) unchanged."""
    from PIL import Image

    rgb = skimage.data.astronaut()
    angle = 25.0
    rotated = np.asarray(Image.fromarray(rgb).rotate(angle, resample=Image.BICUBIC, expand=False))
    # PIL rotates counter-clockwise about the image centre (256, 256) in its pixel-centre coordinates.
    a = math.radians(angle)
    centre = np.array([256.0, 256.0])
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    moved = (astronaut_landmarks - centre) @ rot.T + centre
    upright, turned = align_face(rgb, astronaut_landmarks), align_face(rotated, moved)
    centre_crop = (slice(70, 170), slice(70, 160))
    assert np.abs(upright[centre_crop] - turned[centre_crop]).mean() < 0.03
