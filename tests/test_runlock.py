"""One curate run per output directory: OUT/.lock, held by real processes, refused, taken over when stale."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from facecap import runlock
from facecap.example_data import astronaut

# A second process that takes OUT's lock through the module the flow uses, says so, and keeps it.
HOLD = ("import sys, time; from facecap import runlock; runlock.acquire(sys.argv[1], sys.argv[2]); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder_process():
    """Start processes that hold a lock; whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(out: Path, run_id: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), run_id], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held", "the holder process did not take the lock"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def write_holder(out: Path, **fields) -> None:
    holder = {"host": "gpu-node-7", "pid": 4242, "run_id": "run-elsewhere", "since": "2026-01-01T00:00:00Z",
              "heartbeat": runlock._utc(time.time()), "boot_id": "another-kernel", **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps(holder))


def test_acquire_records_the_holder_and_release_empties_the_file(tmp_path, caplog):
    out = tmp_path / "out"
    with runlock.acquire(str(out), "run-1") as lock:
        recorded = runlock.read_holder(str(out / ".lock"))
        assert recorded == lock.holder
        assert (recorded.host, recorded.pid, recorded.run_id) == (socket.gethostname(), os.getpid(), "run-1")
        assert abs(runlock._seconds(recorded.since) - time.time()) < 5 and recorded.on_this_machine()
        assert lock.replaced is None
    assert (out / ".lock").read_text() == ""
    with caplog.at_level(logging.INFO, logger="facecap.runlock"), runlock.acquire(str(out), "run-2") as again:
        assert again.replaced is None and runlock.read_holder(str(out / ".lock")).run_id == "run-2"
    assert "stale" not in caplog.text, "a cleanly released lock is not stale"


def test_holder_round_trips_through_its_json():
    holder = runlock.Holder.current("abc")
    assert runlock.Holder.from_json(holder.to_json()) == holder
    assert holder.beat().since == holder.since


def test_a_held_lock_refuses_a_second_taker_in_the_same_process(tmp_path):
    with runlock.acquire(str(tmp_path), "first"):
        with pytest.raises(runlock.OutputLocked, match="run first") as refused:
            runlock.acquire(str(tmp_path), "second")
    assert refused.value.holder.pid == os.getpid()
    runlock.acquire(str(tmp_path), "second").release()


def test_a_lock_held_by_another_process_is_refused_naming_it(tmp_path, holder_process):
    proc = holder_process(tmp_path, "run-in-other-process")
    with pytest.raises(runlock.OutputLocked) as refused:
        runlock.acquire(str(tmp_path), "mine")
    message = str(refused.value)
    assert "run-in-other-process" in message and f"pid {proc.pid}" in message and socket.gethostname() in message
    assert "since 20" in message and "execution.lock_wait_s" in message

    # The file names a holder on another host, but the flock is held: refused, whatever the file says.
    write_holder(tmp_path, heartbeat="2000-01-01T00:00:00Z")
    with pytest.raises(runlock.OutputLocked, match="gpu-node-7"):
        runlock.acquire(str(tmp_path), "mine")


