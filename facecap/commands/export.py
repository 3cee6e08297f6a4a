"""`facecap export webdataset RELEASE_DIR OUT`: tar shards that webdataset and open_clip read."""

from __future__ import annotations

import argparse
import textwrap


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "export", help="export a release to another format (webdataset tars)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Export a release to another format. The Parquet release itself already loads with
            datasets.load_dataset("parquet", data_dir="RELEASE_DIR/data") (train/test splits).

            webdataset: OUT/train-000000.tar ... and OUT/test-000000.tar ..., each sample as
            key.jpg (the face crop), key.txt (the caption; the source's alt-text when the caption
            stage was off) and key.json (every other field), plus OUT/sizes.json. Train with
            open_clip:  --train-data 'OUT/train-{000000..000009}.tar' --dataset-type webdataset
            (the command prints the exact pattern and sample count)."""))
    p.add_argument("format", choices=["webdataset"], help="output format")
    p.add_argument("release_dir", metavar="RELEASE_DIR", help="a release folder (holds release.json and data/)")
    p.add_argument("out", metavar="OUT", help="output folder for the tar shards")
    p.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N",
                   help="samples per tar (default 10000, like img2dataset)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both", help="which split(s) to export")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.quality.export import export_webdataset

    splits = ("train", "test") if args.split == "both" else (args.split,)
    summary = export_webdataset(args.release_dir, args.out, args.samples_per_shard, splits,
                                log=lambda line: print(line, flush=True))
    if "train" in summary:
        t = summary["train"]
        print(f"open_clip: --train-data '{t['pattern']}' --train-num-samples {t['samples']} "
              "--dataset-type webdataset")
    return 0
