"""FaceCap's Prefect deployments, defined once in code.

`facecap deploy` registers them on a Prefect server for a work pool (run by
`prefect worker start --pool facecap` on each worker host); `facecap serve`
registers them and runs their flow runs in its own process, for one machine.
`prefect.yaml` is rendered from the same definitions (`facecap deploy
--write-prefect-yaml`), so `prefect deploy --all` gives the same deployments.

Deployments (flow/deployment):
  facecap-curate/curate     curate sources into OUT/release; parameters edited in the UI
  facecap-curate/recurate   the same on a cron schedule (deploy.recurate_cron) over deploy.sources
  validate/validate         quality suites on a release folder
  facecap-train/train       FLIP training; triggered by every completed facecap-curate run
  facecap-eval/eval         FLIP evaluation of a checkpoint on a release
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import yaml

from facecap.settings import ConfigError
from facecap.config import Config, load_config

WORK_POOL_TYPE = "process"
# Deployments run flows from the installed package (works in any environment with FaceCap installed).
CURATE_ENTRYPOINT = "facecap.flows.deployments:curate_deployment"
TRAIN_ENTRYPOINT = "facecap.flows.deployments:train_deployment"
EVAL_ENTRYPOINT = "facecap.flows.deployments:eval_deployment"
VALIDATE_ENTRYPOINT = "facecap.flows.validate:validate"
TAKEDOWN_ENTRYPOINT = "facecap.flows.takedown:takedown"
CURATE_FLOW_NAME = "facecap-curate"  # what the train trigger listens for (flows/deployments.py names it)


def flatten_settings(mapping: dict | None, prefix: str = "") -> list[str]:
    """{"detect": {"min_score": 0.9}} -> ["detect.min_score=0.9"] (the --set form; values as YAML)."""
    out: list[str] = []
    for key, value in (mapping or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(flatten_settings(value, dotted + "."))
        else:
            out.append(f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def resolve_config(config_file: str | None = None, config: dict | None = None, settings: list[str] | None = None,
                   profile: str | None = None) -> Config:
    """The run's Config from a deployment's parameters: file < config mapping < settings < profile."""
    if config is not None and not isinstance(config, dict):
        raise ConfigError("the config parameter must be a mapping of sections, e.g. {detect: {min_score: 0.95}}")
    return load_config(config_file, flatten_settings(config) + list(settings or []), profile)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: what runs, with which default parameters, when, and on what events."""

    name: str
    entrypoint: str  # module.path:function
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    timezone: str = "UTC"
    triggers: list[dict] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @property
    def file_entrypoint(self) -> str:
        """The entrypoint as a path from the project root (what prefect.yaml uses)."""
        module, _, function = self.entrypoint.partition(":")
        for package, folder in _PACKAGE_DIRS.items():
            if module.startswith(package + "."):
                return f"{folder}/{module[len(package) + 1:].replace('.', '/')}.py:{function}"
        return f"{module.replace('.', '/')}.py:{function}"


# pyproject.toml installs these top-level folders as facecap.* packages.
_PACKAGE_DIRS = {"facecap.flows": "flows", "facecap.tasks": "tasks", "facecap.models": "models",
                 "facecap.quality": "quality"}


def train_trigger(cfg: Config) -> dict:
    """A completed facecap-curate run (from any deployment) runs the train deployment on its release.

    A curate run that fails (failed shards, a failed quality gate) emits
    prefect.flow-run.Failed instead, so no training starts. The release path
    comes from the completed run's own `out` parameter.
    """
    return {
        "type": "event",
        "name": "train on each new release",
        "description": "A completed facecap-curate flow run starts FLIP training on OUT/release.",
        "enabled": cfg.deploy.train_on_release,
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": CURATE_FLOW_NAME},
        "expect": ["prefect.flow-run.Completed"],
        "for_each": ["prefect.resource.id"],
        "posture": "Reactive",
        "threshold": 1,
        "parameters": {
            "release_dir": "{{ flow_run.parameters.out }}/release",
            "out": "{{ flow_run.parameters.out }}/train",
        },
    }


def deployment_specs(cfg: Config, config_file: str | None = None, settings: list[str] | None = None,
                     profile: str | None = None) -> list[DeploymentSpec]:
    """Every deployment, with `config_file`/`settings`/`profile` as the runs' default parameters."""
    common = {"config_file": config_file, "settings": list(settings or []), "profile": profile}
    tags = list(cfg.deploy.tags)
    specs = [
        DeploymentSpec("curate", CURATE_ENTRYPOINT,
                       "Curate image-text sources into a face release at OUT/release. Edit sources, out, "
                       "settings (section.key=value) or config_file per run.",
                       {**common, "llm_endpoint": cfg.llm.endpoint, "dask_address": cfg.execution.dask_address},
                       tags=tags + ["curate"]),
        DeploymentSpec("validate", VALIDATE_ENTRYPOINT, "Run the quality suites on a release folder.",
                       {"allow_failures": False, "overrides": list(settings or [])}, tags=tags + ["validate"]),
        DeploymentSpec("train", TRAIN_ENTRYPOINT,
                       "Train FLIP on a release; runs by itself when a facecap-curate run completes.",
                       dict(common), triggers=[train_trigger(cfg)], tags=tags + ["train"]),
        DeploymentSpec("eval", EVAL_ENTRYPOINT, "Evaluate a FLIP checkpoint on a release's test split.",
                       dict(common), tags=tags + ["eval"]),
        DeploymentSpec("takedown", TAKEDOWN_ENTRYPOINT,
                       "Take a person's faces out of OUT's release (by photo path, URL or sample id), add them to "
                       "the exclusion list and publish a new release version; dry_run shows what would go.",
                       {"images": [], "urls": [], "sample_ids": [], "dry_run": True}, tags=tags + ["takedown"]),
    ]
    if cfg.deploy.sources and cfg.deploy.out:
        specs.insert(1, DeploymentSpec(
            "recurate", CURATE_ENTRYPOINT,
            "Scheduled re-curation of deploy.sources: only new or changed shards, and stages whose settings "
            "changed, do work; the funnel artifact says how much was already done.",
            {**common, "sources": list(cfg.deploy.sources), "out": cfg.deploy.out,
             "llm_endpoint": cfg.llm.endpoint, "dask_address": cfg.execution.dask_address},
            cron=cfg.deploy.recurate_cron, timezone=cfg.deploy.timezone, tags=tags + ["curate", "scheduled"]))
    return specs


