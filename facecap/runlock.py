"""One curate run per output directory: an OS lock on OUT/.lock that names its holder.

The lock is an flock on the open file, so a holder that dies, however it dies
(SIGKILL, OOM, a lost container), releases it with its last file descriptor.
The file also records who holds it (host, pid, run id, since when) as one JSON
object, for the refusal message and for `cat OUT/.lock`; a clean release
empties it. Holder text found under a free flock was left by a run that died:
it is stale and is replaced, and the replacement is logged.

An flock held on another host is seen here only if the file system carries
flock between hosts (local disks, NFSv4 and NFSv3 with lockd do; some SMB and
FUSE mounts such as sshfs or s3fs do not). So every holder also rewrites a
heartbeat into the file, and a free flock under a fresh heartbeat from another
machine (another kernel: the boot id tells; containers on one machine share
it) still refuses; that lock is taken over once its heartbeat is `LEASE_S`
old. This rests on the hosts' clocks agreeing to well within the lease, and
two hosts that find such a lock stale at the same moment can both take it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

LOCK_FILE = ".lock"
HEARTBEAT_S = 15.0
LEASE_S = 90.0  # six missed heartbeats: a live holder on a loaded machine is not taken for dead
POLL_S = 1.0

_log = logging.getLogger(__name__)
# flock conflicts between two descriptors of one process, but NFS emulates it with per-process
# POSIX locks, which do not: the locks this process holds are also kept here.
_held: dict[str, RunLock] = {}
_held_guard = threading.Lock()


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(stamp: str) -> float | None:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def _boot_id() -> str:
    """This kernel's identity: containers on one machine share it (and their flocks), hosts do not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    run_id: str
    since: str  # UTC, ISO 8601
    heartbeat: str  # UTC, ISO 8601; rewritten every HEARTBEAT_S while held
    boot_id: str = ""

    @classmethod
    def current(cls, run_id: str) -> Holder:
        now = _utc(time.time())
        return cls(socket.gethostname(), os.getpid(), run_id, now, now, _boot_id())

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text)
        return cls(str(data["host"]), int(data["pid"]), str(data["run_id"]), str(data["since"]),
                   str(data.get("heartbeat", data["since"])), str(data.get("boot_id", "")))

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def beat(self) -> Holder:
        return Holder(self.host, self.pid, self.run_id, self.since, _utc(time.time()), self.boot_id)

    def on_this_machine(self) -> bool:
        """Whether its flock would be visible to us whatever the file system: the same kernel holds both."""
        mine = _boot_id()
        if self.boot_id and mine:
            return self.boot_id == mine
        return self.host == socket.gethostname()

    def heartbeat_age(self) -> float:
        beat = _seconds(self.heartbeat)
        return float("inf") if beat is None else max(0.0, time.time() - beat)

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.since})"


class OutputLocked(RuntimeError):
    """Another run holds OUT's lock; the message names it and says what to do."""

    def __init__(self, out: str, holder: Holder | None, remote_age: float | None = None, waited: float = 0.0):
        self.out, self.holder, self.remote_age = out, holder, remote_age
        message = f"{out} is in use by " + (holder.describe() if holder else "another run (not yet named in .lock)")
        if remote_age is not None:
            message += f" on a host whose flock is not visible here; it was alive {remote_age:.0f}s ago"
        if waited:
            message += f"; waited {waited:.0f}s for it"
        message += ". Wait for that run to finish, or stop it, then rerun: "
        message += (f"its lock is taken over once it has been silent for {LEASE_S:.0f}s" if remote_age is not None
                    else "the lock of a killed run is taken over by the next run")
        message += " (never delete .lock while a run holds it). To wait for it " + ("longer" if waited else
                                                                                  "instead of refusing")
        message += ": --set execution.lock_wait_s=SECONDS"
        super().__init__(message)


class RunLock:
    """A held lock on OUT; `release` (or leaving the `with` block) frees it and empties the file."""

    def __init__(self, out: str, path: str, fd: int, holder: Holder, replaced: Holder | None):
        self.out, self.path, self.fd, self.holder, self.replaced = out, path, fd, holder, replaced
        self._stop = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="facecap-runlock-heartbeat", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.holder = self.holder.beat()
                _write(self.fd, self.holder)
            except OSError as exc:  # a full or flaky disk must not kill the run; the lease may then lapse
                _log.warning(f"could not renew the lock heartbeat in {self.path}: {exc}")

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        self._beating.join()
        try:
            # Emptied before the flock goes: text under a free flock then only ever means a dead holder.
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            _log.warning(f"could not clear {self.path}; the next run will report it as stale: {exc}")
        finally:
            with _held_guard:
                _held.pop(os.path.realpath(self.path), None)
            os.close(self.fd)  # releases the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _write(fd: int, holder: Holder) -> None:
    data = holder.to_json().encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def read_holder(path: str) -> Holder | None:
    """Who `path` says holds it; None when it is empty or unreadable."""
    for _ in range(3):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        try:
            return Holder.from_json(text)
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)  # caught mid-rewrite: heartbeats keep the length, but not every file system is atomic
    return None


def _try_acquire(out: str, path: str, run_id: str, logger) -> RunLock:
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            raise OutputLocked(out, _held[key].holder)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flock = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLocked(out, read_holder(path)) from None
            except OSError as exc:
                flock = False
                logger.warning(f"{out}: the file system refuses flock ({exc}); only the holder's heartbeat in "
                               f"{path} keeps a second run out")
            previous = read_holder(path)
            if previous is not None and (not flock or not previous.on_this_machine()):
                age = previous.heartbeat_age()
                if age < LEASE_S:
                    raise OutputLocked(out, previous, remote_age=age)
            holder = Holder.current(run_id)
            _write(fd, holder)
        except BaseException:
            os.close(fd)
            raise
        lock = _held[key] = RunLock(out, path, fd, holder, previous)
    if previous is not None:
        logger.warning(f"replaced a stale lock on {out}: {previous.describe()} ended without releasing it "
                       "(killed or lost)")
    return lock


def acquire(out: str, run_id: str, wait_s: float = 0.0, logger=None) -> RunLock:
    """Take OUT's run lock for `run_id`, or raise OutputLocked naming its holder.

    With `wait_s` > 0, a held lock is polled for that long before refusing.
    """
    logger = logger or _log
    out = out.removeprefix("file://")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    started = time.monotonic()
    told = False
    while True:
        try:
            return _try_acquire(out, path, run_id, logger)
        except OutputLocked as exc:
            waited = time.monotonic() - started
            if waited >= wait_s:
                if not wait_s:
                    raise
                raise OutputLocked(out, exc.holder, exc.remote_age, waited) from None
            if not told:
                logger.info(f"{out} is in use by {exc.holder.describe() if exc.holder else 'another run'}: "
                            f"waiting up to {wait_s:.0f}s for it (execution.lock_wait_s)")
                told = True
            time.sleep(min(POLL_S, wait_s - waited))
