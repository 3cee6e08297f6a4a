"""The command line as people run it: help, errors, a killed run that resumes, the embedded Prefect API."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from helpers import read_release
from PIL import Image

from facecap.example_data import astronaut, generated


def facecap(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facecap", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`facecap ARGS` in this process: exit code, stdout, stderr. A subprocess would pay the imports each time."""
    from facecap.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_option(capsys):
    code, top, _ = cli(capsys, "--help")
    assert code == 0 and "curate" in top and "offline" in top
    _, curate, _ = cli(capsys, "curate", "--help")
    for option in ("--out", "--profile", "--config", "--set", "--dask-address", "--workers", "--shard-size",
                   "--min-score", "--min-face-px", "WebDataset", "Parquet", "PREFECT_API_URL", "resumes"):
        assert option in curate, option


def test_config_command_prints_resolved_settings(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("detect:\n  min_score: 0.95\n")
    code, out, _ = cli(capsys, "config", "--profile", "offline", "--config", str(cfg), "--set", "ingest.shard_size=7")
    assert code == 0
    assert "profile: offline" in out and "min_score: 0.95" in out and "shard_size: 7" in out


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    code, _, err = cli(capsys, "config", "--set", "detect.min_score=2")
    assert code == 2 and "detect.min_score" in err
    code, _, err = cli(capsys, "config", "--set", "detect.min_scor=0.5")
    assert code == 2 and "min_scor" in err
    code, _, err = cli(capsys, "config", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err


def test_object_storage_output_is_refused_before_any_work(tmp_path, capsys):
    code, _, err = cli(capsys, "curate", str(tmp_path), "--out", "s3://bucket/out", "--profile", "offline")
    assert code == 2 and "local or mounted directory" in err and "Traceback" not in err


@pytest.mark.e2e
def test_full_profile_without_weights_says_what_to_place_where(tmp_path):
    (tmp_path / "img").mkdir()
    # max_download_bytes=1: on a connected host the download is refused at its Content-Length, never fetched
    run = facecap("curate", str(tmp_path / "img"), "--out", str(tmp_path / "out"),
                  "--set", "models.max_download_bytes=1", env={"FACECAP_MODEL_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2
    assert str(tmp_path / "cache" / "retinaface_resnet50.pth") in run.stderr and "--profile offline" in run.stderr
    assert "facecap models fetch --profile full" in run.stderr and "detection_Resnet50_Final.pth" in run.stderr
    assert "Traceback" not in run.stderr


MANY_IMAGES = 24


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """24 images (18 with the astronaut's face at varied angles and sizes): in 12 shards of 2, enough to kill a run
    mid-way."""
    root = tmp_path_factory.mktemp("many")
    face = astronaut()
    for i in range(MANY_IMAGES):
        img = generated("noise" if i % 2 else "shapes", seed=i) if i % 4 == 3 else \
            face.rotate((i * 9) % 40 - 20, expand=True).resize((400 + 10 * i, 400 + 10 * i))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / f"img{i:03d}.jpg").write_bytes(buf.getvalue())
        (root / f"img{i:03d}.txt").write_text(f"image number {i}")
    return root


# The images repeat one photo: keep every near-duplicate so the compared releases hold many faces.
CURATE_ARGS = ("--profile", "offline", "--shard-size", "2", "--workers", "2", "--set", "dedup.keep=all")


@pytest.mark.e2e
def test_ctrl_c_ends_the_run_as_interrupted_in_one_line_and_the_rerun_resumes(prefect_api_url, many_images,
                                                                              tmp_path):
    """SIGINT to the command's whole process group, as a terminal's Ctrl-C sends it: the Dask workers too."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "facecap", "curate", str(many_images), "--out", str(out), *CURATE_ARGS]
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    # As at a terminal, SIGINT does its default in the command, even when these tests run as a background job
    # (which ignores SIGINT, and so would the command it starts: such a command keeps ignoring it, by design).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "detect: " in line:  # a progress line: detect shards have finished, others are running
            break
    assert proc.poll() is None, "the run finished before it could be interrupted:\n" + "".join(seen)[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    # Killed by SIGINT (a shell's 130), as an interrupted process ends; one line says what it means. No
    # traceback of the interrupt: not the command's, not its workers', not one a library wrapped it in
    # (pydantic turns it into PydanticSerializationError when it lands in Prefect's task submission).
    assert proc.returncode == -signal.SIGINT, output[-3000:]
    assert f"facecap: interrupted; the shards finished so far are kept in {out / 'shards'}" in rest, output[-3000:]
    assert "KeyboardInterrupt" not in output and "PydanticSerializationError" not in output, output[-3000:]
    assert not (out / "release").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    con = duckdb.connect(str(out / "manifest.duckdb"), read_only=True)
    cached = con.execute("SELECT count(*) FROM stage_runs WHERE stage = 'detect' AND status = 'cached'").fetchone()[0]
    con.close()
    assert cached >= 1, "detect shards finished before the interrupt must not be redone"
    data, rejects = read_release(out)
    accounted = set(data.column("image_id").to_pylist()) | set(rejects.column("image_id").to_pylist())
    assert len(accounted) == MANY_IMAGES


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_release(prefect_api_url, many_images, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "facecap", "curate", str(many_images), "--out", str(out), *CURATE_ARGS]
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    detect_dir = out / "shards" / "detect"

    def finished() -> int:  # stats files written: not the `.tmp-…` file one is being written to
        return sum(1 for p in detect_dir.glob("*.json") if not p.name.startswith("."))

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and finished() < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Dask workers, everything in the session
    proc.wait()
    done_when_killed = finished()
    assert 3 <= done_when_killed and not (out / "release").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    con = duckdb.connect(str(out / "manifest.duckdb"), read_only=True)
    statuses = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()]
    cached = con.execute("SELECT count(*) FROM stage_runs WHERE stage = 'detect' AND status = 'cached'").fetchone()[0]
    con.close()
    assert statuses == ["interrupted", "completed"]
    assert cached >= done_when_killed, "work finished before the kill must not be redone"

    # A clean run, with the embedded default (no PREFECT_API_URL): one server for the flow and all workers.
    clean = tmp_path / "clean"
    env_clean = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    embedded = subprocess.run([*cmd[:6], str(clean), *CURATE_ARGS], env=env_clean, capture_output=True, text=True,
                              timeout=600)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    log = embedded.stdout + embedded.stderr
    assert log.count("starting a Prefect server for this run") == 1 and "database is locked" not in log
    assert "Error logging to API" not in log
    # The Dask workers use the run's server too: none starts a temporary one of its own.
    assert "temporary server" not in log.lower()

    a, a_rejects = read_release(out)
    b, b_rejects = read_release(clean)
    assert a.num_rows == b.num_rows >= 10
    assert len(set(a.column("sample_id").to_pylist())) == a.num_rows, "no duplicate sample_id after resume"
    assert a.equals(b), "the resumed release must equal a clean run's"
    key = [("image_id", "ascending"), ("reason", "ascending")]
    assert a_rejects.sort_by(key).equals(b_rejects.sort_by(key))
    # Every image is accounted for: kept (one or more faces) or rejected.
    accounted = set(a.column("image_id").to_pylist()) | set(a_rejects.column("image_id").to_pylist())
    assert len(accounted) == MANY_IMAGES
    assert Image.open(io.BytesIO(a.column("image")[0].as_py()["bytes"])).format == "JPEG"
