"""Exactly one Prefect API for a whole run, and a local one that later runs reuse.

With no PREFECT_API_URL, Prefect starts a temporary server in every process
that needs one, so Dask worker processes would each start their own and fight
over one SQLite file ("database is locked"). Instead the CLI uses one local
server for the run and exports its URL before any worker starts; every worker
inherits it. If PREFECT_API_URL is set, that server is used as it is.

The local server costs seconds of CPU to boot (its imports and database set-up),
more than a small run's own work. So by default it outlives the run that started
it, in a session of its own, and the next run on this machine uses it at once:

  - a run holds a shared flock on PREFECT_HOME/facecap-api/<key>.lease for its
    whole duration (released by the kernel however the run ends, SIGKILL too);
  - the server polls for that lock exclusively; once no run has held it for
    `idle_minutes`, it keeps the lock, shuts down and exits, so a run arriving
    meanwhile waits for it to go and then starts a new one;
  - runs find it through <key>.json (port and pid, written as it launches, so a
    run killed while it boots leaves it to be waited for, not started twice),
    found or started under the exclusive <key>.lock: two runs never start two;
  - <key> is this environment (sys.prefix) and Prefect version: another gets its own.

`idle_minutes=0` gives the old behaviour: the server is the run's child and stops
with it. `facecap api status|stop` shows or stops the shared one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

# Before Prefect reads its settings: no analytics from the embedded server.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def prefect_api(log: Callable[[str], None] = print, startup_timeout: int = 90,
                meanwhile: Callable[[], object] | None = None, idle_minutes: float = 0) -> Iterator[str]:
    """Use the configured Prefect API, else a local server, for the duration of the block.

    idle_minutes > 0: the shared local server (see the module docstring), started
    if none answers; 0: a server of this run's own, stopped at the end of the block.
    A server that has to boot does so in its own process (a few seconds of imports
    and database set-up); `meanwhile` runs in this process during that time (the
    CLI imports the flow and starts its Dask cluster there), so the two start-ups
    overlap instead of adding up. Inside the block the API answers.
    """
    url = configured_api_url()
    if url:
        if meanwhile is not None:
            meanwhile()
        yield url
        return
    with contextlib.ExitStack() as stack:
        previous = os.environ.get("PREFECT_API_URL")

        def use(url: str, booting: PrefectServer | None = None) -> None:
            os.environ["PREFECT_API_URL"] = url  # inherited by local Dask worker processes
            if booting is not None:
                _boot_meanwhile(booting, startup_timeout, meanwhile)
            elif meanwhile is not None:
                meanwhile()

        if idle_minutes > 0:
            shared = SharedApi()
            stack.enter_context(shared.lease())
            with shared.start_lock():
                found = shared.running_url(wait=startup_timeout)
                if found is None:
                    server = shared.new_server(idle_minutes)
                    log(f"starting a local Prefect API at {server.api_url}; it stays up for later runs until "
                        f"{idle_minutes:g} minutes pass without one (set PREFECT_API_URL to use your own)")
                    use(server.api_url, booting=server)  # recorded as it launches: findable if this run dies
            if found is not None:
                log(f"using the local Prefect API at {found}, started by an earlier run "
                    "(`facecap api stop` stops it; set PREFECT_API_URL to use your own)")
                use(found)
        else:
            log("starting an embedded Prefect server for this run (set PREFECT_API_URL to use your own)")
            server = PrefectServer()
            stack.callback(server.stop)
            use(server.api_url, booting=server)
        stack.callback(_restore_api_url, previous)
        stack.callback(drain_to_api)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = os.environ["PREFECT_API_URL"]
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url


def _restore_api_url(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


def _boot_meanwhile(server: PrefectServer, timeout: float, meanwhile: Callable[[], object] | None) -> None:
    """Start `server` in a thread while `meanwhile` runs here; raise the server's failure, if any."""
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except BaseException as exc:  # raised in the caller's thread below
            failure.append(exc)

    booting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    booting.start()
    try:
        if meanwhile is not None:
            meanwhile()
        booting.join()
    except BaseException:
        # Interrupted (or `meanwhile` failed): wait only until the server's process exists, not the seconds
        # until it answers, so that the caller can stop a server of this run's own at once; a shared one
        # boots on in its own session, for the next run.
        while server.process is None and booting.is_alive():
            time.sleep(0.01)
        raise
    if failure:
        raise failure[0]


class PrefectServer:
    """A Prefect server in a child process on 127.0.0.1: `start` returns once its API answers.

    Three kinds. The embedded one (default) is the API alone, run by uvicorn: Prefect's own
    `SubprocessASGIServer` does the same, but importing it imports the whole server package
    into the parent (about 3 s of CPU here, paid again by the child); this needs only
    `prefect.settings`. `idle_seconds` makes it the shared one: the same API, in a session
    of its own, logging to `log_path`, exiting once no run has held `lease_path` for that
    long (`serve_until_idle`). `full=True` is `prefect server start`: UI, scheduler and
    event triggers, for `facecap serve`, whose cron schedules need the scheduler.
    """

    def __init__(self, port: int | None = None, full: bool = False, idle_seconds: float = 0,
                 lease_path: Path | None = None, log_path: Path | None = None,
                 on_launch: Callable[[PrefectServer], None] | None = None) -> None:
        self.port = port if port is not None and port_is_free(port) else free_port()
        self.full = full
        self.idle_seconds = idle_seconds
        self.lease_path = lease_path
        self.on_launch = on_launch  # called once the process exists, before it answers
        self.process: subprocess.Popen | None = None
        # Its messages go to a file, not a pipe: a pipe nobody reads would block a chatty server.
        if log_path is None:
            self.errors = tempfile.TemporaryFile()
            self.errors_from = 0
        else:
            self.errors = open(log_path, "ab+")
            self.errors_from = self.errors.seek(0, os.SEEK_END)

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
            if self.idle_seconds:
                command = ["-m", "facecap.prefect_api", "--port", str(self.port), "--idle-seconds",
                           str(self.idle_seconds), "--lease", str(self.lease_path)]
            else:
                command = ["-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
                           "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env.pop("PREFECT_API_URL", None)  # the server must not try to be a client of itself
        # The shared server outlives this run: a session of its own is not killed with the run's process group.
        return subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=self.errors,
                                start_new_session=bool(self.idle_seconds))

    def start(self, timeout: float) -> None:
        import httpx

        self.process = self._launch()
        if self.on_launch is not None:
            self.on_launch(self)
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.errors.seek(self.errors_from)
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