def test_a_sigkilled_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path, holder_process, caplog):
    proc = holder_process(tmp_path, "run-killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runlock.read_holder(str(tmp_path / ".lock")).pid == proc.pid, "a killed holder cannot clear the file"
    with caplog.at_level(logging.WARNING, logger="facecap.runlock"), runlock.acquire(str(tmp_path), "next") as lock:
        assert lock.replaced.run_id == "run-killed" and lock.replaced.pid == proc.pid
        assert runlock.read_holder(str(tmp_path / ".lock")).run_id == "next"
    assert "replaced a stale lock" in caplog.text and "run-killed" in caplog.text and f"pid {proc.pid}" in caplog.text


def test_another_hosts_lock_refuses_while_its_heartbeat_is_fresh_and_is_stale_after_the_lease(tmp_path, caplog):
    # Our flock is free, but on a file system that does not share flock between hosts that proves nothing.
    write_holder(tmp_path)
    with pytest.raises(runlock.OutputLocked, match="gpu-node-7.*not visible here") as refused:
        runlock.acquire(str(tmp_path), "mine")
    assert "pid 4242" in str(refused.value) and "run-elsewhere" in str(refused.value)

    write_holder(tmp_path, heartbeat=runlock._utc(time.time() - runlock.LEASE_S - 5))
    with caplog.at_level(logging.WARNING, logger="facecap.runlock"), runlock.acquire(str(tmp_path), "mine") as lock:
        assert lock.replaced.host == "gpu-node-7"
    assert "replaced a stale lock" in caplog.text and "gpu-node-7" in caplog.text


def test_a_holder_on_this_machine_under_another_hostname_is_stale_at_once(tmp_path):
    # A container shares the host's kernel and so its flocks: a free flock proves it is gone.
    write_holder(tmp_path, host="container-1f3a", boot_id=runlock._boot_id())
    with runlock.acquire(str(tmp_path), "mine") as lock:
        assert lock.replaced.host == "container-1f3a"


def test_the_heartbeat_keeps_the_holder_alive_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    with runlock.acquire(str(tmp_path), "beating") as lock:
        first = lock.holder.heartbeat
        deadline = time.time() + 10
        while runlock.read_holder(str(tmp_path / ".lock")).heartbeat == first and time.time() < deadline:
            time.sleep(0.2)
        recorded = runlock.read_holder(str(tmp_path / ".lock"))
        assert recorded.heartbeat > first and recorded.since == lock.holder.since


def test_lock_wait_s_waits_for_the_holder_to_finish(tmp_path):
    held = runlock.acquire(str(tmp_path), "first")
    threading.Timer(1.5, held.release).start()
    started = time.monotonic()
    with runlock.acquire(str(tmp_path), "second", wait_s=60) as lock:
        assert 1.0 < time.monotonic() - started < 30 and lock.replaced is None
    held = runlock.acquire(str(tmp_path), "third")
    with pytest.raises(runlock.OutputLocked, match="waited 1s"):
        runlock.acquire(str(tmp_path), "fourth", wait_s=1)
    held.release()


# --- the curate command on a locked OUT -------------------------------------------------------

CURATE_ARGS = ("--profile", "offline", "--workers", "1")


@pytest.fixture(scope="module")
def one_face(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one-face")
    astronaut().save(root / "astronaut.jpg", quality=90)
    (root / "astronaut.txt").write_text("an astronaut in a flight suit")
    return root


def curate(source: Path, out: Path, prefect_api_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facecap", "curate", str(source), "--out", str(out), *CURATE_ARGS],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFECT_API_URL": prefect_api_url})


@pytest.mark.e2e
def test_curate_on_a_locked_out_is_refused_before_any_work(prefect_api_url, one_face, tmp_path, holder_process):
    out = tmp_path / "out"
    proc = holder_process(out, "run-holding-out")
    run = curate(one_face, out, prefect_api_url)
    assert run.returncode == 1, run.stderr[-3000:]
    refusal = [line for line in run.stderr.splitlines() if line.startswith("facecap: ")]
    assert len(refusal) == 1, run.stderr[-3000:]
    assert "run-holding-out" in refusal[0] and f"pid {proc.pid}" in refusal[0] and socket.gethostname() in refusal[0]
    assert os.listdir(out) == [".lock"], "a refused run must write nothing: no shards, manifest or release"
    assert runlock.read_holder(str(out / ".lock")).run_id == "run-holding-out"


@pytest.mark.e2e
def test_curate_takes_over_the_lock_of_a_killed_run_and_completes(prefect_api_url, one_face, tmp_path, holder_process):
    out = tmp_path / "out"
    proc = holder_process(out, "run-that-was-killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = curate(one_face, out, prefect_api_url)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "replaced a stale lock" in log and "run-that-was-killed" in log and f"pid {proc.pid}" in log
    assert (out / "release" / "release.json").exists() and (out / ".lock").read_text() == ""
