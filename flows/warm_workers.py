"""Local Dask workers forked from a process that has already imported their code.

A spawned worker process imports distributed, Prefect's task engine and the
stage code before it can take a task: seconds of a core, paid after the flow
has found that it needs a worker. The `facecap` command instead starts
multiprocessing's fork server as its first step; the server imports that code
on an idle core while the command imports its own, and the local cluster's
nannies then fork every worker from it (each of the run's, and any restarted
one), each ready in a fraction of a second.

Only a process that runs one command does this: a fork server keeps the
environment it was started with. What a worker needs that is decided later,
the Prefect API URL of the run, its nanny passes to it, and the worker's
`StageImports` plugin has Prefect read it as the worker starts.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys

# What a local worker imports before its first task (see flows/executor.py, StageImports), and what its
# first shard would: pyarrow builds tables from Python rows through pandas, detect runs on onnxruntime.
PRELOAD = ("distributed", "prefect.task_engine", "facecap.tasks.stages", "facecap.flows.executor", "pandas",
           "onnxruntime")
_started: list[int] = []  # the fork server this process started (not one a fork inherited)


def nanny_environ() -> dict[str, str]:
    """What Dask's nannies set in a local worker's environment (distributed.nanny.pre-spawn-environ: one
    thread for OpenMP, MKL and OpenBLAS), less MALLOC_TRIM_THRESHOLD_=65536.

    Setting that at all turns off glibc's adaptive mmap threshold, so every decoded
    image and crop is a fresh mmap and page faults: detect ran 15-20 % slower in a
    worker than in a plain process (bench/README.md). Local workers go without.
    """
    import dask.config

    if "distributed" not in sys.modules:  # its defaults, these among them, load as it is imported
        import importlib.util

        import yaml

        package = importlib.util.find_spec("distributed").submodule_search_locations[0]
        with open(os.path.join(package, "distributed.yaml")) as fh:  # without the second its import takes
            dask.config.update_defaults(yaml.safe_load(fh))
    spawn_environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {k: str(v) for k, v in spawn_environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}


def start() -> None:
    """Start the fork server now and have this process's local Dask clusters fork their workers from it
    (where the platform has one; elsewhere workers are spawned)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    import dask.config

    # A nanny sets these in its own environment before it spawns a worker, which a forked worker would not
    # see: they go into the server's environment instead.
    environ = nanny_environ()
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    # Started ignoring SIGINT (a disposition that survives exec), the server keeps ignoring it while it imports
    # its preload, and so does every worker it forks: Ctrl-C reaches the command's whole process group, and the
    # command, interrupted, stops its cluster (see executor.LeaveInterruptsToTheCommand). Otherwise a server
    # still importing printed a KeyboardInterrupt traceback.
    interrupts = _ignore_interrupts()
    try:
        before = _server_pid()
        multiprocessing.forkserver.ensure_running()
        if _server_pid() != before:
            _started.append(_server_pid())
    finally:
        if interrupts is not None:
            signal.signal(signal.SIGINT, interrupts)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    import distributed.utils  # after the server's start: this process needs it later anyway

    # distributed would otherwise import its own preload list (pandas among it) into this process, to set it on
    # a server that is already running and would ignore it.
    distributed.utils._forkserver_preload_set = True


def _ignore_interrupts():
    """Ignore SIGINT in this process; returns the handler to put back (None off the main thread, where Python
    allows no handler to be set)."""
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return None


def wait_until_ready() -> None:
    """Return once the fork server has imported its preload: it forks a process that exits at once, which it
    can only do after those imports."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    process = multiprocessing.get_context("forkserver").Process(target=_exit_at_once)
    process.start()
    process.join()


def _exit_at_once() -> None:
    pass


def inherit() -> None:
    """In a process forked from one that started the fork server (facecap/warm_process.py): use that server.

    The fork carries the server's address over, but multiprocessing checks that the
    server is alive with waitpid, which works only in the process that started it,
    so in a forked child every later start would fail. Here it is checked with a
    signal 0 instead; if it has died, a server of this process's own is started.
    """
    server = multiprocessing.forkserver._forkserver
    inherited = server._forkserver_pid
    _started.clear()  # the warm process's: never this process's to stop
    if inherited is None:
        return
    start_own = server.ensure_running

    def ensure_running() -> None:
        try:
            os.kill(inherited, 0)
        except ProcessLookupError:
            server.ensure_running = multiprocessing.forkserver.ensure_running = start_own
            server._forkserver_pid = None  # not this process's child: nothing of it to wait for or close
            start_own()
        else:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()

    server.ensure_running = multiprocessing.forkserver.ensure_running = ensure_running  # the method and its alias


def stop() -> None:
    """Stop the fork server this process started, at once (its workers are gone by now); one inherited from a
    warm process stays, for that process's other commands. Left to itself it exits when this process does, but
    only after tearing down every module it imported: most of a second during which it still holds the
    command's standard output open, so a pipe reading it would not see the end."""
    while _started:
        try:
            os.kill(_started.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _server_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # the server ensure_running started, if any
