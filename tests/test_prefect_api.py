"""The local Prefect server's launcher: it answers, a server that cannot start says why, and a run without
PREFECT_API_URL gets one of its own that ends with it."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from facecap.prefect_api import PrefectServer, answers

pytestmark = pytest.mark.flow  # each test starts a Prefect server


def test_embedded_server_answers_and_stops():
    server = PrefectServer()
    server.start(timeout=120)
    try:
        assert httpx.get(f"{server.api_url}/health", timeout=10).json() is True
    finally:
        server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.api_url}/health", timeout=2)


def test_a_server_that_cannot_bind_reports_its_own_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = PrefectServer()
        server.port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"(?s)exited with code .*(address already in use|bind)"):
            server.start(timeout=120)


def test_a_run_without_an_api_starts_its_own_and_stops_it(monkeypatch):
    """With no PREFECT_API_URL a run gets a server of its own, named in the environment its Dask workers
    inherit, and nothing of it is left after the run."""
    from facecap.prefect_api import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        with prefect_api(log=lambda message: None) as url:
            assert os.environ["PREFECT_API_URL"] == url
            assert answers(url)
        assert "PREFECT_API_URL" not in os.environ
        assert not answers(url)
