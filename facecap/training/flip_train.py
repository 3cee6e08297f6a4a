"""Train FLIP on a release: a plain training loop, free of Prefect (flows/train_flip.py wraps it).

Paper defaults (TrainSettings): AdamW with weight decay 0.05; learning rate
1e-6 rising linearly to 3e-5 over 2,000 steps, then cosine to 1e-6; mixed
precision on GPU; gradient accumulation. Every ``checkpoint_every`` steps a
checkpoint holds everything a resumed run needs to continue the same
trajectory: weights (with momentum encoders and the feature queue), optimiser,
scheduler, random generator states and the data position. Rerunning with the
same ``out`` on the same release resumes from the latest checkpoint; a changed
release (same ``out``, e.g. the train trigger after a re-curation) starts a new
run with checkpoints of its own, and OUT/model becomes that run's model.

Multi-GPU / multi-node: start the same entry point with torchrun. With
WORLD_SIZE > 1 it joins the process group, wraps the model in DDP, splits the
batches between ranks and gathers the momentum features of all ranks into the
contrastive loss (see models/flip.py). Rank 0 writes checkpoints and results.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from facecap.settings import ConfigError
from facecap.config import Config
from facecap.models.flip import FlipConfig, FlipModel, load_tokenizer
from facecap.storage import write_json_atomic

from .flip_data import FlipBatches, LoaderPosition, ReleaseSplit, make_loader, release_fingerprint

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_NAME = "trainer_state.pt"
TRAINED_ON = "trained_on.json"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_setting: str) -> Distributed:
    """Join torchrun's process group when WORLD_SIZE > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    if device_setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but torch sees no GPU; set train.device: cpu (or auto)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=device)


def check_init_refs(cfg: Config) -> None:
    """The offline profile never reaches a hub: init weights and tokenizer must be local directories there."""
    if cfg.profile != "offline":
        return
    for key in ("vision_init", "text_init", "tokenizer"):
        ref = getattr(cfg.train, key)
        if ref and not os.path.isdir(ref):
            raise ConfigError(f"train.{key}={ref!r} is not a local directory, and the offline profile downloads "
                              "nothing: give a directory written by save_pretrained, or use --profile full to fetch "
                              "hub ids")


def lr_factor(step: int, total: int, settings) -> float:
    """Multiplier of the peak lr: linear warm-up from warmup_lr, then cosine down to min_lr."""
    peak = settings.lr
    warm = min(settings.warmup_steps, total)
    if step < warm:
        return (settings.warmup_lr + (peak - settings.warmup_lr) * step / warm) / peak
    progress = (step - warm) / max(total - warm, 1)
    return (settings.min_lr + (peak - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / peak


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out: str, release_hash: str) -> Path:
    """OUT/checkpoints/<release hash>: a run on a new release (a nightly re-curation) starts its own series."""
    return Path(out) / CHECKPOINTS / release_hash[:16]


def latest_checkpoint(out: str, release_hash: str) -> Path | None:
    root = checkpoint_root(out, release_hash)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / STATE_NAME).is_file() else None


def _unwrap(model) -> FlipModel:
    return model.module if hasattr(model, "module") else model


