"""A warm process that later `facecap curate` commands fork from.

Every `facecap curate` first spends seconds of a core importing: Prefect, Dask,
the flow and its stages (about 4 s here before the flow starts), then Great
Expectations for the quality suites (about 6 s more). So after a run the command
leaves behind, in a session of its own, a process that imports all of that once
and then waits on a Unix socket. The next `facecap curate` in the same
environment connects and hands over its arguments, working directory,
environment and standard streams; the warm process forks a child that runs the
command exactly as the command would have (same `main()`), with nothing left to
import. The command stays in the foreground as the child's proxy: it passes on
the signals it gets (Ctrl-C, SIGTERM, SIGHUP), exits with the child's status,
and if it is killed, even by SIGKILL, the child and its process group are
killed with it (the warm process sees the connection close). Local Dask workers
fork from the warm process's own fork server (flows/warm_workers.py).

- One per environment. The key hashes the Python executable and version,
  FaceCap's source files (path, size, mtime), what the site-packages directories
  hold (names: an install or upgrade changes them; reinstalling the same versions,
  as the setup script does on every run, does not), every environment variable, the
  working directory and the settings files Prefect and Dask read as they are
  imported (.env, prefect.toml, pyproject.toml there; Prefect's profiles; Dask's
  YAML), so a child has imported exactly what a fresh command would have.
  Anything else gets a warm process of its own; a stale one idles out. One
  whose imports fail leaves <key>.failed, and none is started for that key again.
- It holds an exclusive flock on <key>.lock for its whole life, so one key never
  has two, and it publishes its socket only once it has imported everything: a
  command that finds no socket runs by itself at once rather than wait.
- It exits once `execution.warm_minutes` pass without a command (0: no warm
  process at all), and at most MAX_WARM run per user (each holds a few hundred
  MB): starting another stops the least recently used. SIGTERM (`facecap warm
  stop`) stops it accepting commands; it exits when its running ones finish.
- Its files are in $TMPDIR/facecap-<uid>, a directory only this user can use,
  and it serves only connections from processes of its own user.

Only for curate, on Linux (fork, descriptor passing, peer credentials, /proc);
elsewhere, and for every other command, `facecap` runs in its own process.

    python -P -m facecap.warm_process KEY IDLE_SECONDS     # started by the command, not by hand
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MAX_WARM = 2
# What a curate run imports in its own process: the flow, its tasks and stages, the shared API's client, the
# Dask cluster, and the quality suites' libraries, which a warm child uses in its own process. The second
# half is what a run imports on its way (found by listing sys.modules after one): Prefect encodes the
# flow's parameters with FastAPI's encoder, the Dask scheduler starts its HTTP routes, and so on. A name
# a later version no longer has is skipped; the run then imports what it needs itself.
PRELOAD = ("facecap.cli", "facecap.flows.curate", "facecap.tasks.validate", "facecap.quality.validate",
           "facecap.quality.suites", "facecap.stages.dedup", "facecap.models.registry", "facecap.models.attributes",
           "facecap.models.identity", "facecap.text.denoise", "facecap.text.text_filter", "facecap.prefect_api",
           "facecap.release", "prefect.flow_engine", "prefect_dask", "distributed", "pandas", "scipy.sparse",
           "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "httpx", "great_expectations",
           "great_expectations.expectations",
           "fastapi.encoders", "distributed.dashboard", "distributed.diagnostics.websocket", "distributed.http.health",
           "distributed.http.proxy", "distributed.http.statics", "distributed.http.scheduler.info",
           "distributed.http.scheduler.json", "distributed.http.scheduler.prometheus", "graphviz",
           "opentelemetry.metrics", "opentelemetry._logs", "prometheus_client.core", "tornado.platform.asyncio",
           "anyio._backends._asyncio", "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls",
           "pyarrow.pandas_compat", "jinja2.ext", "rich._emoji_codes", "multiprocessing.popen_forkserver",
           "multiprocessing.synchronize", "starlette.staticfiles", "tzdata.zoneinfo")
# Variables a shell sets per command: they differ between two runs of one environment and nothing reads them.
_PER_COMMAND_ENV = frozenset({"_", "PWD", "OLDPWD", "SHLVL"})
_PACKAGES = ("facecap", "facecap.flows", "facecap.tasks", "facecap.models", "facecap.quality")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_HEADER = struct.Struct("!I")


def supported() -> bool:
    """Whether this platform can fork a warm child, hand it the command's streams and tell who connects
    (SO_PEERCRED): Linux. Elsewhere, untested here, every command runs in its own process."""
    return (hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")
            and hasattr(socket, "SO_PEERCRED") and sys.platform.startswith("linux"))


def runtime_dir() -> Path:
    """$TMPDIR/facecap-<uid>, created 0700; refused unless this user owns it and nobody else can use it."""
    path = Path(tempfile.gettempdir()) / f"facecap-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of this user's that nobody else can open (mode 0700); "
                              "remove it and rerun")
    return path


def environment_key(environ: dict[str, str] | None = None) -> str:
    """What a warm process must share with a command to run it: interpreter, code, installed packages,
    environment variables, working directory and the settings files read at import (see the module
    docstring)."""
    import importlib.util
    import site

    environ = os.environ if environ is None else environ
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{sys.executable}|{sys.version}|{os.getuid()}".encode())
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for filename in sorted(filenames):
                    st = os.stat(os.path.join(dirpath, filename))
                    h.update(f"{dirpath}/{filename}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        with contextlib.suppress(OSError):  # an install or upgrade changes the names (<name>-<version>.dist-info)
            h.update(f"{directory}|{'|'.join(sorted(os.listdir(directory)))}\n".encode())
    for name in sorted(set(environ) - _PER_COMMAND_ENV):
        h.update(f"{name}={environ[name]}\0".encode())
    cwd = os.getcwd()
    h.update(f"cwd={cwd}\n".encode())
    for path in _settings_files(cwd, environ):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _settings_files(cwd: str, environ: dict[str, str]) -> list[str]:
    """Files Prefect and Dask read their settings from as they are imported: Prefect's .env, prefect.toml and
    pyproject.toml in the working directory and its profiles file; Dask's YAML in its config directories."""
    home = os.path.expanduser(environ.get("PREFECT_HOME", "~/.prefect"))
    files = [os.path.join(cwd, name) for name in (".env", "prefect.toml", "pyproject.toml")]
    files.append(os.path.expanduser(environ.get("PREFECT_PROFILES_PATH", os.path.join(home, "profiles.toml"))
                                    .replace("$PREFECT_HOME", home)))
    for directory in (environ.get("DASK_CONFIG", "~/.config/dask"), "/etc/dask", os.path.join(sys.prefix, "etc",
                                                                                                "dask")):
        directory = os.path.expanduser(directory)
        with contextlib.suppress(OSError):
            files += sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith((".yaml", ".yml")))
    return files


