"""FaceNet Inception-ResNet-v1 (VGGFace2), laid out so facenet-pytorch's published weights load as they are.

Face embeddings (512-d, L2-normalised) come from the network facenet-pytorch
publishes as ``InceptionResnetV1(pretrained="vggface2")``: David Sandberg's
TensorFlow FaceNet model 20180402-114759, trained on VGGFace2 and converted by
timesler (``20180402-114759-vggface2.pt``, release v2.2.9). That file cannot be
downloaded on machines without GitHub access, so this module is written from
facenet-pytorch's code (``facenet_pytorch/models/inception_resnet_v1.py``, wheel
2.6.0) and checked against a key/shape list generated from that code
(``facecap/data/facenet_vggface2_keys.txt``). The tests here only ever use randomly
initialised weights of this architecture: they check layout, loading and
plumbing, never that an embedding means anything.

What the published file holds, and why:

- ``load_weights`` does ``torch.load`` and a strict ``load_state_dict`` into the
  model built for ``pretrained="vggface2"``, which first adds
  ``logits = Linear(512, 8631)``. ``models/utils/tensorflow2pytorch.py`` saved the
  file as the full ``state_dict()`` of that model, so it holds every BatchNorm
  buffer (``running_mean``, ``running_var``, ``num_batches_tracked``) and
  ``logits.weight``/``logits.bias``. The logits layer is kept here so the file
  loads strictly; embeddings never use it.
- Every convolution in a branch is conv (no bias) + BatchNorm(eps=1e-3) + ReLU;
  the 1x1 convolution that merges a residual block's branches has a bias and no
  BatchNorm. Residual blocks add ``scale * merged`` to their input (0.17, 0.10,
  0.20 for the three repeats; 1.0 and no ReLU for the final ``block8``).
- Inference (``classify=False``): average pool, ``last_linear`` (1792 -> 512, no
  bias), ``last_bn``, L2 normalisation. Dropout sits before ``last_linear`` in
  facenet-pytorch and is the identity in eval mode, so it is left out.
- Input: RGB face crops at 160x160, ``(pixels - 127.5) / 128``
  (facenet-pytorch's ``fixed_image_standardization``).

Loading never unpickles code: checkpoints are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .retinaface_net import check_state_dict, read_tensors
from .weights import WeightsError, file_sha256

FACENET_VGGFACE2_URL = (
    "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
)
FACENET_VGGFACE2_FILE = "20180402-114759-vggface2.pt"
INPUT_SIZE = 160
EMBEDDING_DIM = 512
VGGFACE2_CLASSES = 8631  # identities in the VGGFace2 training split; the size of the unused logits layer

_LAYOUT = "facenet-pytorch's InceptionResnetV1 (vggface2) layout"

Kernel = int | tuple[int, int]


# --- the network -------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TensorFlow's eps 1e-3) -> ReLU; submodules ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: Kernel, stride: int = 1, padding: Kernel = 0, device=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False, device=device)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(cin: int, spec: Sequence[tuple[int, Kernel, int, Kernel]], device=None) -> nn.Sequential:
    """Consecutive BasicConv2d layers from (out channels, kernel, stride, padding) rows."""
    layers = []
    for cout, kernel, stride, padding in spec:
        layers.append(BasicConv2d(cin, cout, kernel, stride, padding, device=device))
        cin = cout
    return nn.Sequential(*layers)


class ResidualInception(nn.Module):
    """Block35 / Block17 / Block8: parallel branches, concatenated, 1x1-merged, added back scaled.

    ``branch0`` is a single 1x1 BasicConv2d; ``branch1``, ``branch2``... are
    Sequentials, which is what puts the ``.0.``, ``.1.`` indices into their keys.
    """

    def __init__(self, channels: int, branch0: int, chains: Sequence[Sequence[tuple[int, Kernel, int, Kernel]]],
                 scale: float, relu: bool = True, device=None):
        super().__init__()
        self.scale = scale
        self.relu = relu
        self.branch0 = BasicConv2d(channels, branch0, 1, device=device)
        for i, spec in enumerate(chains, start=1):
            setattr(self, f"branch{i}", _chain(channels, spec, device))
        self._chains = len(chains)
        merged = branch0 + sum(spec[-1][0] for spec in chains)
        self.conv2d = nn.Conv2d(merged, channels, 1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x)] + [getattr(self, f"branch{i}")(x) for i in range(1, self._chains + 1)]
        out = x + self.scale * self.conv2d(torch.cat(branches, dim=1))
        return F.relu(out) if self.relu else out


def block35(scale: float, device=None) -> ResidualInception:
    """35x35 grid block (256 channels): 1x1, 1x1 -> 3x3, 1x1 -> 3x3 -> 3x3, 32 channels each."""
    return ResidualInception(256, 32, [
        [(32, 1, 1, 0), (32, 3, 1, 1)],
        [(32, 1, 1, 0), (32, 3, 1, 1), (32, 3, 1, 1)],
    ], scale, device=device)


def block17(scale: float, device=None) -> ResidualInception:
    """17x17 grid block (896 channels): 1x1, 1x1 -> 1x7 -> 7x1, 128 channels each."""
    return ResidualInception(896, 128, [
        [(128, 1, 1, 0), (128, (1, 7), 1, (0, 3)), (128, (7, 1), 1, (3, 0))],
    ], scale, device=device)


def block8(scale: float, relu: bool = True, device=None) -> ResidualInception:
    """8x8 grid block (1792 channels): 1x1, 1x1 -> 1x3 -> 3x1, 192 channels each."""
    return ResidualInception(1792, 192, [
        [(192, 1, 1, 0), (192, (1, 3), 1, (0, 1)), (192, (3, 1), 1, (1, 0))],
    ], scale, relu=relu, device=device)


class Mixed6a(nn.Module):
    """35 -> 17 reduction: 3x3/2 conv (384), 1x1 -> 3x3 -> 3x3/2 (256), 3x3/2 max pool; 256 -> 896 channels."""

    def __init__(self, device=None):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, stride=2, device=device)
        self.branch1 = _chain(256, [(192, 1, 1, 0), (192, 3, 1, 1), (256, 3, 2, 0)], device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), F.max_pool2d(x, 3, stride=2)], dim=1)


class Mixed7a(nn.Module):
    """17 -> 8 reduction: three conv chains ending in 3x3/2 (384, 256, 256) and a 3x3/2 max pool; 896 -> 1792."""

    def __init__(self, device=None):
        super().__init__()
        self.branch0 = _chain(896, [(256, 1, 1, 0), (384, 3, 2, 0)], device)
        self.branch1 = _chain(896, [(256, 1, 1, 0), (256, 3, 2, 0)], device)
        self.branch2 = _chain(896, [(256, 1, 1, 0), (256, 3, 1, 1), (256, 3, 2, 0)], device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 3, stride=2)
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), pooled], dim=1)


class InceptionResnetV1(nn.Module):
    """[B, 3, H, W] standardised RGB (160x160 as trained) -> [B, 512] L2-normalised embeddings.

    Inference only: call ``.eval()`` (the loader does). ``logits`` exists so the
    published file loads strictly; ``forward`` does not use it. ``device="meta"``
    builds the module tree without allocating or initialising weights (for layout
    checks and for loading, which assigns every tensor).
    """

    def __init__(self, num_classes: int = VGGFACE2_CLASSES, device=None):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2, device=device)
        self.conv2d_2a = BasicConv2d(32, 32, 3, device=device)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1, device=device)
        self.conv2d_3b = BasicConv2d(64, 80, 1, device=device)
        self.conv2d_4a = BasicConv2d(80, 192, 3, device=device)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2, device=device)
        self.repeat_1 = nn.Sequential(*(block35(0.17, device) for _ in range(5)))
        self.mixed_6a = Mixed6a(device)
        self.repeat_2 = nn.Sequential(*(block17(0.10, device) for _ in range(10)))
        self.mixed_7a = Mixed7a(device)
        self.repeat_3 = nn.Sequential(*(block8(0.20, device=device) for _ in range(5)))
        self.block8 = block8(1.0, relu=False, device=device)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False, device=device)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=1e-3, device=device)
        self.logits = nn.Linear(EMBEDDING_DIM, num_classes, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_2(self.mixed_6a(self.repeat_1(x)))
        x = self.block8(self.repeat_3(self.mixed_7a(x)))
        x = self.last_bn(self.last_linear(x.mean(dim=(2, 3))))
        return F.normalize(x, p=2, dim=1)


# --- checkpoints -------------------------------------------------------------------------------

def read_facenet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a facenet checkpoint (a bare state dict), read without running any code from the file.

    A DataParallel ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"FaceNet VGGFace2 weights not found at {path}. Download {FACENET_VGGFACE2_URL} on a machine "
            "with access and place it there.")
    return read_tensors(path, "a FaceNet checkpoint")


def load_facenet_checkpoint(path: str | os.PathLike) -> InceptionResnetV1:
    """Load ``20180402-114759-vggface2.pt`` (or a file of its layout) into a new model, strictly.

    Fails with CheckpointError listing missing, unexpected and mis-shaped keys
    when the file does not fit; the returned model is in eval mode, float32, on CPU.
    BatchNorm's ``num_batches_tracked`` counters are filled in when a file lacks
    them (inference never reads them); every other tensor must be present.
    """
    state = read_facenet_state_dict(path)
    model = InceptionResnetV1(device="meta")  # no random init of 28M parameters that are overwritten next
    for key in model.state_dict():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    check_state_dict(state, model, str(path), _LAYOUT)
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- embedding faces ---------------------------------------------------------------------------

def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``fixed_image_standardization``: [0, 255] pixels -> (x - 127.5) / 128."""
    return (pixels - 127.5) / 128.0


