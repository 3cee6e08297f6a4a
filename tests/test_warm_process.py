"""`facecap curate` in a fork of the warm process: the same release as a fresh process's, and the same end
when the command is killed or interrupted (facecap/warm_process.py).

The rest of the suite runs with FACECAP_WARM_MINUTES=0 (conftest.py); here it is on, with TMPDIR set to a
directory of the test's own so its warm process is found, and stopped, only by these commands.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import read_release

from facecap import warm_process
from facecap.example_data import astronaut, generated

ARGS = ("--profile", "offline", "--shard-size", "1", "--workers", "2", "--set", "dedup.keep=all")
FORK = re.compile(r"in a fork of the warm process (\d+)")


@pytest.fixture
def warm_env():
    tmp = tempfile.mkdtemp(prefix="fcw")  # short: a Unix socket's path has at most 107 bytes
    env = {**os.environ, "FACECAP_WARM_MINUTES": "2", "TMPDIR": tmp}
    yield env
    subprocess.run([sys.executable, "-m", "facecap", "warm", "stop"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def twelve_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    face = astronaut()
    for i in range(12):
        img = generated("noise", seed=i) if i % 4 == 3 else face.rotate(i * 3 - 15, expand=True).resize(
            (360 + 20 * i, 360 + 20 * i))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / f"img{i:02d}.jpg").write_bytes(buf.getvalue())
    return root


def curate(images: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facecap", "curate", str(images), "--out", str(out), *ARGS],
                          env=env, capture_output=True, text=True, timeout=600)


def start(images: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "facecap", "curate", str(images), "--out", str(out), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def runs_of(server: int) -> list[int]:
    """The warm process's children that run a command: each leads a session of its own (its other child, the
    Dask workers' fork server, does not)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(ppid) == server and int(session) == int(stat.parent.name) and state != "Z":
            found.append(int(session))
    return found


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def lines_until(proc: subprocess.Popen, pattern: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if pattern in line:
            return
    raise AssertionError(f"the run ended before printing {pattern!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the warm process needs fork")
def test_a_warm_run_matches_a_fresh_one_and_ends_with_its_command(prefect_api_url, twelve_images, tmp_path,
                                                                   warm_env):
    env = {**warm_env, "PREFECT_API_URL": prefect_api_url}
    cold = curate(twelve_images, tmp_path / "cold", env)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert not FORK.search(cold.stdout), "the first command has no warm process to run in"
    status = lambda: subprocess.run([sys.executable, "-m", "facecap", "warm", "status"], env=env,  # noqa: E731
                                    capture_output=True, text=True)
    wait_until(lambda: status().returncode == 0, 120, "the first command left no warm process behind")

    warm = curate(twelve_images, tmp_path / "warm", env)
    assert warm.returncode == 0, warm.stderr[-3000:]
    server = int(FORK.search(warm.stdout).group(1))
    a, a_rejects = read_release(tmp_path / "cold")
    b, b_rejects = read_release(tmp_path / "warm")
    assert a.num_rows == b.num_rows > 5 and a.equals(b), "a warm run's release must equal a fresh process's"
    assert a_rejects.sort_by("image_id").equals(b_rejects.sort_by("image_id"))
    assert "Funnel" in warm.stdout and "Quality:" in warm.stdout, "its output reaches the command's stdout"

    # SIGKILL of the command's whole process group: the run in the warm process dies with it, and a rerun
    # resumes to the same release.
    out = tmp_path / "killed"
    proc, seen = start(twelve_images, out, env), []
    lines_until(proc, "detect: ", seen)
    assert runs_of(server), "the run is a child of the warm process"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not runs_of(server), 10, "the run outlived its killed command")
    assert not (out / "release").exists()
    resumed = curate(twelve_images, out, env)
    assert resumed.returncode == 0 and FORK.search(resumed.stdout), resumed.stderr[-3000:]
    c, _ = read_release(out)
    assert c.equals(a), "the resumed release must equal a clean run's"

    # Ctrl-C reaches the run as it would a fresh process: it stops, and the command exits as interrupted.
    proc, seen = start(twelve_images, tmp_path / "interrupted", env), []
    lines_until(proc, "detect: ", seen)
    proc.send_signal(signal.SIGINT)  # to the command alone, as the terminal's would reach its process group
    rest, _ = proc.communicate(timeout=120)
    # The command passes the signal on to the run's process group (its workers too), and ends with the status
    # an interrupted command has, after the one line a fresh process prints (tests/test_cli_resume.py).
    assert proc.returncode == 128 + signal.SIGINT, "".join(seen) + rest
    assert "facecap: interrupted; the shards finished so far are kept in" in rest, "".join(seen) + rest
    assert "KeyboardInterrupt" not in rest, "".join(seen) + rest
    wait_until(lambda: not runs_of(server), 10, "the interrupted run is still running")

    stopped = subprocess.run([sys.executable, "-m", "facecap", "warm", "stop"], env=env, capture_output=True,
                             text=True)
    assert f"stopped the warm process {server}" in stopped.stdout
    assert status().returncode == 1 and not list(Path(env["TMPDIR"]).glob("facecap-*/*.sock"))


def test_the_key_covers_the_environment():
    base = {"PATH": "/usr/bin", "PWD": "/a"}
    assert warm_process.environment_key(base) == warm_process.environment_key({**base, "PWD": "/b"})
    assert warm_process.environment_key(base) != warm_process.environment_key({**base, "OMP_NUM_THREADS": "1"})


def test_no_warm_process_in_a_directory_others_can_use(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"facecap-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="0700"):
        warm_process.runtime_dir()
    shared.chmod(0o700)
    paths = warm_process.WarmPaths.for_key("0" * 16)
    assert warm_process.forward(["curate"], paths) is None, "no warm process: the command runs by itself"


def test_which_commands_go_to_a_warm_process(tmp_path, monkeypatch):
    from facecap.cli import _warm_paths

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    env = {"PATH": "/usr/bin"}
    paths = _warm_paths(["curate", "in", "--out", "out"], env)
    assert paths is not None and paths.dir == tmp_path / f"facecap-{os.getuid()}"
    assert _warm_paths(["curate", "--help"], env) is None
    assert _warm_paths(["validate", "release"], env) is None
    assert _warm_paths(["curate", "in", "--out", "out", "--set", "execution.warm_minutes=0"], env) is None
    assert _warm_paths(["curate", "in", "--out", "out"], {**env, "FACECAP_WARM_MINUTES": "0"}) is None
    # A key whose warm process could not import what it preloads gets no second one.
    paths.failed.write_text("ImportError: ...")
    assert warm_process.leave_behind(paths, 1, env) is False