def skipped_notes(cfg: Config) -> list[str]:
    if cfg.deploy.sources and cfg.deploy.out:
        return []
    return ["no recurate deployment: set deploy.sources and deploy.out (and deploy.recurate_cron) to schedule one"]


def _import_flow(entrypoint: str):
    import importlib

    module, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)


def runner_deployments(specs: list[DeploymentSpec], work_pool: str | None = None) -> list:
    """Prefect RunnerDeployment objects for `serve()` (no pool) or `apply()` (a work pool)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for spec in specs:
        flow = _import_flow(spec.entrypoint)
        parameters = {k: v for k, v in spec.parameters.items() if v is not None}
        kwargs: dict[str, Any] = {}
        if spec.cron:
            from prefect.client.schemas.schedules import CronSchedule

            kwargs["schedule"] = CronSchedule(cron=spec.cron, timezone=spec.timezone)
        deployments.append(flow.to_deployment(
            name=spec.name, parameters=parameters, description=spec.description, tags=spec.tags,
            triggers=[DeploymentEventTrigger(**t) for t in spec.triggers], work_pool_name=work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH, **kwargs))
    return deployments


def register(specs: list[DeploymentSpec], work_pool: str, log=print) -> dict[str, str]:
    """Create or update the deployments (and the work pool, if missing) on the configured Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type=WORK_POOL_TYPE))
            log(f"created work pool {work_pool!r} ({WORK_POOL_TYPE}); start workers with: "
                f"prefect worker start --pool {work_pool}")
        except ObjectAlreadyExists:
            pass
    ids = {}
    for spec, deployment in zip(specs, runner_deployments(specs, work_pool)):
        ids[f"{deployment.flow_name}/{spec.name}"] = str(deployment.apply(work_pool_name=work_pool))
    return ids


def serve(specs: list[DeploymentSpec], limit: int | None = None) -> None:
    """Register the deployments and run their flow runs in this process until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*runner_deployments(specs), limit=limit, print_starting_message=True)


@contextmanager
def prefect_server(port: int = 4200, log=print, startup_timeout: float = 180) -> Iterator[str]:
    """A `prefect server start` subprocess (API, UI, scheduler, event triggers) for `facecap serve`.

    Prefect's embedded server runs no scheduler and no UI, so cron schedules would never fire;
    this is a full server on 127.0.0.1 with its database in PREFECT_HOME (run history persists).
    The port is `port` if free, else any free one.
    """
    import os

    from facecap.prefect_api import PrefectServer

    server = PrefectServer(port, full=True)
    url = server.api_url
    log(f"starting a Prefect server (UI and API) on http://127.0.0.1:{server.port} "
        "(set PREFECT_API_URL to use your own)")
    try:
        try:
            server.start(timeout=startup_timeout)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # flow-run subprocesses and Dask workers inherit it
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        server.stop(timeout=30)


def prefect_yaml(specs: list[DeploymentSpec], work_pool: str, project_dir: str = "/app") -> str:
    """prefect.yaml for `prefect deploy --all` from the project root, equal to what `facecap deploy` registers."""
    deployments = []
    for spec in specs:
        entry: dict[str, Any] = {
            "name": spec.name,
            "entrypoint": spec.file_entrypoint,
            "description": spec.description,
            "tags": spec.tags,
            "parameters": {k: v for k, v in spec.parameters.items() if v is not None},
            "work_pool": {"name": work_pool, "work_queue_name": "default"},
        }
        if spec.cron:
            entry["schedules"] = [{"cron": spec.cron, "timezone": spec.timezone, "active": True}]
        if spec.triggers:
            entry["triggers"] = spec.triggers
        deployments.append(entry)
    document = {
        "name": "facecap",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        # Workers run the installed package from the image's project directory; nothing to pull.
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": project_dir}}],
        "deployments": deployments,
    }
    header = ("# Generated by `facecap deploy --config docker/facecap.yaml --config-at /etc/facecap/config.yaml "
              "--write-prefect-yaml prefect.yaml`\n"
              "# from facecap/deploy.py; edit those, then regenerate (tests/test_deployments.py checks they agree).\n"
              "# Use: prefect deploy --all   (from the project root, with PREFECT_API_URL set)\n")
    return header + yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False, width=110)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated values out in full (no &id001 anchors): prefect.yaml is read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
