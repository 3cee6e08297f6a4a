"""FLIP throughput on this machine: training samples/s (tiny and ViT-B/16 + BERT-base) and loader samples/s.

    python bench/bench_flip.py                      # defaults below, a few minutes on 2 CPU cores
    python bench/bench_flip.py --base-steps 2 --base-batch 4 --loader-batches 20 --json figures.json
    python bench/bench_flip.py --smoke              # CI size: loader + tiny model only (--base-steps 0), seconds

Measured in one run:
- training samples/s: the training step alone (forward with ITC + momentum encoders + queue, ITM with
  hard negatives, backward, AdamW), on batches prepared beforehand, random init, after one warm-up step;
- loader samples/s: the release loader alone (Parquet read, JPEG decode, random resized crop + flip,
  tokenisation) over a synthetic release of face-sized JPEGs, with DataLoader workers;
- the ratio loader / training for each size: above 1 means the loader keeps the model fed.
No GPU here: CPU figures only; a GPU changes the training side by orders of magnitude, so the
ratio printed is about this machine.

`--base-steps 0` skips the ViT-B/16 + BERT-base training figure (building that model and one
step take minutes on a loaded CPU); the tiny model runs the same training step. The figures
are printed, then as JSON on the last line. It exits 1 when the loader yields no samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from facecap.settings import ImageLimits, TrainSettings
from facecap.config import Config
from facecap.models.flip import FlipConfig, FlipModel, load_tokenizer
from facecap.training.flip_data import FlipBatches, ReleaseSplit, make_loader
from facecap.training.flip_synthetic import write_synthetic_release

SMOKE = {"tiny_steps": 2, "tiny_batch": 8, "base_steps": 0, "loader_batches": 3}


def loader_rate(release: str, image_size: int, batch: int, workers: int, batches: int) -> float:
    split = ReleaseSplit(release, "train", 0.0)
    data = FlipBatches(split, batch, image_size, 65, None, ImageLimits(), augment=True, shuffle=True,
                       drop_last=True)
    loader = iter(make_loader(data, workers))
    next(loader)  # worker start-up and tokenizer load are not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches - 1):
        try:
            n += next(loader)["pixel_values"].shape[0]
        except StopIteration:
            break
    return n / (time.perf_counter() - start)


def train_rate(size: str, batch: int, steps: int, queue: int) -> tuple[float, int]:
    tok = load_tokenizer(None)
    settings = TrainSettings(model_size=size, queue_size=queue, batch_size=batch)
    model = FlipModel.from_config(FlipConfig.from_settings(settings, tok.vocab_size)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    s = model.config.image_size
    text = tok(["a smiling young woman with wavy brown hair and earrings, wearing lipstick"] * batch,
               padding="max_length", truncation=True, max_length=settings.max_text_tokens, return_tensors="pt")
    pixels = torch.randn(batch, 3, s, s)

    def step():
        loss = model(pixels, text["input_ids"], text["attention_mask"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start), sum(p.numel() for p in params)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-steps", type=int, default=20)
    ap.add_argument("--tiny-batch", type=int, default=32)
    ap.add_argument("--base-steps", type=int, default=3)
    ap.add_argument("--base-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader figure")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--face-px", type=int, default=285, help="side of the synthetic JPEG crops (paper mean: 285)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI size: loader {SMOKE['loader_batches']} batches, tiny model {SMOKE['tiny_steps']} steps "
                         f"of {SMOKE['tiny_batch']}, no base model")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the run; figures will be low", file=sys.stderr)
    threads = torch.get_num_threads()
    figures: dict[str, float | int | str] = {"torch_threads": threads, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        release = os.path.join(tmp, "release")
        per_class = max(1, (args.loader_batches * 32) // 24 + 1)
        write_synthetic_release(release, train_per_class=per_class, image_size=args.face_px)
        for size, image_px, batch in (("base", 224, 32), ("tiny", 32, args.tiny_batch)):
            rate = loader_rate(release, image_px, batch, args.workers, args.loader_batches)
            if rate <= 0:
                print(f"bench: the release loader yielded no samples at {image_px}px", file=sys.stderr)
                return 1
            figures[f"loader_{size}_{image_px}px_samples_per_s"] = round(rate, 1)
            print(f"loader ({args.workers} workers, {args.face_px}px JPEG -> {image_px}px, augment, tokenise): "
                  f"{rate:,.1f} samples/s", flush=True)
    tiny, tiny_params = train_rate("tiny", args.tiny_batch, args.tiny_steps, queue=4096)
    figures["train_tiny_samples_per_s"] = round(tiny, 1)
    print(f"train tiny ({tiny_params:,} params, batch {args.tiny_batch}, queue 4096): {tiny:,.1f} samples/s",
          flush=True)
    sizes = ["tiny"]
    if args.base_steps > 0:
        base, base_params = train_rate("base", args.base_batch, args.base_steps, queue=Config().train.queue_size)
        figures["train_base_samples_per_s"] = round(base, 2)
        print(f"train ViT-B/16 + BERT-base ({base_params:,} params, batch {args.base_batch}, queue 61,440): "
              f"{base:,.2f} samples/s", flush=True)
        sizes.insert(0, "base")
    for size in sizes:
        px = 224 if size == "base" else 32
        ratio = figures[f"loader_{size}_{px}px_samples_per_s"] / figures[f"train_{size}_samples_per_s"]
        figures[f"loader_over_train_{size}"] = round(ratio, 2)
        print(f"loader / training ({size}): {ratio:,.2f}" + ("" if ratio >= 1 else "  <- loader is the bottleneck"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