@dataclass
class SharedApi:
    """The local Prefect API that runs on this machine share (see the module docstring): its files and locks."""

    home: Path | None = None

    def __post_init__(self) -> None:
        if self.home is None:
            from prefect.settings import PREFECT_HOME

            self.home = Path(PREFECT_HOME.value()).expanduser()
        key = hashlib.blake2b(f"{sys.prefix}|{version('prefect')}".encode(), digest_size=6).hexdigest()
        self.dir = self.home / "facecap-api"
        self.state_path = self.dir / f"{key}.json"
        self.lease_path = self.dir / f"{key}.lease"
        self.lock_path = self.dir / f"{key}.lock"
        self.log_path = self.dir / f"{key}.log"

    def lease(self) -> contextlib.AbstractContextManager:
        """Hold the run's shared lease: the server stays up while any run holds one. Taking it waits while a
        server that found itself idle shuts down."""
        return _flocked(self.lease_path, fcntl.LOCK_SH)

    def start_lock(self) -> contextlib.AbstractContextManager:
        """Held while a run looks for the server and, finding none, starts one: two runs never start two."""
        return _flocked(self.lock_path, fcntl.LOCK_EX)

    def recorded(self) -> dict | None:
        """The recorded server, if its process is alive (it may still be booting)."""
        try:
            state = json.loads(self.state_path.read_text())
            return state if _alive(state["pid"]) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running(self) -> dict | None:
        """The recorded server, if its process is alive and its API answers."""
        state = self.recorded()
        return state if state is not None and answers(state["url"]) else None

    def running_url(self, wait: float) -> str | None:
        """The running server's API URL (a server this process neither started nor stops), or None.

        A recorded server that is alive but not answering yet is booting (its starter may have been
        killed meanwhile): it is waited for, up to `wait` seconds, rather than started twice."""
        state = self.recorded()
        deadline = time.monotonic() + wait
        while state is not None:
            if answers(state["url"]):
                return state["url"]
            if time.monotonic() > deadline or not _alive(state["pid"]):
                return None
            time.sleep(0.2)
        return None

    def new_server(self, idle_minutes: float) -> PrefectServer:
        return PrefectServer(idle_seconds=idle_minutes * 60, lease_path=self.lease_path, log_path=self.log_path,
                             on_launch=lambda server: self.record(server, idle_minutes))

    def record(self, server: PrefectServer, idle_minutes: float) -> None:
        """Write where the launched server will answer, for the runs after this one."""
        state = {"pid": server.process.pid, "port": server.port, "url": server.api_url,
                 "idle_minutes": idle_minutes, "started": time.time(), "log": str(self.log_path)}
        partial = self.state_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, self.state_path)

    def stop(self, timeout: float = 30.0) -> dict | None:
        """Stop the running shared server (SIGTERM, then SIGKILL); its state, or None if none ran."""
        state = self.running()
        if state is None:
            return None
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(state["pid"]):
            time.sleep(0.1)
        if _alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
        self.state_path.unlink(missing_ok=True)
        return state


@contextmanager
def _flocked(path: Path, operation: int) -> Iterator[None]:
    """Hold an flock on `path` (created if need be) for the block; the kernel drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaped if it was our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def serve_until_idle(port: int, idle_seconds: float, lease_path: str, poll_s: float = 1.0) -> None:
    """Serve the Prefect API on 127.0.0.1:port until no run has held `lease_path` for idle_seconds.

    Once idle it keeps the lease exclusively while it shuts down, so a run that
    arrives meanwhile waits for it to exit and then starts a new server.
    """
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), host="127.0.0.1", port=port,
                                           log_level="error", lifespan="on"))
    fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o600)

    def watch() -> None:
        free_since = None
        while not server.should_exit:
            time.sleep(poll_s)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a run holds its lease
                free_since = None
                continue
            free_since = free_since or time.monotonic()
            if time.monotonic() - free_since >= idle_seconds:
                server.should_exit = True  # the lock stays held until this process exits
                return
            fcntl.flock(fd, fcntl.LOCK_UN)

    threading.Thread(target=watch, name="idle-watch", daemon=True).start()
    server.run()


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


if __name__ == "__main__":  # the shared server's process (PrefectServer with idle_seconds)
    import argparse

    parser = argparse.ArgumentParser(description="FaceCap's shared local Prefect API (started by facecap itself).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, required=True)
    parser.add_argument("--lease", required=True)
    cli = parser.parse_args()
    serve_until_idle(cli.port, cli.idle_seconds, cli.lease)
