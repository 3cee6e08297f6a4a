"""Shared fixtures: one real Prefect API (the test harness) and example data on disk."""

from __future__ import annotations

import os
import tempfile

# Before Prefect is imported anywhere: keep its state out of ~/.prefect and
# send nothing anywhere.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="facecap-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from facecap.config import Config  # noqa: E402
from facecap.example_data import write_example_data  # noqa: E402

# Prefect sets up its logging handlers once per process, on the first flow run, bound to the
# sys.stderr of that moment. If that first run were inside a `capsys` test, every later run would
# log to capsys's closed stream (and, with log_prints, recurse through print). Set them up now, on
# the session's streams, so the suite does not depend on test order.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()


def pytest_collection_modifyitems(items):
    """A test that asks for the Prefect API, directly or through a fixture, is a flow test: marked here so the mark
    cannot drift from what the test needs."""
    for item in items:
        if "prefect_api_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.flow)


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """A real Prefect API server (Prefect's test harness) for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("example")
    write_example_data(root)
    return root


@pytest.fixture(scope="session")
def curated_example(prefect_api_url, example_dir, tmp_path_factory) -> tuple[Path, dict, Config]:
    """One real curate of the example data for the whole session: its output folder, the flow's result and the
    settings. Tests that only read a release share it. A rerun into it must leave it as it was (tests/test_flow.py's
    rerun test asserts that it does); a test that changes its files works on a copy."""
    from helpers import example_config, example_sources, run_curate

    out = tmp_path_factory.mktemp("curated-example") / "out"
    cfg = example_config()
    return out, run_curate(example_sources(example_dir), out, cfg), cfg


@pytest.fixture(scope="session")
def detector():
    from facecap.models.registry import load_detector

    return load_detector(Config(profile="offline"))
