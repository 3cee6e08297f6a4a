"""`facecap caption-preview`: the raw captions a grammar gives for some attributes (and, with an endpoint, the rewrite)."""

from __future__ import annotations

import argparse
import difflib
import textwrap

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "caption-preview", help="print the captions the grammar (and LLM rewrite, if configured) gives for attributes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Print K raw captions the caption grammar samples for one face's attributes,
            seeds SEED, SEED+1, ..., so people editing the grammar see the effect at once.

              facecap caption-preview --attributes Male,Smiling,Eyeglasses,Black_Hair --absent No_Beard -n 5
              facecap caption-preview --grammar my.pcfg --attributes Wavy_Hair,Blond_Hair,Young

            With an LLM endpoint configured (--set llm.endpoint=http://host:8000/v1, or
            llm.endpoint in --config) each raw caption is also rewritten and checked:
            kept attributes omitted, attributes invented, and whether it passed.
            Attribute names are CelebA's 40 (see `facecap/attributes.py`)."""))
    add_config_args(p)
    p.add_argument("--attributes", required=True, metavar="A,B,...", help="kept attributes, comma-separated")
    p.add_argument("--absent", default="", metavar="A,B,...",
                   help="confidently absent attributes (negative evidence, e.g. No_Beard,Eyeglasses)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="first sampling seed (default 0)")
    p.add_argument("-n", type=int, default=5, metavar="K", help="captions to print (default 5)")
    p.add_argument("--grammar", metavar="FILE", help="grammar file (default: caption.grammar, else the built-in one)")
    p.set_defaults(handler=run)


def parse_names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in ATTRIBUTES:
            close = difflib.get_close_matches(name, ATTRIBUTES, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{flag}: {name!r} is not a CelebA attribute{hint}. Names: {', '.join(ATTRIBUTES)}")
    return names


def run(args: argparse.Namespace) -> int:
    from facecap.config import load_config
    from facecap.stages.base import Counters
    from facecap.stages.caption import PASSED, Captioner
    from facecap.text.faithfulness import check_caption

    if args.n < 1:
        raise ConfigError("-n must be at least 1")
    overrides = list(args.overrides) + ([f"caption.grammar={args.grammar}"] if args.grammar else [])
    cfg = load_config(args.config, overrides, args.profile)
    kept = parse_names(args.attributes, "--attributes")
    absent = [a for a in parse_names(args.absent, "--absent") if a not in kept]
    captioner = Captioner(cfg.caption, cfg.llm, cfg.llm.cache_dir)
    grammar = captioner.grammar
    print(f"grammar {grammar.source} (version {grammar.version}); kept: {', '.join(kept)}"
          + (f"; absent: {', '.join(absent)}" if absent else ""))
    raws = [grammar.caption(kept, absent, args.seed + i, cfg.caption.negatives) for i in range(args.n)]
    if captioner.client is None:
        for i, raw in enumerate(raws):
            print(f"[seed {args.seed + i}] {raw.text}")
        return 0
    print(f"rewrite: {cfg.llm.model} at {cfg.llm.endpoint}, prompt {captioner.prompt.version}", flush=True)
    replies = captioner.client.chat_many([captioner.prompt.messages(r.text) for r in raws],
                                         [args.seed + i for i in range(args.n)])
    counters = Counters()
    for i, (raw, reply) in enumerate(zip(raws, replies)):
        print(f"[seed {args.seed + i}] raw:     {raw.text}")
        if not reply.ok:
            print(f"           rewrite: (failed: {reply.error})")
            continue
        result = check_caption(reply.text, kept, absent, captioner.lexicon)
        counters.extra[PASSED if result.passed else "failed"] += 1
        print(f"           rewrite: {reply.text}")
        print(f"           check:   {'passed' if result.passed else result.reason}")
    print(f"{counters.extra[PASSED]} of {args.n} rewrites passed the check")
    return 0
