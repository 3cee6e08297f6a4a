"""Exactly one Prefect API for a whole run.

With no PREFECT_API_URL, Prefect starts a temporary server in every process
that needs one, so Dask worker processes would each start their own and fight
over one SQLite file ("database is locked"). Instead the CLI starts one local
server for the run, exports its URL before any worker starts (every worker
inherits it) and stops it when the run ends. If PREFECT_API_URL is set, that
server is used as it is: the way to keep a UI and run history across runs is
`prefect server start --background` (or the docker stack) and PREFECT_API_URL.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# Before Prefect reads its settings: no analytics from the embedded server.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def prefect_api(log: Callable[[str], None] = print, startup_timeout: int = 90) -> Iterator[str]:
    """Use the configured Prefect API, else a server of this run's own, stopped at the end of the block.

    Inside the block the API answers and PREFECT_API_URL names it, for this
    process and for every local Dask worker started from it.
    """
    url = configured_api_url()
    if url:
        yield url
        return
    with contextlib.ExitStack() as stack:
        stack.callback(_restore_api_url, os.environ.get("PREFECT_API_URL"))
        log("starting a Prefect server for this run (set PREFECT_API_URL to use a persistent one)")
        server = PrefectServer()
        stack.callback(server.stop)
        server.start(timeout=startup_timeout)
        os.environ["PREFECT_API_URL"] = server.api_url  # inherited by local Dask worker processes
        stack.callback(drain_to_api)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url


def _restore_api_url(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


class PrefectServer:
    """A Prefect server in a child process on 127.0.0.1: `start` returns once its API answers.

    Two kinds. The embedded one (default) is the API alone, run by uvicorn: Prefect's own
    `SubprocessASGIServer` does the same, but importing it imports the whole server package
    into the parent as well as the child; this needs only `prefect.settings`. `full=True` is
    `prefect server start`: UI, scheduler and event triggers, for `facecap serve`, whose cron
    schedules need the scheduler.
    """

    def __init__(self, port: int | None = None, full: bool = False) -> None:
        self.port = port if port is not None and port_is_free(port) else free_port()
        self.full = full
        self.process: subprocess.Popen | None = None
        # Its messages go to a file, not a pipe: a pipe nobody reads would block a chatty server.
        self.errors = tempfile.TemporaryFile()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> subprocess.Popen:
        if self.full:
            env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": self.api_url}
            command = ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                       "--analytics-off"]
        else:
            from prefect.settings import get_current_settings

            env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
                   "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            command = ["-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
                       "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env.pop("PREFECT_API_URL", None)  # the server must not try to be a client of itself
        return subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=self.errors)

    def start(self, timeout: float) -> None:
        import httpx

        self.process = self._launch()
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.errors.seek(0)
                    stderr = self.errors.read().decode(errors="replace")
                    raise RuntimeError(f"the Prefect server exited with code {self.process.returncode} "
                                       f"before answering on port {self.port}:\n{stderr[-2000:]}")
                if answers(self.api_url, client):
                    return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s on port {self.port}; "
                           "set PREFECT_API_URL to a running server instead")

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.errors.close()


def answers(api_url: str, client=None) -> bool:
    """Whether a Prefect API answers its health check at api_url."""
    import httpx

    try:
        response = (client or httpx).get(f"{api_url}/health", timeout=2)
        return response.status_code == 200
    except httpx.HTTPError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drain_to_api(timeout: float = 10.0) -> None:
    """Send buffered logs and events before the embedded server goes away.

    Otherwise Prefect's background workers retry against a stopped server at
    exit ("Error logging to API") and hold the process for a minute.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # best effort: the run's outcome is already decided
            pass