class FaceEmbedder:
    """Aligned RGB face crops -> float32 [N, 512] unit-length FaceNet (VGGFace2) embeddings."""

    batch_size: int = 32

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: torch has one intra-op pool
        self.path = Path(path)
        self.model = load_facenet_checkpoint(self.path)  # raises before hashing a file that does not fit
        self.identity = f"facenet-vggface2:{file_sha256(self.path)[:12]}"
        self.device = torch.device(device)
        self.model.to(self.device)

    def inputs(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Network input [N, 3, 160, 160]: each crop resized (bilinear, antialiased), then standardised."""
        resized = []
        for i, crop in enumerate(crops):
            crop = np.asarray(crop)
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8 or 0 in crop.shape:
                raise ValueError(f"crop {i}: expected a non-empty RGB uint8 image [H, W, 3], "
                                 f"got {crop.dtype} {crop.shape}")
            pixels = torch.from_numpy(np.array(crop, order="C"))  # a copy: decoded crops can be read-only
            pixels = pixels.permute(2, 0, 1)[None].float()
            if pixels.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
                pixels = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                       align_corners=False, antialias=True)
            resized.append(pixels)
        return standardize(torch.cat(resized))

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [N, 512] L2-normalised embeddings, one row per crop, in the order given."""
        crops = list(crops)
        if not crops:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        out = []
        for start in range(0, len(crops), self.batch_size):
            pixels = self.inputs(crops[start:start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                out.append(self.model(pixels).float().cpu().numpy())
        return np.concatenate(out)
