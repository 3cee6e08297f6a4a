"""`facecap train`: train FLIP on a release."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Train FLIP (ViT image encoder + BERT text encoder, 256-d projections,
    image-text contrastive + matching losses) on RELEASE_DIR's train split,
    then evaluate it and its untrained baseline on the test split.

    RELEASE_DIR is a release written by `facecap curate` (OUT/release). The
    split comes from data/train-*.parquet + data/test-*.parquet, else a `split`
    column, else a hash of the source image id (quality.test_fraction). The
    caption column is used, else source_caption; rows without text are skipped
    and counted. Data is streamed; DataLoader workers decode and tokenise.

    Writes OUT/model (safetensors + flip_config.json + trained_on.json with the
    release's content hash), OUT/checkpoints/<release hash>/step-N every
    train.checkpoint_every steps, OUT/train_log.jsonl (loss per step),
    OUT/train_result.json and OUT/eval.json. Rerunning the same command
    resumes from the latest checkpoint and continues the same trajectory; on
    a changed release it starts a new run.

    Defaults are the paper's: ViT-B/16 + BERT-base, batch 64, AdamW wd 0.05,
    lr 1e-6 -> 3e-5 over 2,000 warm-up steps then cosine to 1e-6, 15 epochs,
    queue 61,440; mixed precision on GPU. `--model-size tiny` is the same code
    at 2 layers / 32 hidden for smoke runs. The encoders start from random init
    unless train.vision_init / train.text_init name local directories (or hub
    ids with network access): no pretrained ViT/BERT weights ship with FaceCap.
    Several GPUs or nodes: torchrun --nproc-per-node N -m facecap.training.flip_train
    RELEASE_DIR OUT [--config FILE] [--set ...] runs the same loop under DDP.
    """)


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser("train", help="train FLIP on a release (then evaluate it)", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("release", metavar="RELEASE_DIR", help="a release directory (OUT/release of facecap curate)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: model/, checkpoints/, results")
    add_config_args(p)
    p.add_argument("--model-size", choices=("base", "tiny"), help="base: ViT-B/16 + BERT-base (default); tiny")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps (default: train.epochs over the data)")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the train split (default 15)")
    p.add_argument("--batch-size", type=int, metavar="N", help="samples per micro-batch (default 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device (default auto)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--fresh", action="store_true", help="discard OUT/checkpoints instead of resuming")
    p.set_defaults(handler=run)


def train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    for flag, key in (("model_size", "model_size"), ("steps", "steps"), ("epochs", "epochs"),
                      ("batch_size", "batch_size"), ("device", "device")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"train.{key}={value}")
    if getattr(args, "no_eval", False):
        overrides.append("train.evaluate=false")
    return overrides


def run(args: argparse.Namespace) -> int:
    from facecap.config import load_config
    from facecap.training.flip_data import ReleaseSplit

    cfg = load_config(args.config, train_overrides(args), args.profile)
    ReleaseSplit(args.release, "train", cfg.quality.test_fraction)  # a bad release fails before any server starts
    if args.fresh:
        import shutil
        from pathlib import Path

        shutil.rmtree(Path(args.out) / "checkpoints", ignore_errors=True)
    return run_train_flow(args.release, args.out, cfg)


def run_train_flow(release: str, out: str, cfg) -> int:
    """Run the train-flip flow under the configured (or an embedded) Prefect API and print a summary."""
    from facecap.prefect_api import prefect_api

    with prefect_api():
        from facecap.flows.train_flip import train_flip

        result = train_flip(release_dir=release, out=out, config=cfg.model_dump(mode="json"))
    print(f"model: {result['model_dir']} ({result['steps']} steps, loss {result['first_loss']} -> "
          f"{result['final_loss']}, {result['samples_per_second']} samples/s); trained on release "
          f"{result['release_hash'][:12]}")
    if "eval" in result:
        print(f"evaluation: {result['eval']['json']}")
    return 0
