"""FaRL ViT-B/16 with facer's CelebA-40 attribute head, laid out so facer's published weights load as they are.

The ``full`` profile annotates the 40 CelebA attributes with the classifier the
facer toolkit publishes (``face_attribute.farl.celeba.pt``, release ``models-v1``;
its authors report 92.07 % mean accuracy on CelebA). No checksum is published and
the file cannot be downloaded on the build machines, so this module is written
from facer's code (FacePerceiver/facer at ddd35c7) and checked against a key/shape
list generated from that code (``facecap/data/farl_celeba_keys.txt``):

- ``facer/face_attribute/farl.py``: ``load_face_attr`` builds
  ``farl_classification(num_classes=40, layers=[11])`` and calls
  ``model.load_state_dict(download_jit(path, jit=False))``, i.e. ``torch.load``
  then a strict load. The file is therefore a plain state dict of the model
  below (a TorchScript archive would not be a Mapping and would fail there).
  ``FaRLFaceAttribute.forward``: uint8 RGB / 255, warp to 224x224 by the 5
  landmarks (bilinear ``grid_sample``, ``align_corners=False``, zero padding),
  then CLIP's mean/std normalisation (added in facer f0dd2d6, "should normalize
  before go into network"), network, sigmoid. Label order: CelebA's.
- ``facer/farl/classification.py``: ``FACTransformer(backbone, head)``; the
  backbone is FaRL's ``VisualTransformer`` (CLIP's ViT layout: ``conv1`` without
  bias, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
  ``transformer.resblocks.N`` of ``attn`` (``nn.MultiheadAttention``), ``ln_1``,
  ``mlp.c_fc``/QuickGELU/``mlp.c_proj``, ``ln_2``) with ``proj`` and
  ``ln_post`` deleted. Its forward returns the raw token outputs of block 11 (the
  last of 12, no final layer norm). ``VITClassificationHeadV0`` (``norm=True``)
  pools them three ways: the mean of the 14x14 patch tokens, their per-channel
  maximum and the CLS token, each through its own LayerNorm (``norm_0``,
  ``norm_1``, ``norm_2`` in that order), mixes the three with softmax weights
  (``head.weights`` [1, 3, 1]) and applies ``final_fc`` (768 -> 40).
- ``facer/transform.py``: ``get_face_align_matrix`` with explicit target points
  (``get_std_points_xray(224, 500)`` in ``face_attribute/farl.py``) is a
  least-squares similarity (``get_similarity_transform_matrix``);
  ``make_tanh_warp_grid`` with ``warp_factor=0`` is a plain affine grid sampled at
  output pixel centres.

Nothing here runs facer's code, and loading never unpickles code: checkpoints are
read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers; TorchScript archives are refused.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecap.attributes import ATTRIBUTES

from .retinaface_net import CheckpointError, check_state_dict, read_tensors
from .weights import WeightsError, file_sha256

FARL_CELEBA_URL = "https://github.com/FacePerceiver/facer/releases/download/models-v1/face_attribute.farl.celeba.pt"
FARL_CELEBA_FILE = "face_attribute.farl.celeba.pt"
MODEL_NAME = "farl-vit-b16-celeba40"
INPUT_SIZE = 224

# facer/face_attribute/farl.py pretrain_settings["celeba/224"]["classes"]: the network's output order.
FACER_CELEBA_CLASSES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
# The network's column for each of facecap's attributes (the identity today: facer uses CelebA's order too).
OUTPUT_COLUMNS: tuple[int, ...] = tuple(FACER_CELEBA_CLASSES.index(a) for a in ATTRIBUTES)

# CLIP's pixel statistics; facer normalises the warped [0, 1] image with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# facer's get_std_points_xray: a 5-point face template in a 256 frame (left eye, right eye, nose,
# left mouth corner, right mouth corner; "left" = image left), moved 30 px down, centred in a
# 500 frame and scaled to the output size. The face fills the middle of the frame, leaving room
# for hair, ears and neck.
_FACER_TEMPLATE_256 = np.array([
    [85.82991, 85.7792],
    [169.0532, 84.3381],
    [127.574, 137.0006],
    [90.6964, 174.7014],
    [167.3069, 173.3733],
], dtype=np.float64)


def facer_template(out_size: int = INPUT_SIZE, mid_size: int = 500) -> np.ndarray:
    """The 5 target points (x, y) in an out_size x out_size frame, as facer computes them."""
    pts = _FACER_TEMPLATE_256 + np.array([0.0, 30.0])
    return (pts - 256 / 2 + mid_size / 2) * out_size / mid_size


FARL_TEMPLATE_224 = facer_template()


# --- the network -------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block; submodule names follow CLIP's (attn, ln_1, mlp.c_fc/c_proj, ln_2)."""

    def __init__(self, width: int, heads: int, device=None):
        super().__init__()
        # Tokens are batch-first here; the parameter names and shapes do not depend on it.
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, device=device)
        self.ln_1 = nn.LayerNorm(width, device=device)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4, device=device)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width, device=device)),
        ]))
        self.ln_2 = nn.LayerNorm(width, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, device=None):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, device) for _ in range(layers))


