"""`facecap models list|fetch`: the models a profile uses, and filling the model cache."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time

DESCRIPTION = textwrap.dedent("""\
    The models each profile uses, from one pinned catalog (facecap/models/catalog.py):
    stage, model, source URL (then mirrors) or PyPI package, size, SHA-256, licence,
    and whether it is cached in models.cache_dir and passes its checks.

      list   print the catalog for --profile (default: full) and each model's state
      fetch  download what is missing into models.cache_dir: URL, then mirrors;
             size and SHA-256 checked before the file is put in place (where no
             hash is published, the first download's SHA-256 is recorded in
             <file>.sha256 and checked from then on)

    A cluster without internet: run `facecap models fetch --profile full` on one
    connected host, then share models.cache_dir (FACECAP_MODEL_CACHE, or
    --set models.cache_dir=DIR) with the workers, or copy it to them.
    Exit status of fetch: 0 only if every model of the profile is present and
    verified afterwards (the caption LLM is served by vLLM and never fetched).""")


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser("models", help="list the profile's models (source, size, sha256, licence, cached?) "
                                             "or fetch them into the model cache",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="print every model the profile uses and whether it is cached and verified",
                        description="Print every model the profile uses: stage, model, source, size, sha256, "
                                    "licence, cache file and state (verified / not cached / corrupt / installed).")
    add_config_args(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per model instead of text")
    ls.add_argument("--all", action="store_true",
                    help="every catalog entry, including those no profile uses by default (e.g. the "
                         "mobilenet0.25 .pth)")
    ls.set_defaults(handler=run_list)
    fe = sub.add_parser("fetch", help="download the profile's missing models into models.cache_dir, verified",
                        description="Download every fetchable model of the profile that is not cached and verified "
                                    "into models.cache_dir (URL, then mirrors; size and sha256 checked). Private "
                                    "addresses are refused unless models.allow_addresses names them.")
    add_config_args(fe)
    fe.set_defaults(handler=run_fetch)


def _cfg(args):
    from facecap.config import load_config

    return load_config(args.config, args.overrides, args.profile)


def _size(value: int | None) -> str:
    return f"{value:,} bytes" if value is not None else "not published"


def _describe(status, cfg) -> dict:
    from facecap.models.catalog import RECORDED

    entry = status.entry
    if entry.sha256:
        sha = entry.sha256
    elif entry.fetchable:
        sha = f"{RECORDED}: {status.sha256}" if status.sha256 else RECORDED
    elif entry.package:
        sha = "n/a (PyPI wheel; pip checks its hash)"
    else:
        sha = "n/a (not fetched)"
    if entry.size is not None:
        size = _size(entry.size)
    elif status.size is not None:
        size = f"{status.size:,} bytes (as downloaded)"
    else:
        size = "not published" if entry.fetchable else "n/a"
    row = {
        "key": entry.key, "stage": entry.stage, "model": entry.model,
        "source": entry.source, "mirrors": list(entry.urls[1:]), "size": size, "sha256": sha,
        "licence": entry.licence, "cache": str(status.path) if status.path else None,
        "state": status.state, "detail": status.detail,
    }
    if entry.key == "caption-llm":
        row["source"] = f"{entry.note}; llm.endpoint={cfg.llm.endpoint or 'unset (no rewrite)'}, llm.model={cfg.llm.model}"
    return row


def run_list(args: argparse.Namespace) -> int:
    from facecap.models import catalog

    cfg = _cfg(args)
    chosen = catalog.entries(None if args.all else cfg.profile)
    rows = [_describe(catalog.check(e, cfg.models.cache_dir), cfg) for e in chosen]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    scope = "all catalog entries" if args.all else f"profile {cfg.profile}"
    print(f"{scope}: {len(rows)} models; cache {cfg.models.cache_dir}")
    for row in rows:
        state = row["state"] if row["state"] != "verified" else "cached, verified"
        print(f"\n{row['stage']}: {row['model']} [{row['key']}]")
        print(f"  source:  {row['source']}")
        for mirror in row["mirrors"]:
            print(f"  mirror:  {mirror}")
        print(f"  size:    {row['size']}")
        print(f"  sha256:  {row['sha256']}")
        print(f"  licence: {row['licence']}")
        if row["cache"]:
            print(f"  cache:   {row['cache']}")
        print(f"  state:   {state}" + (f" ({row['detail']})" if row["detail"] else ""))
    return 0


class _Progress:
    """Prints a line every ~10 % (or every 2 s without a Content-Length)."""

    def __init__(self, url: str):
        self.url, self.next_pct, self.last = url, 10, time.monotonic()

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            pct = done * 100 // total
            if pct >= self.next_pct:
                print(f"    {pct:3d} %  {done:,} / {total:,} bytes", flush=True)
                self.next_pct = pct - pct % 10 + 10
        elif time.monotonic() - self.last > 2:
            self.last = time.monotonic()
            print(f"    {done:,} bytes", flush=True)


def run_fetch(args: argparse.Namespace) -> int:
    from facecap.models import catalog

    cfg = _cfg(args)
    cache_dir = cfg.models.cache_dir
    problems: list[str] = []
    print(f"profile {cfg.profile}: fetching into {cache_dir}", flush=True)
    for entry in catalog.entries(cfg.profile):
        if entry.fetchable:
            try:
                catalog.fetch(entry, cache_dir, allow_addresses=cfg.models.allow_addresses,
                              max_bytes=cfg.models.max_download_bytes,
                              log=lambda line: print(f"  {line}", flush=True), progress=_Progress)
            except catalog.FetchError as exc:
                problems.append(f"{entry.key}: " + "; ".join(exc.failures))
                continue
        status = catalog.check(entry, cache_dir)
        if status.ok:
            print(f"  {entry.key}: {status.state}" + (f" ({status.detail})" if status.detail else ""), flush=True)
        else:
            problems.append(f"{entry.key}: {status.state} ({status.detail})")
    if problems:
        print("facecap: models not ready:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"all models of profile {cfg.profile} present and verified")
    return 0
