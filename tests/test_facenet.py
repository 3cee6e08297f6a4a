"""facenet-pytorch's InceptionResnetV1 (VGGFace2): layout, safe loading and the embedder.

The real weights (``20180402-114759-vggface2.pt``) cannot be downloaded here.
Every model below holds RANDOM weights, so its embeddings mean nothing: these
tests prove only that the module tree matches the published file's key layout
(as generated from facenet-pytorch's code into ``facecap/data/facenet_vggface2_keys.txt``),
that a file in the published container format loads and runs end to end, and
that bad files fail clearly without running code.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import published_layout, random_facenet
import skimage.data
import torch

from facecap.models.facenet import (
    EMBEDDING_DIM,
    FACENET_VGGFACE2_URL,
    INPUT_SIZE,
    FaceEmbedder,
    InceptionResnetV1,
    load_facenet_checkpoint,
    standardize,
)
from facecap.models.retinaface_net import CheckpointError
from facecap.models.weights import WeightsError

# The astronaut's face in skimage.data.astronaut() (rows, columns), with some hair and chin.
FACE = (slice(20, 220), slice(150, 310))


def _published_layout() -> list[tuple[str, tuple[int, ...]]]:
    return published_layout("facenet_vggface2_keys.txt")


@pytest.fixture(scope="module")
def source() -> InceptionResnetV1:
    """A RANDOM model, BatchNorm included, so a skipped tensor shows (tests/helpers.py)."""
    return random_facenet(11, batchnorm=True)


@pytest.fixture(scope="module")
def checkpoint(source, tmp_path_factory) -> Path:
    """The RANDOM model saved the way the published file is: torch.save of the bare state dict."""
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(source.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def embedder(checkpoint):
    """The embedder as the pipeline will use it, on the RANDOM checkpoint file; torch's threads restored after."""
    threads = torch.get_num_threads()
    yield FaceEmbedder(checkpoint, threads=2)
    torch.set_num_threads(threads)


def _face_crops() -> list[np.ndarray]:
    rgb = skimage.data.astronaut()
    face = rgb[FACE]
    return [
        face,                               # 200 x 160
        np.ascontiguousarray(face[::2, ::2]),  # 100 x 80, upsampled to 160
        rgb[40:200, 160:300],               # 160 x 140, tighter
        rgb[0:300, 100:400],                # 300 x 300, loose
    ]


def test_state_dict_matches_the_published_layout():
    """Names, shapes and order of every tensor equal facenet-pytorch's (no weights involved)."""
    model = InceptionResnetV1(device="meta")
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = _published_layout()
    assert len(expected) == 716
    assert actual == expected
    assert sum(p.numel() for p in model.parameters()) == 27_910_327
    assert ("logits.weight", (8631, 512)) in expected


