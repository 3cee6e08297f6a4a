"""Exactly one Prefect API for a whole run.

With no PREFECT_API_URL, Prefect starts a temporary server in every process
that needs one, so Dask worker processes would each start their own and fight
over one SQLite file ("database is locked"). Instead the CLI starts one local
server for the run and exports its URL before any worker starts; every worker
inherits it. If PREFECT_API_URL is set, that server is used as it is.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

# Before Prefect reads its settings: no analytics from the embedded server.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def prefect_api(log: Callable[[str], None] = print, startup_timeout: int = 90,
                meanwhile: Callable[[], object] | None = None) -> Iterator[str]:
    """Use the configured Prefect API, or start one embedded server for the duration of the block.

    The embedded server boots in its own process (a few seconds of imports and
    database set-up); `meanwhile` runs in this process during that time (the
    CLI imports the flow and starts its Dask cluster there), so the two
    start-ups overlap instead of adding up. Inside the block the API answers.
    """
    url = configured_api_url()
    if url:
        if meanwhile is not None:
            meanwhile()
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log("starting an embedded Prefect server for this run (set PREFECT_API_URL to use your own)")
    server = SubprocessASGIServer(port=SubprocessASGIServer().find_available_port())
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = planned = server.api_url  # inherited by local Dask worker processes
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=startup_timeout)
        except BaseException as exc:  # raised in the caller's thread below
            failure.append(exc)

    booting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    booting.start()
    try:
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            booting.join()
        if failure:
            raise failure[0]
        if server.api_url != planned:
            raise RuntimeError(f"the embedded Prefect server could not use port {planned} (taken meanwhile) and "
                               f"moved to {server.api_url}; workers were told the first one. Rerun the command.")
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_to_api()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop()


def _drain_to_api(timeout: float = 10.0) -> None:
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
