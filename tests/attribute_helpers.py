"""Tiny attribute models of the real architectures and synthetic CelebA-format data, for the attribute tests.

The tiny models are randomly initialised (2 layers, hidden 32): their outputs
mean nothing and are only used to check shapes, plumbing and determinism. The
synthetic CelebA data encodes one attribute (BAND_ATTRIBUTE) visibly as a red
horizontal band, so a training loop that learns must reach a high AP for it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facecap.attributes import ATTRIBUTES

BAND_ATTRIBUTE = "Eyeglasses"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_clip_dir(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer CLIP (hidden 32) with a real CLIPTokenizer (byte-level BPE, no merges)
    and CLIPImageProcessor, saved the way a hub checkpoint is (save_pretrained, safetensors)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def tiny_classifier_dir(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer ViT (hidden 32, 32 px) with a 40-way multi-label head, as train-attributes builds it."""
    from facecap.config import Config
    from facecap.training.attributes import new_classifier

    cfg = Config(profile="offline", attributes={"train": {"arch": "vit-tiny", "seed": seed}})
    model, processor = new_classifier(cfg)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def synthetic_image(rng: np.random.Generator, band: bool, size: int = 40) -> bytes:
    """Noise on a random background colour; with `band`, a red horizontal band across the middle."""
    base = rng.integers(0, 200, size=3)
    pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    if band:
        top = int(rng.integers(size // 4, size // 2))
        pixels[top:top + size // 5, :] = (230, 20, 20)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = (rng.random((n, 40)) < 0.3).astype(np.uint8)
    labels[:, ATTRIBUTES.index(BAND_ATTRIBUTE)] = np.arange(n) % 2  # balanced
    return labels[rng.permutation(n)]


def write_celeba_official(root: Path, n: int = 200, seed: int = 0) -> tuple[Path, np.ndarray]:
    """img_align_celeba/ + list_attr_celeba.txt + list_eval_partition.txt (70 % train, 15 % val, 15 % test)."""
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(rng, n)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    attr_lines = [str(n), " ".join(ATTRIBUTES)]
    partition_lines = []
    band = ATTRIBUTES.index(BAND_ATTRIBUTE)
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        (root / "img_align_celeba" / name).write_bytes(synthetic_image(rng, bool(labels[i, band])))
        attr_lines.append(name + " " + " ".join("1" if v else "-1" for v in labels[i]))
        partition_lines.append(f"{name} {0 if i < 0.7 * n else 1 if i < 0.85 * n else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return root, labels


def write_celeba_parquet(path: Path, n: int = 120, seed: int = 0, row_group: int = 32) -> tuple[Path, np.ndarray]:
    """The Hugging Face mirror layout: an `image` column of {bytes, path} structs and 40 bool attribute columns."""
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(rng, n)
    band = ATTRIBUTES.index(BAND_ATTRIBUTE)
    images = [{"bytes": synthetic_image(rng, bool(labels[i, band])), "path": f"{i:06d}.jpg"} for i in range(n)]
    columns = {"image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    columns.update({name: pa.array(labels[:, j].astype(bool)) for j, name in enumerate(ATTRIBUTES)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group)
    return path, labels


def write_calibration(model_dir: Path, scale: float, bias: float) -> None:
    from facecap.models.attributes import CALIBRATION_FORMAT

    (model_dir / "attribute_calibration.json").write_text(json.dumps({
        "format": CALIBRATION_FORMAT, "attributes": list(ATTRIBUTES), "scale": [scale] * 40, "bias": [bias] * 40}))
