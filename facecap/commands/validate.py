"""`facecap validate RELEASE_DIR`: run the quality suites on a release and write its report."""

from __future__ import annotations

import argparse
import textwrap


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "validate", help="run the quality suites on a release; write report/index.html and README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Run the release's Great Expectations suites (on DuckDB aggregates over its
            Parquet files) and write RELEASE_DIR/report/index.html (self-contained, opens
            offline), report/report.json, GX Data Docs in report/gx/, and the dataset card
            RELEASE_DIR/README.md. The verdict is recorded in release.json.

            Thresholds come from RELEASE_DIR/config.yaml (the settings the stages used);
            --set changes them for this check only, e.g. --set quality.max_duplicate_image_rate=0.1.
            Checks on columns of stages that were off are reported "not applicable".

            RELEASE_DIR is OUT/release, or a release that failed during curate and waits
            in OUT/staging/<run id>. Exit status: 0 when every applicable check passed
            (or --allow-failures), 1 when a check failed, 2 for a usage error."""))
    p.add_argument("release_dir", metavar="RELEASE_DIR", help="a release folder (holds release.json and data/)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even if checks fail; the override is recorded in release.json and the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a threshold for this validation (repeatable)")
    p.add_argument("--threads", type=int, metavar="N", help="DuckDB threads (default: all cores)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from facecap.quality.validate import validate_release

    verdict = validate_release(args.release_dir, args.overrides, args.allow_failures, threads=args.threads,
                               log=lambda line: print(line, flush=True))
    if verdict.passed:
        return 0
    if verdict.allow_failures:
        print(f"facecap: checks failed ({', '.join(verdict.failed)}); --allow-failures given: "
              "recorded in release.json", file=sys.stderr)
        return 0
    print(f"facecap: quality checks failed: {', '.join(verdict.failed)}; see {verdict.report}",
          file=sys.stderr)
    return 1