class FarlVisionTower(nn.Module):
    """FaRL's ViT image encoder without ln_post/proj: pixels -> tokens after block `feature_layer`."""

    def __init__(self, resolution: int = 224, patch: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, feature_layer: int = 11, device=None):
        super().__init__()
        if not 0 <= feature_layer < layers:
            raise ValueError(f"feature_layer {feature_layer} outside 0..{layers - 1}")
        self.grid = resolution // patch
        self.feature_layer = feature_layer
        self.class_embedding = nn.Parameter(torch.empty(width, device=device))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid * self.grid + 1, width, device=device))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False, device=device)
        self.ln_pre = nn.LayerNorm(width, device=device)
        self.transformer = Transformer(width, layers, heads, device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, grid*grid, width], row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks[: self.feature_layer + 1]:
            x = block(x)
        return x  # [B, 1 + grid*grid, width]; token 0 is CLS


class AttributeHead(nn.Module):
    """facer's VITClassificationHeadV0 for one feature layer: softmax-weighted mix of three pooled, normed views."""

    POOLS = ("patch_mean", "patch_max", "cls")  # the order of norm_0, norm_1, norm_2 and of `weights`

    def __init__(self, width: int = 768, num_labels: int = 40, device=None):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, len(self.POOLS), 1, device=device))
        self.final_fc = nn.Linear(width, num_labels, device=device)
        for i in range(len(self.POOLS)):
            setattr(self, f"norm_{i}", nn.LayerNorm(width, device=device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        pooled = (patches.mean(dim=1), patches.amax(dim=1), tokens[:, 0])
        views = torch.stack([getattr(self, f"norm_{i}")(v) for i, v in enumerate(pooled)], dim=1)  # [B, 3, C]
        mixed = (views * self.weights.softmax(dim=1)).sum(dim=1)
        return self.final_fc(mixed)


class FarlAttributeNet(nn.Module):
    """Normalised [B, 3, 224, 224] pixels -> [B, 40] attribute logits (facer's column order).

    ``device="meta"`` builds the module tree without allocating or initialising
    weights (for layout checks and for loading, which assigns every tensor).
    """

    def __init__(self, resolution: int = 224, patch: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, feature_layer: int = 11, num_labels: int = 40, device=None):
        super().__init__()
        self.backbone = FarlVisionTower(resolution, patch, width, layers, heads, feature_layer, device)
        self.head = AttributeHead(width, num_labels, device)
        if torch.device(device or "cpu").type != "meta":
            self.apply(_init_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixels))


def _init_weights(module: nn.Module) -> None:
    # Only for randomly initialised models (tests); real use overwrites every tensor.
    if isinstance(module, FarlVisionTower):
        scale = module.class_embedding.shape[0] ** -0.5
        nn.init.normal_(module.class_embedding, std=scale)
        nn.init.normal_(module.positional_embedding, std=scale)
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --- checkpoints -------------------------------------------------------------------------------

def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    # torch.jit.save writes <archive>/code/... and constants.pkl; torch.save writes neither.
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def read_farl_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a FaRL attribute checkpoint, read without running any code from the file.

    facer's file is a plain ``torch.save`` of the state dict. A training checkpoint
    wrapping it (``{"model": ...}`` as facer's scripts/clean_checkpoint.py reads, or
    ``{"state_dict": ...}``) and a DataParallel ``module.`` prefix are accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"FaRL attribute weights not found at {path}. Download {FARL_CELEBA_URL} on a machine with access "
            f"and place it there, or run with --profile offline (attributes are then not annotated).")
    if _is_torchscript_archive(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive. facer publishes {FARL_CELEBA_FILE} as a plain state dict "
            "(it loads it with torch.load + load_state_dict); TorchScript files carry code and are not loaded.")
    return read_tensors(path, "a FaRL attribute checkpoint", wrappers=("state_dict", "model"))


def load_farl_checkpoint(path: str | os.PathLike) -> FarlAttributeNet:
    """Load facer's ``face_attribute.farl.celeba.pt`` (or a file of its layout) into a new model, strictly.

    Fails with CheckpointError listing missing, unexpected and mis-shaped keys
    when the file does not fit; the returned model is in eval mode, float32, on CPU.
    """
    state = read_farl_state_dict(path)
    model = FarlAttributeNet(device="meta")  # no random init of 86M parameters that are overwritten next
    check_state_dict(state, model, str(path), "facer's FaRL CelebA-40 attribute layout (backbone.* ViT-B/16 + head.*)")
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def farl_identity(path: str | os.PathLike) -> str:
    """``farl:farl-vit-b16-celeba40@sha256:<first 16 hex of the weights file's sha256>``."""
    p = Path(path).resolve()
    st = p.stat()
    return f"farl:{MODEL_NAME}@sha256:{_cached_sha256(str(p), st.st_size, st.st_mtime_ns)[:16]}"


