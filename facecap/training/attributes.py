"""Train the attribute classifier (the annotate stage's `classifier` backend) on CelebA-format data.

`train_attributes` is a plain function (flows/train_attributes.py wraps it in a
Prefect flow): it fine-tunes a transformers image backbone with a 40-way
multi-label head, checkpoints resumably, then on the held-out data fits a
per-attribute calibration (Platt scaling: p = sigmoid(scale * logit + bias)),
reports per-attribute AP and accuracy, and writes OUT/model, a directory the
annotate stage loads directly (``attributes.backend=classifier``,
``attributes.model=OUT/model``).

Splits: the official layout's list_eval_partition.txt (train 0; the
validation split 1 fits the calibration; metrics are on the test split 2, or on
validation when there is no test split); Parquet without a split column holds
out a deterministic share by content hash (calibrated and measured on it).

Checkpoints (OUT/checkpoints/step-NNNNNNN/): model.safetensors, the optimiser
and scheduler state (torch.save, read back with torch.load(weights_only=True),
which unpickles no code) and state.json. A rerun of the same command resumes
from the latest one, mid-epoch, and reaches the same weights as an
uninterrupted run: data order and augmentation depend only on (seed, epoch,
position).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError
from facecap.config import Config
from facecap.stages.annotate import AttributeTrainSettings
from facecap.training.celeba import TEST, TRAIN, VALID, CelebAData, decode_image, load_celeba

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.json"
Log = Callable[[str], None]

# Settings that change the trained weights; a resumed run must match them.
_FINGERPRINT_FIELDS = ("init", "arch", "image_size", "batch_size", "lr", "weight_decay", "warmup_steps", "augment",
                       "held_out_fraction", "seed", "epochs", "max_steps")


def _torch():
    import torch

    return torch


# --- model -------------------------------------------------------------------
def _label_maps() -> dict:
    return {"num_labels": 40, "id2label": dict(enumerate(ATTRIBUTES)),
            "label2id": {a: i for i, a in enumerate(ATTRIBUTES)}, "problem_type": "multi_label_classification"}


def _tiny_or_base_config(settings: AttributeTrainSettings):
    from transformers import ViTConfig

    if settings.arch == "vit-tiny":
        size = settings.image_size or 32
        return ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, **_label_maps())
    return ViTConfig(image_size=settings.image_size or 224, patch_size=16, **_label_maps())  # ViT-B/16


def new_classifier(cfg: Config):
    """(model, image processor) to train: from `train.init` with a new 40-way head, or a random `train.arch`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification
    from transformers.utils import logging as hf_logging

    from facecap.models.attributes import is_local_model

    hf_logging.disable_progress_bar()
    settings = cfg.attributes.train
    torch = _torch()
    torch.manual_seed(settings.seed)
    if settings.init:
        if not is_local_model(settings.init) and not cfg.allow_downloads:
            raise ConfigError(f"attributes.train.init={settings.init!r} is not a local directory and the "
                              f"'{cfg.profile}' profile downloads nothing; give a local path or use --profile full")
        try:
            model = AutoModelForImageClassification.from_pretrained(
                settings.init, ignore_mismatched_sizes=True, use_safetensors=True,
                cache_dir=str(Path(cfg.models.cache_dir) / "huggingface"), **_label_maps())
            processor = AutoImageProcessor.from_pretrained(settings.init)
        except (OSError, ValueError) as exc:
            from facecap.models.weights import WeightsError

            raise WeightsError(f"cannot load the backbone attributes.train.init={settings.init!r}: {exc}. Give a "
                               "local directory with config.json, *.safetensors and preprocessor_config.json.") from exc
        return model, processor
    config = _tiny_or_base_config(settings)
    model = ViTForImageClassification(config)
    processor = _vit_processor(config.image_size)
    return model, processor


def _vit_processor(size: int):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import ViTImageProcessor

        # The same preprocessing as google/vit-base-patch16-224: resize, scale to [-1, 1].
        return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


