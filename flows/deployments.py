"""The flows that Prefect deployments run: what people start from the UI, a schedule or an event.

Each takes parameters a person can edit in the UI's run form (sources, output,
a config file, `--set`-style settings, an LLM endpoint, a Dask scheduler),
resolves them into the one typed Config, and runs the project's flow with the
task runner it needs (the curate flow needs Dask: a local cluster, or the
scheduler given). The CLI runs the same inner flows directly.

A deployment run's outcome is the inner flow's: a failed shard or a failed
quality gate fails the run, so a failed curate run triggers no training.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from prefect import flow, get_run_logger

from facecap.settings import ConfigError
from facecap.config import Config
from facecap.deploy import CURATE_FLOW_NAME as CURATE_FLOW  # the train trigger listens for this flow's runs
from facecap.deploy import resolve_config

TRAIN_FLOW = "facecap-train"
EVAL_FLOW = "facecap-eval"


def _absolute(path: str, what: str) -> str:
    from facecap import storage

    if "://" not in path and not path.startswith("/"):
        # A deployment runs in a worker's working directory, not the user's.
        raise ConfigError(f"{what} must be an absolute path or a URL in a deployment, got {path!r}")
    return storage.absolute(path)


def _config(config_file: str | None, config: dict | None, settings: list[str] | None, profile: str | None,
            **extra: Any) -> Config:
    extra_settings = [f"{key}={value}" for key, value in extra.items() if value is not None]
    return resolve_config(config_file, config, list(settings or []) + extra_settings, profile)


def _project_flow(entrypoint: str):
    """Import a project flow when a run needs it (curate runs never import torch); missing: a clear error."""
    module, _, name = entrypoint.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"flow {entrypoint} is not available in this install ({exc})") from exc


@flow(name=CURATE_FLOW, flow_run_name="curate {out}", log_prints=True)
def curate_deployment(
    sources: list[str],
    out: str,
    config_file: str | None = None,
    settings: list[str] | None = None,
    config: dict | None = None,
    profile: str | None = None,
    llm_endpoint: str | None = None,
    dask_address: str | None = None,
) -> dict:
    """Curate SOURCES into OUT/release (the `facecap curate` flow, with its settings as parameters).

    settings: `section.key=value` overrides, e.g. ["detect.min_score=0.95"]; config: a partial config
    mapping (applied before settings); config_file: a YAML file readable where the run executes.
    Rerunning with the same sources and settings skips every finished shard (stage keys); the run's
    funnel artifact says how many shards were already done.
    """
    cfg = _config(config_file, config, settings, profile,
                  **{"llm.endpoint": llm_endpoint, "execution.dask_address": dask_address})
    out = _absolute(out, "out")
    # The CLI quiets Dask through the environment before importing it; here Dask is already imported.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from facecap.flows.curate import curate, task_runner_for

    get_run_logger().info(f"curate {len(sources)} source(s) -> {out} "
                          f"({'Dask at ' + cfg.execution.dask_address if cfg.execution.dask_address else 'a local Dask cluster'})")
    return curate.with_options(task_runner=task_runner_for(cfg))(
        sources=list(sources), out=out, config=cfg.model_dump(mode="json"))


@flow(name=TRAIN_FLOW, flow_run_name="train {release_dir}", log_prints=True)
def train_deployment(
    release_dir: str,
    out: str,
    config_file: str | None = None,
    settings: list[str] | None = None,
    config: dict | None = None,
    profile: str | None = None,
) -> Any:
    """Train FLIP on RELEASE_DIR into OUT (the train trigger fills both from the curate run that completed)."""
    cfg = _config(config_file, config, settings, profile)
    train = _project_flow("facecap.flows.train_flip:train_flip")
    get_run_logger().info(f"train on {release_dir} -> {out}")
    return train(release_dir=_absolute(release_dir, "release_dir"), out=_absolute(out, "out"),
                 config=cfg.model_dump(mode="json"))


@flow(name=EVAL_FLOW, flow_run_name="eval {checkpoint}", log_prints=True)
def eval_deployment(
    checkpoint: str,
    release_dir: str,
    out: str,
    config_file: str | None = None,
    settings: list[str] | None = None,
    config: dict | None = None,
    profile: str | None = None,
) -> Any:
    """Evaluate a FLIP checkpoint on a release's test split (retrieval R@k, attribute probes) into OUT."""
    cfg = _config(config_file, config, settings, profile)
    evaluate = _project_flow("facecap.flows.eval_flip:eval_flip")
    return evaluate(checkpoint=_absolute(checkpoint, "checkpoint"), release_dir=_absolute(release_dir, "release_dir"),
                    out=_absolute(out, "out"), config=cfg.model_dump(mode="json"))
