"""`facecap serve`: run FaceCap's deployments in this process (one machine, no work pool)."""

from __future__ import annotations

import argparse
import textwrap


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "serve", help="run the deployments (schedules, UI-started runs, the train trigger) in this process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Register the same deployments as `facecap deploy` and execute their runs in
            this process until Ctrl-C: runs started from the UI or the API, the recurate
            schedule (deploy.recurate_cron over deploy.sources -> deploy.out) and the train
            run each completed curate run triggers. Each run executes in a subprocess;
            curate starts its own local Dask cluster unless execution.dask_address is set.

            Uses PREFECT_API_URL if set; otherwise starts `prefect server start` on
            127.0.0.1 (--port, default 4200: its UI shows the runs; its database in
            PREFECT_HOME keeps their history) for as long as it serves. --config, --set and --profile become the runs' default parameters.
            On a cluster use `facecap deploy` and Prefect workers instead."""))
    add_config_args(p)
    p.add_argument("--port", type=int, default=4200,
                   help="port of the Prefect server started when PREFECT_API_URL is unset (default 4200, else free)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N flow runs at once (default: no limit)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    from contextlib import nullcontext

    from facecap import deploy
    from facecap.config import load_config
    from facecap.prefect_api import configured_api_url

    cfg = load_config(args.config, args.overrides, args.profile)
    config_file = os.path.abspath(args.config) if args.config else None
    specs = deploy.deployment_specs(cfg, config_file, args.overrides, args.profile)
    for note in deploy.skipped_notes(cfg):
        print(f"note: {note}", flush=True)
    def stop(signum, frame):  # SIGTERM (docker stop, kill) ends like Ctrl-C: the server started here stops too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url = configured_api_url()
    with nullcontext(url) if url else deploy.prefect_server(args.port) as url:
        print(f"serving {', '.join(s.name for s in specs)} against {url} (Ctrl-C stops)", flush=True)
        try:
            deploy.serve(specs, limit=args.limit)
        except KeyboardInterrupt:
            pass
    return 0
