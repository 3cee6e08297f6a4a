"""`facecap eval`: evaluate a FLIP checkpoint on a release's test split."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Evaluate CHECKPOINT (a FLIP model directory: OUT/model or
    OUT/checkpoints/<release hash>/step-N of `facecap train`) on RELEASE_DIR:

      - text->image and image->text retrieval R@1/5/10 on the test split
        (FaceCaption-15M Table 2's metric);
      - attribute linear probe: frozen image encoder, a linear 40-way head
        fitted on up to train.probe_train_samples train-split faces, mean AP
        over the attributes on the test split (Table 3's protocol); "not
        applicable" when the release has no attribute columns;
      - the same for the untrained initial model (the baseline), in the same run.

    Writes JSON (--json, default CHECKPOINT/eval.json) and, when RELEASE_DIR has
    a report/ folder, adds the results to it (report/flip_eval.json,
    report.json, the HTML page). With randomly initialised encoders the
    numbers only mean something relative to the baseline.""")


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser("eval", help="evaluate a FLIP checkpoint: retrieval R@k and attribute probe",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="FLIP model directory (flip_config.json + model.safetensors)")
    p.add_argument("release", metavar="RELEASE_DIR", help="release directory with a test split")
    p.add_argument("--json", metavar="FILE", help="results file (default CHECKPOINT/eval.json)")
    add_config_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-model baseline")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.config import load_config
    from facecap.training.flip_data import ReleaseSplit
    from facecap.training.flip_eval import evaluate

    cfg = load_config(args.config, args.overrides, args.profile)
    ReleaseSplit(args.release, "test", cfg.quality.test_fraction)
    results = evaluate(args.checkpoint, args.release, cfg, out_json=args.json, baseline=not args.no_baseline)
    print(f"results: {results['json']}")
    return 0
