"""RetinaFace from a biubug6-layout ``.pth`` state dict, run with torch (CPU or CUDA).

Same interface as :class:`facecap.models.retinaface.RetinaFaceDetector` (the ONNX
runner): ``identity``, ``warm_up(size, batch)`` and ``detect(canvases, min_score,
nms_iou)``, with the same pre-processing (:func:`retinaface.to_input`) and the same
prior decoding and NMS (:func:`retinaface.decode`), so the two give comparable
boxes. torch rather than an ONNX export of the checkpoint: exporting needs the
``onnx`` package, and torch runs CPU and CUDA with one code path.
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np

from .retinaface import Detection, decode, to_input

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
PICKLE_MAGIC = b"\x80\x02"  # legacy torch.save (pickle protocol 2), as biubug6's 2019 checkpoints


def is_torch_checkpoint(data: bytes, origin: str = "") -> bool:
    """A torch.save file (zip or legacy pickle), or named like one; otherwise we treat it as ONNX."""
    if data[:4] == ZIP_MAGIC or data[:2] == PICKLE_MAGIC:
        return True
    return origin.lower().split("?")[0].endswith((".pth", ".pt"))


def torch_device(device: str):
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("detect.device=cuda but torch sees no CUDA device here; "
                               "install a CUDA build of torch on GPU workers or set detect.device=cpu")
        return torch.device("cuda")
    if device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TorchRetinaFaceDetector:
    """A loaded RetinaFace (mobilenet0.25 or resnet50) that detects faces in batches of canvases."""

    def __init__(self, checkpoint: str | os.PathLike | bytes, backbone: str, identity: str, device: str = "cpu",
                 threads: int | None = None):
        import torch

        from .retinaface_net import load_checkpoint

        source = io.BytesIO(checkpoint) if isinstance(checkpoint, bytes) else checkpoint
        self.device = torch_device(device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)  # per process, as onnxruntime's intra-op threads are per session
        self.model = load_checkpoint(source, backbone).to(self.device).eval()
        self.backbone = backbone
        self.identity = identity
        self._buffers = threading.local()  # one input buffer per thread that calls us

    def raw(self, canvases: np.ndarray) -> list[np.ndarray]:
        """Run the network on RGB uint8 canvases [N, H, W, 3]; returns loc, conf, landmarks as numpy."""
        import torch

        x = to_input(canvases, getattr(self._buffers, "input", None))
        self._buffers.input = x
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(x).to(self.device))
        return [o.float().cpu().numpy() for o in outputs]

    def warm_up(self, size: int, batch: int) -> None:
        """Run one batch so the first real shard does not pay torch's first-call setup."""
        self.raw(np.zeros((batch, size, size, 3), dtype=np.uint8))

    def detect(self, canvases: np.ndarray, min_score: float, nms_iou: float) -> list[list[Detection]]:
        loc, conf, landms = self.raw(canvases)
        h, w = canvases.shape[1:3]
        return [decode(loc[i], conf[i], landms[i], h, w, min_score, nms_iou) for i in range(len(canvases))]
