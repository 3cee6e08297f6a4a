"""`facecap calibrate-attributes`: fit an attribute model's probability calibration on CelebA-format data."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Turn an attribute model's scores into calibrated probabilities: score the
    held-out split of CelebA-format DATA (as for train-attributes: the
    official layout's validation partition, or the Parquet hold-out), fit per
    attribute p = sigmoid(scale * logit + bias), and write
    MODEL/attribute_calibration.json next to the weights, plus AP and accuracy
    on the test split in MODEL/calibration_metrics.json.

    Mostly for the zero-shot backend: a CLIP's prompt-pair margins become
    probabilities that attributes.keep_threshold (0.85) can meaningfully cut.
    train-attributes already calibrates the classifiers it writes. The file
    changes the model identity, so the next curate reruns annotate.

      facecap calibrate-attributes /data/celeba --model /models/clip-vit-base-patch16""")


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser("calibrate-attributes", help="fit an attribute model's probability calibration",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="CelebA folder (official layout) or Parquet file/folder")
    p.add_argument("--model", metavar="DIR", help="the model directory (default: attributes.model)")
    p.add_argument("--backend", choices=("zero-shot", "classifier"), default="zero-shot",
                   help="attributes.backend of the model to calibrate (default zero-shot)")
    p.add_argument("--limit", type=int, metavar="N", help="use at most N held-out and N test images")
    add_config_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.config import load_config
    from facecap.training.attributes import calibrate_attribute_model

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"attributes.model={args.model}")
    if args.backend:
        overrides.append(f"attributes.backend={args.backend}")
    cfg = load_config(args.config, overrides, args.profile)
    result = calibrate_attribute_model(args.data, cfg, limit=args.limit)
    print(f"calibrated {result['model_dir']}: held-out {result['split']} ({result['samples']} images) mean AP "
          f"{'n/a' if result['mean_ap'] is None else format(result['mean_ap'], '.3f')}")
    return 0