@dataclass(frozen=True)
class WarmPaths:
    key: str
    dir: Path

    @classmethod
    def for_key(cls, key: str) -> WarmPaths:
        paths = cls(key, runtime_dir())
        if len(os.fsencode(paths.partial_socket(2**22))) > 107:
            raise OSError(f"{paths.dir} is too long a path for a Unix socket; set TMPDIR to a shorter one")
        return paths

    def partial_socket(self, pid: int) -> Path:
        """Where the warm process `pid` binds its socket before it publishes it as `socket`."""
        return self.dir / f"{self.key}.{pid}.sock"

    @property
    def socket(self) -> Path:
        return self.dir / f"{self.key}.sock"

    @property
    def lock(self) -> Path:
        return self.dir / f"{self.key}.lock"

    @property
    def state(self) -> Path:
        return self.dir / f"{self.key}.json"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.key}.log"

    @property
    def failed(self) -> Path:
        """Written when the warm process for this key could not import what it preloads: none is started
        again for it (a change of code or environment is a new key)."""
        return self.dir / f"{self.key}.failed"


# --------------------------------------------------------------------------- the command's side


def forward(argv: list[str], paths: WarmPaths) -> int | None:
    """Run `facecap argv` in the warm process at `paths`; its exit code, or None if none took it (no warm
    process answers, or it closed before starting a child): the caller then runs the command itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
    except OSError:
        sock.close()
        return None
    with sock:
        try:
            payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                                  "umask": _umask()}).encode()
            socket.send_fds(sock, [_HEADER.pack(len(payload))], [0, 1, 2])
            sock.sendall(payload)
        except OSError:
            return None
        replies = sock.makefile("rb")
        started = _reply(replies)
        if started is None or "pid" not in started:
            return None

        def pass_on(signum, _frame) -> None:
            with contextlib.suppress(OSError):
                sock.sendall(json.dumps({"signal": signum}).encode() + b"\n")

        for signum in _SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # one the command was started ignoring, it ignores
                signal.signal(signum, pass_on)
        ended = _reply(replies)
    if ended is None or "status" not in ended:
        print(f"facecap: the warm process (pid {started.get('server')}) ended before the command did, and the "
              "command with it; rerun it (a curate run resumes where it stopped)", file=sys.stderr)
        return 1
    status = ended["status"]
    return 128 - status if status < 0 else status  # a signal's death, as a shell reports it


def _reply(replies) -> dict | None:
    try:
        line = replies.readline()
    except OSError:
        return None
    return json.loads(line) if line else None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def leave_behind(paths: WarmPaths, idle_minutes: float, environ: dict[str, str]) -> bool:
    """Start the warm process for `paths.key` (the key of `environ`, the environment it gets) in a session of
    its own, unless one holds its lock (running, or still importing). Returns whether one was started."""
    if paths.failed.exists() or _lock_held(paths.lock):
        return False
    import subprocess

    with open(paths.log, "ab") as log:
        # In the command's working directory, where Prefect looks for settings files; -P: nothing in it
        # shadows an installed module.
        subprocess.Popen([sys.executable, "-P", "-m", "facecap.warm_process", paths.key, str(idle_minutes * 60)],
                         env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                         start_new_session=True, close_fds=True)
    return True


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding the exclusive flock on `path`, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_held(path: Path) -> bool:
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def running() -> list[dict]:
    """This user's warm processes that are alive: their recorded state, least recently used first."""
    found = []
    for state_path in runtime_dir().glob("*.json"):
        try:
            state = json.loads(state_path.read_text())
            if not _is_warm_process(state["pid"], state["key"]):
                continue
            state["last_used"] = state_path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(state)
    return sorted(found, key=lambda s: s["last_used"])


