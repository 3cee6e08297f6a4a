"""The local Prefect server's launcher: it answers, a server that cannot start says why, and the shared one
lives as long as runs use it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from facecap.prefect_api import PrefectServer, SharedApi, answers


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


# --- the shared local API: outlives a run, reused by the next, stops once idle --------------------

def _in_a_run(home: Path, idle_minutes: float, hold_s: float = 0.0) -> subprocess.Popen:
    """A process that takes the local API like a run does, prints its URL, and holds it hold_s seconds."""
    code = ("import sys, time\nfrom facecap.prefect_api import prefect_api\n"
            f"with prefect_api(idle_minutes={idle_minutes}, log=lambda m: print(m, file=sys.stderr)) as url:\n"
            "    print(url, flush=True)\n"
            f"    time.sleep({hold_s})\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-c", code], env={**env, "PREFECT_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_the_local_api_outlives_its_run_serves_the_next_and_stops_when_idle(tmp_path):
    home = tmp_path / "prefect-home"
    shared = SharedApi(home=home)
    # Two runs at once, both holding the API for a while: one server starts, and both use it.
    first, second = _in_a_run(home, 0.1, hold_s=8), _in_a_run(home, 0.1, hold_s=8)
    url = first.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and second.stdout.readline().strip() == url
    state = shared.running()
    assert state is not None and state["url"] == url
    # A run that dies by SIGKILL still lets go of its lease; the other keeps the server up past the idle time.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stderr = second.communicate(timeout=60)[1]
    assert second.returncode == 0, stderr
    assert "starting a local Prefect API" in first.stderr.read() + stderr  # one of them started it ...
    assert stderr.count("Prefect API at") == 1
    assert answers(url), "the server outlives the runs that used it"
    # ... and the next run uses it at once.
    third = _in_a_run(home, 0.1)
    assert third.stdout.readline().strip() == url
    assert third.wait(timeout=60) == 0 and "using the local Prefect API" in third.stderr.read()
    # No run for idle_minutes (6 s): it stops by itself.
    assert _gone(state["pid"], within=60), "the idle server did not stop"
    assert not answers(url) and shared.running() is None
    # The next run starts a new one.
    fourth = _in_a_run(home, 0.1)
    assert fourth.stdout.readline().strip().startswith("http://127.0.0.1:") and fourth.wait(timeout=60) == 0
    assert shared.running() is not None
    assert shared.stop() is not None and shared.running() is None


def test_api_command_shows_and_stops_the_local_api(tmp_path):
    home = tmp_path / "prefect-home"
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(home)}

    def api(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "facecap", "api", action], env=env, capture_output=True,
                              text=True, timeout=120)

    none = api("status")
    assert none.returncode == 1 and "no local Prefect API is running" in none.stdout
    run = _in_a_run(home, 5)
    url = run.stdout.readline().strip()
    assert run.wait(timeout=60) == 0
    status = api("status")
    assert status.returncode == 0 and url in status.stdout and "stops after 5 idle minutes" in status.stdout
    pid = SharedApi(home=home).running()["pid"]
    stopped = api("stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert _gone(pid, within=10) and not answers(url)
    assert "no local Prefect API is running" in api("stop").stdout


def test_a_run_killed_while_the_api_boots_leaves_it_to_the_next_run(tmp_path):
    """Recorded as it launches: the next run waits for the booting server instead of starting a second one
    on the same database."""
    home = tmp_path / "prefect-home"
    shared = SharedApi(home=home)
    first = _in_a_run(home, 0.1)
    deadline = time.monotonic() + 60
    while not shared.state_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    state = json.loads(shared.state_path.read_text())
    assert not answers(state["url"]), "the server answered before the run could be killed while it booted"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = _in_a_run(home, 0.1)
    assert second.stdout.readline().strip() == state["url"]
    assert second.wait(timeout=120) == 0 and "using the local Prefect API" in second.stderr.read()
    assert shared.running()["pid"] == state["pid"]
    shared.stop()