# --- data ----------------------------------------------------------------------
class _Images:
    """A torch Dataset over (index, flip) -> (pixels, labels); flips are decided by the sampler."""

    def __init__(self, data: CelebAData, processor, max_pixels: int):
        self.data, self.processor, self.max_pixels = data, processor, max_pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        torch = _torch()
        index, flip = item
        image = decode_image(self.data.image_bytes(index), self.max_pixels)
        if flip:
            from PIL import Image

            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels, torch.from_numpy(self.data.labels[index].astype(np.float32))


def epoch_batches(data: CelebAData, indices: np.ndarray, settings: AttributeTrainSettings,
                  epoch: int) -> list[list[tuple[int, bool]]]:
    """The epoch's batches of (index, flip): a function of (seed, epoch) only, so a resumed run sees the same."""
    rng = np.random.default_rng([settings.seed, epoch])
    if data.blocks is not None:
        # Parquet: shuffle row groups, then rows within each, so reads stay within one row group at a time.
        blocks = data.blocks[indices]
        order = []
        for block in rng.permutation(np.unique(blocks)):
            members = indices[blocks == block]
            order.extend(rng.permutation(members).tolist())
        order = np.asarray(order, dtype=np.int64)
    else:
        order = rng.permutation(indices)
    flips = rng.random(len(order)) < 0.5 if settings.augment else np.zeros(len(order), bool)
    pairs = list(zip(order.tolist(), flips.tolist()))
    return [pairs[i:i + settings.batch_size] for i in range(0, len(pairs), settings.batch_size)]


def _loader(dataset: _Images, batches: list, num_workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      persistent_workers=False, multiprocessing_context="spawn" if num_workers else None)


# --- schedule, checkpoints -------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _fingerprint(settings: AttributeTrainSettings, data: CelebAData) -> str:
    chosen = {k: getattr(settings, k) for k in _FINGERPRINT_FIELDS}
    blob = json.dumps([chosen, len(data), data.labels.sum(axis=0).tolist(), sorted(set(data.splits.tolist()))],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()
                  and not p.name.endswith(".tmp"))


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, fingerprint: str, keep: int) -> Path:
    from safetensors.torch import save_file

    torch = _torch()
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint exists completely or not at all
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    torch = _torch()
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")  # no code is unpickled
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(json.loads((path / STATE_FILE).read_text())["step"])


