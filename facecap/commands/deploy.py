"""`facecap deploy`: register FaceCap's Prefect deployments on a Prefect server for a work pool."""

from __future__ import annotations

import argparse
import os
import textwrap


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "deploy", help="register the Prefect deployments (curate, recurate, validate, train, eval) on a server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Register FaceCap's deployments on the Prefect server at PREFECT_API_URL, in
            the work pool deploy.work_pool (created as a process pool if missing). Workers
            run them: `prefect worker start --pool facecap` on hosts with FaceCap installed.

              facecap-curate/curate     curate sources -> OUT/release (parameters edited in the UI)
              facecap-curate/recurate   the same on deploy.recurate_cron over deploy.sources
                                        (only when deploy.sources and deploy.out are set)
              validate/validate         quality suites on a release folder
              facecap-train/train       FLIP training; started by every completed curate run
                                        (deploy.train_on_release)
              facecap-eval/eval         evaluate a FLIP checkpoint on a release

            --config, --set and --profile become the deployments' default parameters
            (config_file, settings, profile): the config file must be readable where
            the runs execute. With --write-prefect-yaml FILE nothing is registered:
            FILE gets the same deployments for `prefect deploy --all`."""))
    add_config_args(p)
    p.add_argument("--work-pool", metavar="NAME", help="work pool (default: deploy.work_pool, 'facecap')")
    p.add_argument("--write-prefect-yaml", metavar="FILE", help="write prefect.yaml instead of registering")
    p.add_argument("--config-at", metavar="PATH",
                   help="where runs read --config (default: its absolute path here; the docker images mount "
                        "docker/facecap.yaml at /etc/facecap/config.yaml)")
    p.add_argument("--project-dir", default="/app", metavar="DIR",
                   help="where workers find the project (prefect.yaml's working directory; default /app, the images')")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap import deploy
    from facecap.settings import ConfigError
    from facecap.config import load_config

    cfg = load_config(args.config, args.overrides, args.profile)
    config_file = args.config_at or (os.path.abspath(args.config) if args.config else None)
    specs = deploy.deployment_specs(cfg, config_file, args.overrides, args.profile)
    pool = args.work_pool or cfg.deploy.work_pool
    for note in deploy.skipped_notes(cfg):
        print(f"note: {note}")
    if args.write_prefect_yaml:
        from facecap import storage

        storage.write_bytes_atomic(args.write_prefect_yaml,
                                   deploy.prefect_yaml(specs, pool, args.project_dir).encode())
        print(f"wrote {len(specs)} deployments to {args.write_prefect_yaml}")
        return 0

    from facecap.prefect_api import configured_api_url

    url = configured_api_url()
    if not url:
        raise ConfigError("facecap deploy registers on a running Prefect server: set PREFECT_API_URL "
                          "(e.g. http://prefect:4200/api), or use `facecap serve` on one machine")
    print(f"registering {len(specs)} deployments on {url} in work pool {pool!r}")
    for name, deployment_id in deploy.register(specs, pool).items():
        print(f"  {name}  ({deployment_id})")
    print(f"run them from the UI, or: prefect deployment run 'facecap-curate/curate' "
          f"--param sources='[\"/data/in\"]' --param out=/data/out; workers: prefect worker start --pool {pool}")
    return 0