def _save_checkpoint(out: str, model, optimizer, scheduler, scaler, trainer: dict[str, Any], rng_states: list,
                     keep: int) -> Path:
    """Write checkpoints/step-N atomically (a temp dir renamed into place), then move the `latest` pointer."""
    root = checkpoint_root(out, trainer["release_hash"])
    name = f"step-{trainer['step']:07d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    _unwrap(model).save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states, "trainer": trainer}, tmp / STATE_NAME)
    (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    write_json_atomic(str(root / LATEST), {"checkpoint": name, "step": trainer["step"]})
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the crashed run's tail)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(release_dir: str, out: str, cfg: Config, log: Callable[[str], None] = print,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume training) FLIP on RELEASE's train split; write OUT/model and OUT/train_result.json."""
    settings = cfg.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dist = setup_distributed(settings.device)
    release_dir = os.path.abspath(release_dir)
    release_hash = release_fingerprint(release_dir)
    split = ReleaseSplit(release_dir, "train", cfg.quality.test_fraction)
    stats = split.count()
    needed = settings.batch_size * dist.world_size
    if stats.rows < needed:
        held_out = ReleaseSplit(release_dir, "test", cfg.quality.test_fraction).count().rows
        why = (f" The test split holds {held_out}: a release puts each near-duplicate cluster and each source image "
               "wholly in one split, so a release of a few distinct faces can land in test; curate with "
               "quality.test_fraction=0 to keep every face in train." if held_out >= needed else "")
        raise ConfigError(f"the train split of {release_dir} has {stats.rows} captioned faces ({stats.no_text} "
                          f"without text skipped; split from {stats.split_source}); one batch needs {needed}. "
                          f"Lower train.batch_size or curate more data.{why}")
    check_init_refs(cfg)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)

    # Resume only a run on this very release; another release (same OUT) starts a new series of checkpoints.
    resume_from = latest_checkpoint(out, release_hash)
    saved: dict[str, Any] | None = None
    if resume_from is not None:
        saved = torch.load(resume_from / STATE_NAME, map_location="cpu", weights_only=True)
        model = FlipModel.from_pretrained(resume_from)
        log(f"resuming from {resume_from} (step {saved['trainer']['step']})")
    else:
        tokenizer = load_tokenizer(settings.tokenizer)
        model = FlipModel.from_config(FlipConfig.from_settings(settings, tokenizer.vocab_size))
    flip_config = model.config
    model.to(dist.device)
    model.train()
    if dist.world_size > 1:
        # The queue is filled with all ranks' features, so it stays identical everywhere: no per-step buffer sync.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, forward_sync_buffers=False)

    dataset = FlipBatches(split, settings.batch_size, flip_config.image_size, flip_config.max_text_tokens,
                          flip_config.tokenizer, cfg.image, seed=settings.seed, augment=settings.augment,
                          shuffle=True, drop_last=True, rank=dist.rank, world_size=dist.world_size)
    batches_per_epoch = dataset.batches_per_epoch()
    steps_per_epoch = max(batches_per_epoch // settings.grad_accum, 1)
    total_steps = settings.steps or settings.epochs * steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, settings))
    use_amp = dist.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    step, micro, samples_seen, bad_images, skipped_batches = 0, 0, 0, 0, 0
    position = LoaderPosition()
    log_path = out_path / "train_log.jsonl"
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        trainer = saved["trainer"]
        step, samples_seen = trainer["step"], trainer["samples_seen"]
        bad_images, skipped_batches = trainer["bad_images"], trainer["skipped_batches"]
        position = LoaderPosition(**trainer["position"])
        rng = saved["rng"]
        _set_rng_state(rng[dist.rank] if dist.rank < len(rng) else rng[0])
        if dist.is_main:
            _truncate_log(log_path, step)
    else:
        torch.manual_seed(settings.seed + dist.rank)
        random.seed(settings.seed + dist.rank)
        if dist.is_main and log_path.exists():
            log_path.unlink()
    start_step = step

    log(f"FLIP {flip_config.model_size}: {sum(p.numel() for p in params):,} trainable parameters on "
        f"{dist.device} x{dist.world_size}; train split {stats.rows:,} faces ({stats.split_source}, text from "
        f"{stats.text_column}, {stats.no_text} without text skipped); {batches_per_epoch} batches of "
        f"{settings.batch_size} per epoch per rank; {total_steps} steps")
    if flip_config.vision_init is None and flip_config.text_init is None:
        log("encoders start from random init (no pretrained ViT/BERT weights configured)")

    def checkpoint() -> None:
        trainer = {"step": step, "samples_seen": samples_seen, "bad_images": bad_images,
                   "skipped_batches": skipped_batches, "position": asdict(position), "release_hash": release_hash,
                   "release_dir": release_dir, "total_steps": total_steps}
        states = [_rng_state()]
        if dist.world_size > 1:
            states = [None] * dist.world_size
            torch.distributed.all_gather_object(states, _rng_state())
        if dist.is_main:
            _save_checkpoint(out, model, optimizer, scheduler, scaler, trainer, states, settings.keep_checkpoints)

    t0 = time.time()
    window: list[dict[str, float]] = []
    acc = {"loss": 0.0, "loss_itc": 0.0, "loss_itm": 0.0}
    first_loss = last_loss = None
    log_fh = open(log_path, "a") if dist.is_main else None
    try:
        while step < total_steps:
            dataset.position = LoaderPosition(position.epoch, position.batches_done)
            for batch in make_loader(dataset, settings.num_workers):
                position.batches_done += 1
                bad_images += batch["bad_images"]
                n = batch["pixel_values"].shape[0]
                if n < 2:  # ITM needs a negative in the batch
                    skipped_batches += 1
                    continue
                pixels = batch["pixel_values"].to(dist.device, non_blocking=True)
                ids = batch["input_ids"].to(dist.device, non_blocking=True)
                mask = batch["attention_mask"].to(dist.device, non_blocking=True)
                with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=use_amp):
                    losses = model(pixels, ids, mask)
                loss = losses["loss"] / settings.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                for k in acc:
                    acc[k] += float(losses[k].detach()) / settings.grad_accum
                samples_seen += n * dist.world_size
                micro += 1
                if micro % settings.grad_accum:
                    continue
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                record = {"step": step, "epoch": position.epoch, **{k: round(v, 6) for k, v in acc.items()},
                          "lr": scheduler.get_last_lr()[0], "temp": float(_unwrap(model).temp.detach())}
                acc = {k: 0.0 for k in acc}
                first_loss = record["loss"] if first_loss is None else first_loss
                last_loss = record["loss"]
                window = (window + [record])[-settings.log_every:]
                if log_fh:
                    log_fh.write(json.dumps(record) + "\n")
                    log_fh.flush()
                if step % settings.log_every == 0 or step == total_steps:
                    rate = (samples_seen / max(time.time() - t0, 1e-9)) if step > start_step else 0.0
                    mean = sum(r["loss"] for r in window) / len(window)
                    log(f"step {step}/{total_steps}  loss {mean:.4f} (itc {record['loss_itc']:.3f}, itm "
                        f"{record['loss_itm']:.3f})  lr {record['lr']:.2e}  epoch {position.epoch} "
                        f"({position.batches_done}/{batches_per_epoch})  {rate:,.1f} samples/s")
                if step % settings.checkpoint_every == 0 or step == total_steps:
                    checkpoint()
                if on_step is not None:
                    on_step(record)
                if step >= total_steps:
                    break
            else:
                position = LoaderPosition(position.epoch + 1, 0)
                continue
            if position.batches_done >= batches_per_epoch:
                position = LoaderPosition(position.epoch + 1, 0)
    finally:
        if log_fh:
            log_fh.close()
    seconds = time.time() - t0

    result: dict[str, Any] = {}
    if dist.is_main:
        model_dir = out_path / "model"
        tmp = out_path / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        _unwrap(model).save_pretrained(tmp)
        trained_on = {"release_dir": release_dir, "release_hash": release_hash, "steps": step,
                      "samples_seen": samples_seen, "train_split": stats.to_dict()}
        (tmp / TRAINED_ON).write_text(json.dumps(trained_on, indent=2))
        shutil.rmtree(model_dir, ignore_errors=True)
        os.rename(tmp, model_dir)
        (out_path / "config.yaml").write_text(cfg.to_yaml())
        samples_this_run = samples_seen - (saved["trainer"]["samples_seen"] if saved else 0)
        result = {
            **trained_on,
            "model_dir": str(model_dir),
            "resumed_from_step": start_step if saved else None,
            "total_steps": total_steps,
            "epochs": position.epoch + position.batches_done / max(batches_per_epoch, 1),
            "first_loss": first_loss, "final_loss": last_loss,
            "bad_images": bad_images, "skipped_batches": skipped_batches,
            "seconds": round(seconds, 2),
            "samples_per_second": round(samples_this_run / max(seconds, 1e-9), 2),
            "device": str(dist.device), "world_size": dist.world_size,
            "model": json.loads(flip_config.to_json()),
            "pretrained_weights": bool(flip_config.vision_init or flip_config.text_init),
        }
        write_json_atomic(str(out_path / "train_result.json"), result)
        log(f"trained {step} steps on release {release_hash[:12]} -> {model_dir}")
    if dist.world_size > 1:
        torch.distributed.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m facecap.training.flip_train RELEASE_DIR OUT [--config F] [--set k=v]`."""
    import argparse

    from facecap.config import load_config

    parser = argparse.ArgumentParser(prog="python -m facecap.training.flip_train",
                                     description="Train FLIP on a release (one process per GPU under torchrun).")
    parser.add_argument("release")
    parser.add_argument("out")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    train(args.release, args.out, cfg, log=print if rank == 0 else (lambda _: None))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