# --- calibration and metrics ---------------------------------------------------------
def fit_calibration(logits: np.ndarray, labels: np.ndarray, iterations: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Platt scaling per attribute: (scale, bias) minimising log loss on held-out logits.

    Targets use Platt's prior correction ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)),
    so separable or one-class attributes get finite, sensible parameters.
    """
    torch = _torch()
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    pos = y.sum(0)
    neg = y.shape[0] - pos
    target = torch.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))
    scale = torch.ones(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([scale, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x * scale + bias, target, reduction="sum")
        loss.backward()
        return loss

    if x.shape[0]:
        optimizer.step(closure)
    return scale.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)


def attribute_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Per-attribute AP and accuracy (at p > 0.5), their means, and positives per attribute."""
    from sklearn.metrics import average_precision_score

    per = {}
    for i, name in enumerate(ATTRIBUTES):
        y, p = labels[:, i], probs[:, i]
        ap = float(average_precision_score(y, p)) if 0 < y.sum() < len(y) else None  # undefined for one class
        per[name] = {"ap": ap, "accuracy": float(((p > 0.5) == (y > 0)).mean()) if len(y) else None,
                     "positives": int(y.sum())}
    aps = [v["ap"] for v in per.values() if v["ap"] is not None]
    accs = [v["accuracy"] for v in per.values() if v["accuracy"] is not None]
    return {"mean_ap": float(np.mean(aps)) if aps else None, "mean_accuracy": float(np.mean(accs)) if accs else None,
            "attributes_with_ap": len(aps), "samples": int(len(labels)), "per_attribute": per}


def predict_logits(model, dataset: _Images, indices: np.ndarray, batch_size: int, device, num_workers: int) -> np.ndarray:
    torch = _torch()
    if not len(indices):
        return np.zeros((0, 40), np.float32)
    batches = [[(int(i), False) for i in indices[s:s + batch_size]] for s in range(0, len(indices), batch_size)]
    model.eval()
    out = []
    with torch.inference_mode():
        for pixels, _ in _loader(dataset, batches, num_workers):
            out.append(model(pixel_values=pixels.to(device)).logits.float().cpu().numpy())
    model.train()
    return np.concatenate(out)


# --- the run ---------------------------------------------------------------------------
def _device(name: str):
    torch = _torch()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("attributes.train.device=cuda, but torch sees no CUDA device (set it to cpu or auto)")
    return torch.device(name)


def train_attributes(data_path: str, out: str, cfg: Config, log: Log = print, fresh: bool = False) -> dict:
    """Fine-tune, calibrate, evaluate and export the attribute classifier; returns the metrics summary."""
    torch = _torch()
    settings = cfg.attributes.train
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    data = load_celeba(data_path, settings.held_out_fraction)
    train_idx = data.indices(TRAIN)
    calib_idx = data.indices(VALID)
    eval_idx = data.indices(TEST) if len(data.indices(TEST)) else calib_idx
    if not len(train_idx) or not len(calib_idx):
        raise ConfigError(f"{data.description}: needs images in the train split and in the held-out split "
                          f"(found {len(train_idx)} train, {len(calib_idx)} held out)")
    log(f"data: {data.description}; {len(train_idx)} train, {len(calib_idx)} calibration, "
        f"{len(eval_idx)} evaluation images")

    fingerprint = _fingerprint(settings, data)
    if fresh:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    device = _device(settings.device)
    model, processor = new_classifier(cfg)
    model.to(device).train()
    dataset = _Images(data, processor, cfg.image.max_pixels)
    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    total = settings.max_steps or settings.epochs * steps_per_epoch
    warmup = min(settings.warmup_steps, max(1, total // 10)) if settings.warmup_steps else 0
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))

    step = 0
    existing = _checkpoints(out_dir)
    if existing:
        state = json.loads((existing[-1] / STATE_FILE).read_text())
        if state["fingerprint"] != fingerprint:
            raise ConfigError(f"{out_dir}/checkpoints holds a run with different data or training settings; "
                              "use another --out, or --fresh to discard those checkpoints")
        step = _load_checkpoint(existing[-1], model, optimizer, scheduler)
        log(f"resuming from {existing[-1].name} (step {step} of {total})")
    model.to(device)

    loss_fn = torch.nn.BCEWithLogitsLoss()
    started, seen = time.time(), 0
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = epoch_batches(data, train_idx, settings, epoch)[skip:]
        for pixels, labels in _loader(dataset, batches, settings.num_workers):
            loss = loss_fn(model(pixel_values=pixels.to(device)).logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(labels)
            if step % settings.log_every == 0 or step == total:
                rate = seen / max(time.time() - started, 1e-9)
                eta = (total - step) * settings.batch_size / max(rate, 1e-9)
                log(f"step {step}/{total} epoch {epoch + 1} loss {loss.item():.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} | {rate:.1f} img/s, ~{eta / 60:.1f} min left")
            if step % settings.checkpoint_every == 0 or step == total:
                path = _save_checkpoint(out_dir, step, model, optimizer, scheduler, fingerprint,
                                        settings.keep_checkpoints)
                log(f"checkpoint {path.name} written")
            if step >= total:
                break

    log(f"calibrating on {len(calib_idx)} held-out images, evaluating on {len(eval_idx)}")
    calib_logits = predict_logits(model, dataset, calib_idx, settings.eval_batch_size, device, settings.num_workers)
    scale, bias = fit_calibration(calib_logits, data.labels[calib_idx])
    from facecap.models.attributes import Calibration

    calibration = Calibration(scale, bias, "platt")
    eval_logits = (calib_logits if eval_idx is calib_idx else
                   predict_logits(model, dataset, eval_idx, settings.eval_batch_size, device, settings.num_workers))
    metrics = attribute_metrics(calibration.apply(eval_logits), data.labels[eval_idx])
    metrics.update({"split": TEST if eval_idx is not calib_idx else VALID, "steps": step,
                    "data": data.description, "fingerprint": fingerprint})
    model_dir = _export(out_dir, model, processor, calibration, metrics, len(calib_idx))
    log(f"held-out ({metrics['split']}, {metrics['samples']} images): mean AP "
        f"{_fmt(metrics['mean_ap'])} over {metrics['attributes_with_ap']} attributes, mean accuracy "
        f"{_fmt(metrics['mean_accuracy'])}")
    log(f"model written to {model_dir}; annotate with it: --set attributes.backend=classifier "
        f"--set attributes.model={model_dir}")
    return {"model_dir": str(model_dir), "steps": step, **{k: metrics[k] for k in
                                                           ("mean_ap", "mean_accuracy", "split", "samples")}}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _export(out_dir: Path, model, processor, calibration, metrics: dict, calib_count: int) -> Path:
    """OUT/model: config.json, model.safetensors, preprocessor_config.json, calibration and metrics (atomic)."""
    final = out_dir / "model"
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    from facecap.models.attributes import CALIBRATION_FILE

    (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json(
        method="platt", fitted_on=f"{calib_count} held-out images"), indent=1))
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def calibrate_attribute_model(data_path: str, cfg: Config, log: Log = print, limit: int | None = None) -> dict:
    """Fit `attributes.model`'s calibration on CelebA-format held-out data and write it next to its weights.

    For either backend (typically a zero-shot CLIP, whose prompt margins are
    not probabilities): logits on the held-out split (validation, else the
    Parquet hold-out), Platt scaling per attribute, then AP and accuracy on
    the test split when there is one. Writes MODEL/attribute_calibration.json
    (which changes the model identity, so annotate reruns) and
    MODEL/calibration_metrics.json. Returns the metrics summary.
    """
    from facecap.models.attributes import (BACKENDS, CALIBRATION_FILE, Calibration, is_local_model,
                                           locate_model)

    if not is_local_model(cfg.attributes.model):
        raise ConfigError("calibration is written next to the model: set attributes.model to a local directory")
    data = load_celeba(data_path, cfg.attributes.train.held_out_fraction)
    calib_idx = data.indices(VALID)[:limit] if limit else data.indices(VALID)
    test_idx = data.indices(TEST)[:limit] if limit else data.indices(TEST)
    if not len(calib_idx):
        raise ConfigError(f"{data.description}: no held-out images to calibrate on")
    location = locate_model(cfg)
    model = BACKENDS[cfg.attributes.backend](location, cfg.attributes.device)
    batch = cfg.attributes.batch_size

    def logits(indices: np.ndarray) -> np.ndarray:
        out = []  # raw logits: an existing calibration file is ignored here and replaced at the end
        for start in range(0, len(indices), batch):
            images = [decode_image(data.image_bytes(int(i)), cfg.image.max_pixels) for i in indices[start:start + batch]]
            out.append(model.logits(images))
            if (start // batch) % 20 == 0:
                log(f"scored {start + len(images)}/{len(indices)} images")
        return np.concatenate(out)

    log(f"data: {data.description}; calibrating {cfg.attributes.backend} model {location.path} on "
        f"{len(calib_idx)} held-out images")
    calib_logits = logits(calib_idx)
    calibration = Calibration(*fit_calibration(calib_logits, data.labels[calib_idx]), "platt")
    eval_logits, split = (logits(test_idx), TEST) if len(test_idx) else (calib_logits, VALID)
    eval_labels = data.labels[test_idx] if len(test_idx) else data.labels[calib_idx]
    metrics = attribute_metrics(calibration.apply(eval_logits), eval_labels)
    metrics.update({"split": split, "data": data.description})
    (location.path / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json(
        method="platt", fitted_on=f"{len(calib_idx)} held-out images of {data.description}"), indent=1))
    (location.path / "calibration_metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"held-out ({split}, {metrics['samples']} images): mean AP {_fmt(metrics['mean_ap'])}, mean accuracy "
        f"{_fmt(metrics['mean_accuracy'])}; calibration written to {location.path / CALIBRATION_FILE}")
    return {"model_dir": str(location.path), **{k: metrics[k] for k in ("mean_ap", "mean_accuracy", "split",
                                                                          "samples")}}