def _is_warm_process(pid: int, key: str) -> bool:
    """Whether `pid` is alive and, where /proc tells, still the warm process for `key` (a state file left by
    one that was killed may name a pid reused since)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read().split(b"\0")
    except OSError:
        return not os.path.isdir("/proc")
    return b"facecap.warm_process" in command and key.encode() in command


def stop(state: dict, timeout: float = 30.0) -> bool:
    """Ask one warm process to stop (SIGTERM: it finishes the commands it runs); whether it has exited."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_warm_process(state["pid"], state["key"]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------------- the warm process


class _Server:
    def __init__(self, paths: WarmPaths, idle_seconds: float) -> None:
        self.paths = paths
        self.idle_seconds = idle_seconds
        self.listener: socket.socket | None = None
        self.stopping = False
        self.last_active = time.monotonic()
        self.pid = os.getpid()

    def serve(self) -> int:
        self.lock_fd = _try_lock(self.paths.lock)
        if self.lock_fd is None:
            return 0  # another one has this key
        others = running()
        for older in others[: max(0, len(others) - (MAX_WARM - 1))]:
            print(f"stopping the warm process {older['pid']} (least recently used; at most {MAX_WARM})",
                  file=sys.stderr)
            stop(older, timeout=0)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        started = time.monotonic()
        try:
            self._preload()
        except BaseException:
            import traceback

            self.paths.failed.write_text(traceback.format_exc())
            raise
        self._listen()
        print(f"{time.strftime('%F %T')} warm process {os.getpid()} ready in {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
        try:
            self._loop()
        finally:
            self._unpublish()
        return 0

    def _preload(self) -> None:
        import gc
        import importlib

        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                print(f"not preloaded: {name} ({exc})", file=sys.stderr)
        from facecap.cli import build_parser
        from facecap.flows import warm_workers

        build_parser()  # imports every command's module
        from facecap.quality import process

        warm_workers.start()  # the local Dask workers' fork server, for every child
        warm_workers.wait_until_ready()  # it imports on its own: ready before a command counts on it
        process.validate_in_this_process()  # the suites' libraries are imported here already
        gc.freeze()  # what is imported stays untouched by the children's collections, so its pages stay shared
        sys.stdout.flush()
        sys.stderr.flush()

    def _listen(self) -> None:
        partial = self.paths.partial_socket(os.getpid())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(partial))
        os.chmod(partial, 0o600)
        self.listener.listen(16)
        os.replace(partial, self.paths.socket)  # published only now that everything is imported
        state = {"pid": os.getpid(), "key": self.paths.key, "started": time.time(),
                 "idle_minutes": self.idle_seconds / 60, "log": str(self.paths.log), "executable": sys.executable}
        self.paths.state.write_text(json.dumps(state))

    def _unpublish(self) -> None:
        if self.listener is None:
            return
        self.listener.close()
        self.listener = None
        for path in (self.paths.socket, self.paths.state):
            path.unlink(missing_ok=True)

    def _loop(self) -> None:
        connections = {}  # connection -> child pid
        # A child's exit (SIGCHLD) wakes the select below through this pipe: its status reaches the command at
        # once, not at the next poll.
        self.wakeup = os.pipe()
        os.set_blocking(self.wakeup[1], False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wakeup[1], warn_on_full_buffer=False)
        while True:
            if self.stopping and self.listener is not None:
                self._unpublish()
            watched = [self.wakeup[0], *connections, *([self.listener] if self.listener is not None else [])]
            readable, _, _ = select.select(watched, [], [], 1.0)
            for ready in readable:
                if ready == self.wakeup[0]:
                    os.read(self.wakeup[0], 512)
                elif ready is self.listener:
                    taken = self._accept()
                    if taken is not None:
                        conn, request, fds = taken
                        connections[conn] = self._fork(conn, request, fds, connections)
                else:
                    self._from_command(ready, connections[ready])
            for conn, status in self._reap(connections):
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                conn.close()
                del connections[conn]
            if connections:
                self.last_active = time.monotonic()
            elif self.stopping or time.monotonic() - self.last_active > self.idle_seconds:
                return

    def _accept(self) -> tuple[socket.socket, dict, list[int]] | None:
        """The next command's connection, request and standard streams; None for one not taken."""
        try:
            conn, _ = self.listener.accept()
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        except OSError as exc:  # out of descriptors, say: that command runs by itself, this process goes on
            print(f"{time.strftime('%F %T')} could not take a command: {exc}", file=sys.stderr, flush=True)
            return None
        if uid != os.getuid():
            conn.close()
            return None
        conn.settimeout(10)  # a command sends its request at once; a silent peer is not waited for
        fds: list[int] = []
        try:
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            if len(fds) != 3:
                raise ConnectionError(f"expected 3 standard streams, got {len(fds)}")
            (length,) = _HEADER.unpack(header)
            payload = b""
            while len(payload) < length:
                chunk = conn.recv(length - len(payload))
                if not chunk:
                    raise ConnectionError("the command closed its request")
                payload += chunk
            request = json.loads(payload)
        except (OSError, ValueError, struct.error) as exc:
            print(f"{time.strftime('%F %T')} dropped a request: {exc}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        conn.settimeout(None)
        with contextlib.suppress(OSError):
            os.utime(self.paths.state)  # last used: the least recently used goes first when there are too many
        return conn, request, fds

    def _fork(self, conn: socket.socket, request: dict, fds: list[int], connections: dict) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child(conn, request, fds, connections)
            except SystemExit as exc:  # argparse's errors, as a fresh process would exit with them
                code = exc.code if isinstance(exc.code, int) else 1
            except KeyboardInterrupt:  # ends as an interrupted fresh command does (main() said what it means)
                from facecap.cli import end_interrupted

                end_interrupted()
            except BaseException:  # noqa: BLE001 - whatever it is, the command gets its traceback
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # a command gone already: the loop sees its connection close
            conn.sendall(json.dumps({"pid": pid, "server": os.getpid()}).encode() + b"\n")
        return pid

    def _child(self, conn: socket.socket, request: dict, fds: list[int], connections: dict) -> int:
        os.setsid()  # a process group of its own, which the warm process signals or kills as one
        _die_with_parent(self.pid)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in self.wakeup:
            os.close(fd)
        for other in [conn, *connections, *([self.listener] if self.listener is not None else [])]:
            other.close()
        os.close(self.lock_fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        # The rest is the command's already (the key covers it), with what the imports here added, as the
        # command's own imports would have.
        for name in _PER_COMMAND_ENV:
            if name in request["env"]:
                os.environ[name] = request["env"][name]
            else:
                os.environ.pop(name, None)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for stream in (sys.stdout, sys.stderr):  # as a fresh process would buffer for these streams
            stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))
        sys.argv = ["facecap", *request["argv"]]
        from facecap.cli import finish, main
        from facecap.flows import warm_workers

        warm_workers.inherit()
        try:
            code = main(request["argv"], warm_workers=True, warm=True)
        finally:
            warm_workers.stop()
        return finish(code)

    def _from_command(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the command is gone (killed, even by SIGKILL): so is its run
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            return
        for line in data.splitlines():
            with contextlib.suppress(ValueError, KeyError, ProcessLookupError, TypeError):
                os.killpg(pid, int(json.loads(line)["signal"]))

    @staticmethod
    def _reap(connections: dict) -> list[tuple[socket.socket, int]]:
        ended = []
        by_pid = {pid: conn for conn, pid in connections.items()}
        for pid, conn in by_pid.items():
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8
            if done:
                ended.append((conn, os.waitstatus_to_exitcode(status)))
        return ended


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process if the warm process dies first, so no run outlives its proxy."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


if __name__ == "__main__":
    code = _Server(WarmPaths.for_key(sys.argv[1]), float(sys.argv[2])).serve()
    sys.stderr.flush()
    os._exit(code)  # without tearing down what it imported: seconds, and warnings nobody reads
