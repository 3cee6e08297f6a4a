"""RetinaFace on onnxruntime: batched inference, prior decoding and NMS.

Works with the biubug6/Pytorch_Retinaface family of ONNX exports (mobilenet0.25
and ResNet-50 backbones share the head): one input ``[N, 3, H, W]`` in BGR with
the ImageNet-style mean subtracted, and three outputs, box offsets ``[N, P, 4]``,
class scores ``[N, P, 2]`` (softmaxed) and landmark offsets ``[N, P, 10]``,
over priors on strides 8/16/32.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass

import numpy as np

STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    score: float
    box: np.ndarray  # x1, y1, x2, y2 in input-canvas pixels
    landmarks: np.ndarray  # (5, 2) in input-canvas pixels


@functools.lru_cache(maxsize=8)
def priors(height: int, width: int) -> np.ndarray:
    """Anchor centres and sizes (cx, cy, w, h), normalised to the canvas, in the export's order."""
    out = []
    for stride, sizes in zip(STRIDES, MIN_SIZES):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centres = np.stack([(xs + 0.5) * stride / width, (ys + 0.5) * stride / height], axis=-1).reshape(-1, 1, 2)
        wh = np.array([[s / width, s / height] for s in sizes], dtype=np.float64).reshape(1, -1, 2)
        cells = np.concatenate([np.broadcast_to(centres, (centres.shape[0], len(sizes), 2)),
                                np.broadcast_to(wh, (centres.shape[0], len(sizes), 2))], axis=-1)
        out.append(cells.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode(loc: np.ndarray, conf: np.ndarray, landms: np.ndarray, height: int, width: int,
           min_score: float, nms_iou: float, top_k: int = 5000) -> list[Detection]:
    """Turn one image's raw outputs into scored boxes and landmarks (canvas pixels)."""
    anchors = priors(height, width)
    if anchors.shape[0] != loc.shape[0]:
        raise ValueError(f"model produced {loc.shape[0]} priors, expected {anchors.shape[0]}: not a RetinaFace export")
    scores = conf[:, 1]
    idx = np.flatnonzero(scores > min_score)
    if idx.size == 0:
        return []
    idx = idx[np.argsort(-scores[idx], kind="stable")[:top_k]]
    a, l, p = anchors[idx], loc[idx], landms[idx]
    centres = a[:, :2] + l[:, :2] * VARIANCE[0] * a[:, 2:]
    sizes = a[:, 2:] * np.exp(l[:, 2:] * VARIANCE[1])
    scale = np.array([width, height], dtype=np.float32)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1) * np.tile(scale, 2)
    points = (a[:, None, :2] + p.reshape(-1, 5, 2) * VARIANCE[0] * a[:, None, 2:]) * scale
    keep = nms(boxes, scores[idx], nms_iou)
    return [Detection(float(scores[idx][k]), boxes[k], points[k]) for k in keep]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; boxes must already be sorted by score."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.arange(len(scores))
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep


def to_input(canvases: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 [N, H, W, 3] -> the model's BGR, mean-subtracted float32 [N, 3, H, W].

    Writes into `out` when it has the right shape: a batch of 640 px canvases is
    ~40 MB of float32, and allocating that per batch costs page faults that
    Dask workers (which trim malloc aggressively) pay again on every batch.
    """
    n, h, w, _ = canvases.shape
    if out is None or out.shape != (n, 3, h, w):
        out = np.empty((n, 3, h, w), dtype=np.float32)
    for channel, rgb_index in enumerate((2, 1, 0)):  # BGR planes
        np.subtract(canvases[..., rgb_index], BGR_MEAN[channel], out=out[:, channel], dtype=np.float32)
    return out


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "detect.device=cuda but onnxruntime has no CUDA provider here "
                f"(available: {available}); install onnxruntime-gpu on GPU workers or set detect.device=cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class RetinaFaceDetector:
    """A loaded RetinaFace ONNX session that detects faces in batches of canvases."""

    def __init__(self, onnx_bytes: bytes, identity: str, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers_for(device))
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if len(outputs) != 3:
            raise ValueError(f"{identity}: expected 3 outputs (loc, conf, landmarks), got {outputs}")
        self.identity = identity
        self._buffers = threading.local()  # one input buffer per thread that calls us

    def raw(self, canvases: np.ndarray) -> list[np.ndarray]:
        """Run the network on RGB uint8 canvases [N, H, W, 3]; returns loc, conf, landmarks."""
        x = to_input(canvases, getattr(self._buffers, "input", None))
        self._buffers.input = x
        return self.session.run(None, {self.input_name: x})

    def warm_up(self, size: int, batch: int) -> None:
        """Run one batch so the first real shard does not pay onnxruntime's first-call setup."""
        self.raw(np.zeros((batch, size, size, 3), dtype=np.uint8))

    def detect(self, canvases: np.ndarray, min_score: float, nms_iou: float) -> list[list[Detection]]:
        loc, conf, landms = self.raw(canvases)
        h, w = canvases.shape[1:3]
        return [decode(loc[i], conf[i], landms[i], h, w, min_score, nms_iou) for i in range(len(canvases))]
