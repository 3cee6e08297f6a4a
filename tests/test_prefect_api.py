"""The embedded Prefect server's launcher: it answers, and a server that cannot start says why."""

from __future__ import annotations

import socket

import httpx
import pytest

from facecap.prefect_api import PrefectServer


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