@pytest.mark.parametrize("prefix", ["", "module."])
def test_random_checkpoint_round_trip(source, tmp_path, prefix):
    """RANDOM weights: a bare or DataParallel-prefixed state dict loads strictly and computes what the source does."""
    path = tmp_path / "weights.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    model = load_facenet_checkpoint(path)
    assert not model.training
    loaded, state = model.state_dict(), source.state_dict()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    x = torch.randn(3, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out, expected, again = model(x), source(x), model(x)
    assert out.shape == (3, EMBEDDING_DIM)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert torch.equal(out, again)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3, "different inputs give different embeddings"


def test_wrong_layout_names_the_keys(source, tmp_path):
    state = dict(source.state_dict())
    del state["block8.conv2d.weight"]
    state["last_bn.running_mean"] = torch.zeros(256)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_facenet_checkpoint(path)
    message = str(err.value)
    assert "missing 1 keys: block8.conv2d.weight" in message
    assert "last_bn.running_mean (256,) != (512,)" in message
    assert "unexpected" not in message


def test_logits_are_required(source, tmp_path):
    """The published file carries the 8631-way classifier; a features-only file is not that file."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("logits.")}
    path = tmp_path / "features.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing 2 keys: logits.weight, logits.bias"):
        load_facenet_checkpoint(path)


def test_missing_batchnorm_counters_are_filled_in(tmp_path):
    """Only the num_batches_tracked counters may be absent (inference never reads them)."""
    model = InceptionResnetV1(device="meta")
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no-counters.pt"
    torch.save(state, path)
    loaded = load_facenet_checkpoint(path).state_dict()
    assert loaded["conv2d_1a.bn.num_batches_tracked"].dtype == torch.long
    assert len(loaded) == 716


class _Payload:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_arbitrary_pickles_are_refused(tmp_path, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"conv2d_1a.conv.weight": torch.zeros(32, 3, 3, 3), "x": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_facenet_checkpoint(path)
    assert not marker.exists()

    # The payload is live: an ordinary unpickle of the same bytes would have run it.
    witness = tmp_path / "witness"
    pickle.loads(pickle.dumps(_Payload(witness)))
    assert witness.exists()


def test_non_state_dicts_are_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict of tensors, got list"):
        load_facenet_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_facenet_checkpoint(path)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(WeightsError) as err:
        FaceEmbedder(tmp_path / "20180402-114759-vggface2.pt")
    assert FACENET_VGGFACE2_URL in str(err.value)


@pytest.mark.slow
def test_embedder_on_astronaut_crops(embedder, checkpoint, source):
    """RANDOM weights on a real photo: shapes, norms, determinism, order; no claim about what the numbers mean."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert embedder.identity == f"facenet-vggface2:{digest[:12]}"
    assert not embedder.model.training

    crops = _face_crops()
    emb = embedder.embed(crops)
    assert emb.shape == (len(crops), EMBEDDING_DIM) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # Same crop, same embedding, whatever else is in the batch.
    np.testing.assert_allclose(embedder.embed(crops[:1]), emb[:1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(embedder.embed(crops), emb)

    # The embedder feeds the network exactly what facenet-pytorch would: 160x160, (x - 127.5) / 128.
    with torch.inference_mode():
        expected = source(embedder.inputs(crops)).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5, rtol=0)

    flipped = embedder.embed([np.ascontiguousarray(crops[0][:, ::-1])])
    assert flipped.shape == (1, EMBEDDING_DIM)
    assert np.abs(flipped[0] - emb[0]).max() > 1e-4, "a mirrored face is a different input"

    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    assert embedder.embed([]).dtype == np.float32


def test_embedder_batches_in_order(embedder, monkeypatch):
    """Chunking only: the network is replaced by a stand-in that echoes each input's mean."""
    monkeypatch.setattr(embedder, "batch_size", 2)
    seen = []

    def stand_in(pixels):
        seen.append(pixels)
        return pixels.mean((1, 2, 3))[:, None].expand(-1, EMBEDDING_DIM)

    monkeypatch.setattr(embedder, "model", stand_in)
    face = skimage.data.astronaut()[FACE]
    crops = [np.clip(face.astype(int) + 40 * k - 80, 0, 255).astype(np.uint8) for k in range(5)]
    out = embedder.embed(crops)
    assert [len(p) for p in seen] == [2, 2, 1]
    assert out.shape == (5, EMBEDDING_DIM)
    assert np.all(np.diff(out[:, 0]) > 0), "crops come back in the order given"


def test_inputs_resize_and_standardise(embedder):
    rgb = skimage.data.astronaut()
    exact = rgb[40:200, 150:310]  # already 160 x 160: passed through untouched
    pixels = embedder.inputs([exact, rgb[FACE]])
    assert pixels.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and pixels.dtype == torch.float32
    expected = (torch.from_numpy(exact).permute(2, 0, 1).float() - 127.5) / 128.0
    assert torch.equal(pixels[0], expected)
    assert torch.equal(standardize(torch.tensor([0.0, 127.5, 255.0])), torch.tensor([-127.5 / 128, 0.0, 127.5 / 128]))
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0

    with pytest.raises(ValueError, match="crop 1"):
        embedder.inputs([exact, exact[..., 0]])
    with pytest.raises(ValueError, match="uint8"):
        embedder.inputs([exact.astype(np.float32)])