# --- alignment ---------------------------------------------------------------------------------

def farl_align_matrix(landmarks5: np.ndarray, template: np.ndarray = FARL_TEMPLATE_224) -> np.ndarray:
    """3x3 similarity taking source points to the template, least squares (facer's closed form).

    Points are (x, y) in pixel units with pixel i spanning [i, i + 1), the convention
    facer's grid uses; no reflection is allowed.
    """
    src = np.asarray(landmarks5, np.float64).reshape(5, 2)
    dst = np.asarray(template, np.float64).reshape(5, 2)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    norm = (s ** 2).sum()
    if not np.isfinite(norm) or norm <= 1e-12:
        raise ValueError(f"degenerate landmarks (all at one point): {src.tolist()}")
    a = (s * d).sum() / norm
    b = (d[:, 0] * s[:, 1] - d[:, 1] * s[:, 0]).sum() / norm
    tx = dst_mean[0] - a * src_mean[0] - b * src_mean[1]
    ty = dst_mean[1] + b * src_mean[0] - a * src_mean[1]
    return np.array([[a, b, tx], [-b, a, ty], [0.0, 0.0, 1.0]])


@functools.lru_cache(maxsize=4)
def _output_centres(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return np.stack([xx.ravel(), yy.ravel(), np.ones(size * size)])  # [3, size*size]


def align_face(rgb: np.ndarray, landmarks5: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """The face warped onto facer's template: float32 [size, size, 3] RGB in [0, 1] (not yet normalised).

    `landmarks5`: left eye, right eye, nose, left and right mouth corner ("left" =
    image left) in source pixels, as FaceCap's detect records them (any shape
    holding 10 numbers). Bilinear sampling at output pixel centres with zero
    padding outside the image, like facer's ``grid_sample(align_corners=False)``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    template = FARL_TEMPLATE_224 if size == INPUT_SIZE else facer_template(size)
    inverse = np.linalg.inv(farl_align_matrix(landmarks5, template))
    src = (inverse @ _output_centres(size))[:2]  # source (x, y) of every output pixel centre
    h, w = rgb.shape[:2]
    # Sample only the region the taps reach (+1 px for the bilinear neighbour); any tap outside
    # it lies outside the image, where zero padding gives the same result as on the full image.
    x0, y0 = (max(0, int(math.floor(v.min() - 0.5))) for v in src)
    x1, y1 = min(w - 1, int(math.floor(src[0].max() - 0.5)) + 1), min(h - 1, int(math.floor(src[1].max() - 0.5)) + 1)
    if x0 > x1 or y0 > y1:
        return np.zeros((size, size, 3), np.float32)  # the template frame lies wholly outside the image
    crop = torch.from_numpy(np.ascontiguousarray(rgb[y0:y1 + 1, x0:x1 + 1])).permute(2, 0, 1)[None].float() / 255.0
    ch, cw = crop.shape[2:]
    gx = (src[0] - x0) / cw * 2.0 - 1.0
    gy = (src[1] - y0) / ch * 2.0 - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], -1).reshape(1, size, size, 2).astype(np.float32))
    out = F.grid_sample(crop, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP-normalised network input."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


# --- the attribute model -----------------------------------------------------------------------

def _torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FarlAttributes:
    """facer's FaRL CelebA-40 classifier: (RGB image, 5 landmarks) pairs -> [N, 40] probabilities, CelebA order."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 32):
        self.path = Path(path)
        self.model = load_farl_checkpoint(self.path)  # raises before hashing a file that does not fit
        self.identity = farl_identity(self.path)
        self.device = _torch_device(device)
        self.model.to(self.device)
        self.batch_size = max(1, int(batch_size))
        self._columns = torch.tensor(OUTPUT_COLUMNS)

    def inputs(self, faces: Sequence[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """Aligned, normalised network input [N, 3, 224, 224] for (rgb, landmarks5) pairs."""
        aligned = np.stack([align_face(rgb, landmarks) for rgb, landmarks in faces])
        return normalise(torch.from_numpy(aligned).permute(0, 3, 1, 2))

    def logits(self, faces: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Raw logits [N, 40] in facecap's ATTRIBUTES order."""
        faces = list(faces)
        if not faces:
            return np.zeros((0, len(ATTRIBUTES)), np.float32)
        out = []
        for start in range(0, len(faces), self.batch_size):
            pixels = self.inputs(faces[start:start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                logits = self.model(pixels).float()
            out.append(logits[:, self._columns.to(logits.device)].cpu().numpy())
        return np.concatenate(out)

    def predict(self, faces: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """float32 probabilities [N, 40] (sigmoid of the logits, as facer does), CelebA order."""
        return (1.0 / (1.0 + np.exp(-np.clip(self.logits(faces), -60, 60)))).astype(np.float32)
