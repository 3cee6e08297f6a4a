"""`facecap train-attributes`: fine-tune the attribute classifier on CelebA-format data."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Fine-tune the annotate stage's classifier backend (a ViT with a 40-way
    multi-label head) on CelebA-format data, calibrate it on the held-out
    split, report per-attribute AP and mean accuracy, and write OUT/model.

    DATA is either the official CelebA layout (a folder with img_align_celeba/,
    list_attr_celeba.txt and list_eval_partition.txt: trains on partition 0,
    calibrates on 1, reports on 2), or Parquet file(s) with an image column
    (bytes or {bytes, path}) and the 40 attribute columns, as public CelebA
    mirrors have them (a split/partition column is used if present, else
    attributes.train.held_out_fraction of the images, chosen by content hash,
    is held out).

    Start from a pretrained backbone with --init DIR (a local save_pretrained
    directory, e.g. google/vit-base-patch16-224-in21k downloaded elsewhere; hub
    ids work with --profile full). Without --init the backbone is randomly
    initialised, which needs far more data and steps.

    Checkpoints go to OUT/checkpoints every attributes.train.checkpoint_every
    steps; rerunning the same command resumes from the latest one. Then:
      facecap curate ... --set attributes.backend=classifier --set attributes.model=OUT/model

    No attribute weights ship with FaceCap; this command (on CelebA) is how you
    get a classifier. It needs a GPU to be practical at ViT-B/16 scale.""")


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser("train-attributes", help="train the attribute classifier on CelebA-format data",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="CelebA folder (official layout) or Parquet file/folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: checkpoints/ and model/")
    add_config_args(p)
    p.add_argument("--init", metavar="DIR_OR_HUB_ID", help="pretrained backbone to fine-tune (attributes.train.init)")
    p.add_argument("--arch", choices=("vit-base", "vit-tiny"), help="architecture without --init (default vit-base)")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the train split (default 3)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimiser steps in total")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per step (default 64)")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 5e-5)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="training device (default auto)")
    p.add_argument("--fresh", action="store_true", help="discard OUT/checkpoints instead of resuming")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("init", "init"), ("arch", "arch"), ("epochs", "epochs"), ("max_steps", "max_steps"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"attributes.train.{key}={value}")
    cfg = load_config(args.config, overrides, args.profile)
    # Fail on unreadable data before starting any server.
    from facecap.training.celeba import celeba_layout

    celeba_layout(args.data)
    from facecap.prefect_api import prefect_api

    with prefect_api():
        from facecap.flows.train_attributes import train_attributes_flow

        result = train_attributes_flow(data=args.data, out=args.out, config=cfg.model_dump(mode="json"),
                                       fresh=args.fresh)
    print(f"model: {result['model_dir']} ({result['steps']} steps); held-out {result['split']} "
          f"({result['samples']} images): mean AP {_fmt(result['mean_ap'])}, "
          f"mean accuracy {_fmt(result['mean_accuracy'])}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
