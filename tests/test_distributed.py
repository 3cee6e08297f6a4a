"""Curate on a real Dask cluster of separate processes, started with the `dask` command line as on a cluster.

A `dask scheduler` and two `dask worker` processes on 127.0.0.1, one offering
`--resources GPU=1`. This machine has no CUDA, so `detect.device=cuda` cannot
run here; `execution.stage_resources={detect: {GPU: 1}}` asks Dask for the
same GPU=1 placement while onnxruntime runs on the CPU (the placement is what
is under test; the CUDA provider is tested in test_placement.py to fail clearly).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from distributed import Client
from helpers import example_sources, offline_config, read_release, run_curate

from facecap.example_data import astronaut, generated

DASK = str(Path(sys.executable).with_name("dask"))
BUSY_IMAGES = 40


class DaskProcesses:
    """A scheduler and named workers, each its own process group (so a test can kill one like a lost machine)."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.scheduler_file = root / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(self.scheduler_file)])
        deadline = time.time() + 60
        while not self.scheduler_file.exists():
            if time.time() > deadline or self.procs["scheduler"].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.2)
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, cwd=self.root)

    def add_worker(self, name: str, *extra: str) -> None:
        self.start(name, [DASK, "worker", self.address, "--name", name, "--nworkers", "1", "--nthreads", "1",
                          "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(self.root / name),
                          *extra])

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def run_on_workers(self, client: Client, function) -> dict[str, object]:
        """Worker name -> `function()` run inside that worker process."""
        names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
        return {names[addr]: value for addr, value in client.run(function).items()}

    def worker_pids(self, client: Client) -> dict[str, int]:
        """Worker name -> pid of its worker process (what shard stats record as `worker`)."""
        return self.run_on_workers(client, os.getpid)

    def kill(self, name: str) -> None:
        """SIGKILL the worker's nanny and worker process: no goodbye to the scheduler, like a lost machine."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _detector_cache_info() -> dict:
    """Runs inside a worker process: how often it loaded (misses) and reused (hits) the detector."""
    from facecap.models.registry import _cached_detector

    info = _cached_detector.cache_info()
    return {"misses": info.misses, "hits": info.hits}


# Workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def worker_env(prefect_api_url: str) -> dict:
    # Workers report task runs to the same Prefect API as the flow (never a server of their own).
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DASK_LOGGING__DISTRIBUTED": "warning"}


def sorted_rejects(table):
    """Reject rows in a stable order (an image can have several: one per face that was not kept)."""
    keys = ["image_id", "sample_id", "stage", "reason", "detail"]
    return table.sort_by([(k, "ascending") for k in keys]).combine_chunks()


def sources(example_dir: Path) -> list[Path]:
    return example_sources(example_dir)  # what the session's local curate read (`curated_example`)


@pytest.fixture(scope="module")
def cluster(prefect_api_url, tmp_path_factory):
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"), worker_env(prefect_api_url))
    try:
        procs.add_worker("cpu")
        procs.add_worker("gpu", "--resources", "GPU=1")
        with Client(procs.address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def local_release(curated_example):
    """The same sources and settings on the embedded default (a local cluster): the reference release."""
    out, _, _ = curated_example
    return read_release(out)


def test_gpu_stage_runs_only_on_the_gpu_worker_and_release_equals_a_local_run(cluster, local_release, example_dir,
                                                                              tmp_path):
    out = tmp_path / "out"
    cfg = offline_config(ingest={"shard_size": 4},
                         execution={"dask_address": cluster.address, "stage_resources": {"detect": {"GPU": 1}}})
    result = run_curate(sources(example_dir), out, cfg)

    with Client(cluster.address, timeout=30) as client:
        pids = cluster.worker_pids(client)
        loads = cluster.run_on_workers(client, _detector_cache_info)
    ran_on: dict[str, set[int]] = {}
    for stats_file in (out / "shards").glob("*/*.json"):
        stats = json.loads(stats_file.read_text())
        ran_on.setdefault(stats["stage"], set()).add(int(stats["worker"].rsplit(":", 1)[1]))
    detect_shards = len(list((out / "shards" / "detect").glob("*.json")))
    assert detect_shards > 2 and result.records > 0
    assert ran_on["detect"] == {pids["gpu"]}, (ran_on, pids)
    # The detector loaded once in the GPU worker process and was reused by every detect shard after that.
    assert loads["gpu"]["misses"] == 1, loads  # one load for all of its detect shards
    assert loads["cpu"]["misses"] == 0, loads
    # Ingest is not pinned: it runs on whichever worker is free, including the one without the resource.
    assert ran_on["ingest"] <= {pids["gpu"], pids["cpu"]} and pids["cpu"] in ran_on["ingest"], (ran_on, pids)

    data, rejects = read_release(out)
    local_data, local_rejects = local_release
    assert data.equals(local_data)
    a, b = sorted_rejects(rejects), sorted_rejects(local_rejects)
    assert a.num_rows == b.num_rows
    diff = [c for c in a.column_names if not a.column(c).equals(b.column(c))]
    assert not diff, (diff, [(a.column(c).to_pylist()[:30], b.column(c).to_pylist()[:30]) for c in diff[:1]])


@pytest.fixture(scope="module")
def busy_images(tmp_path_factory) -> Path:
    """40 distinct images (most with a face) in about 10 shards: enough detect work to kill a worker mid-run."""
    root = tmp_path_factory.mktemp("busy")
    face = astronaut()
    for i in range(BUSY_IMAGES):
        # A distinct angle each: identical crops would (rightly) fail the release's duplicate-image check.
        img = generated("shapes", seed=i) if i % 5 == 4 else face.rotate(i * 0.4 - 16).resize((480, 480))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        (root / f"img{i:03d}.jpg").write_bytes(buf.getvalue())
        (root / f"img{i:03d}.txt").write_text(f"image {i}")
    return root


@pytest.mark.e2e
def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(prefect_api_url, busy_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    procs = DaskProcesses(root, worker_env(prefect_api_url))
    try:
        procs.add_worker("survivor")
        procs.add_worker("victim")
        with Client(procs.address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        out = root / "out"
        run = subprocess.Popen(
            # dedup.keep=all, as offline_config (the clean run below): the images repeat one photo.
            [sys.executable, "-m", "facecap", "curate", str(busy_images), "--out", str(out), "--profile", "offline",
             "--shard-size", "4", "--dask-address", procs.address, "--set", "dedup.keep=all"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(prefect_api_url))
        detect_dir = out / "shards" / "detect"
        deadline = time.time() + 300
        while not list(detect_dir.glob("*.json")):
            assert run.poll() is None, run.stdout.read()
            assert time.time() < deadline, "no detect shard finished in time"
            time.sleep(0.05)
        procs.kill("victim")
        done_at_kill = len(list(detect_dir.glob("*.json")))
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    finally:
        procs.stop()

    shards = len(list(detect_dir.glob("*.json")))
    assert done_at_kill < shards, f"the worker was killed after all {shards} shards were done: not mid-run"
    clean = root / "clean"
    run_curate([busy_images], clean, offline_config(ingest={"shard_size": 4}, execution={"n_workers": 2}))
    data, rejects = read_release(out)
    clean_data, clean_rejects = read_release(clean)
    assert data.num_rows == clean_data.num_rows > 0
    assert len(set(data.column("sample_id").to_pylist())) == data.num_rows, "duplicated records"
    assert data.equals(clean_data)
    assert sorted_rejects(rejects).equals(sorted_rejects(clean_rejects))
    # Every input image is accounted for once: kept faces' images + rejected images = inputs.
    accounted = set(data.column("image_id").to_pylist()) | set(rejects.column("image_id").to_pylist())
    assert len(accounted) == BUSY_IMAGES


def test_stage_resources_pin_any_stage_and_unknown_stages_are_errors():
    import dask

    from facecap.settings import ConfigError
    from facecap.chain import check_stage_names
    from facecap.flows.executor import placement, stage_resources
    from facecap.stages.detect import Detect
    from facecap.stages.ingest import Ingest

    cfg = offline_config(execution={"stage_resources": {"ingest": {"io": 1}}}, detect={"device": "cuda"})
    assert stage_resources(Ingest, cfg) == {"io": 1}
    assert stage_resources(Detect, cfg) == {"GPU": 1}  # cuda asks for the GPU without any stage_resources
    with placement(Ingest, cfg):
        assert dask.get_annotations() == {"priority": Ingest.priority, "resources": {"io": 1}}
    # On a cluster with slots, CPU work takes a CPU slot and downloads (I/O-bound ingest) an IO slot.
    assert stage_resources(Detect, offline_config(), slots=True) == {"CPU": 1}
    assert stage_resources(Ingest, offline_config(), slots=True) == {"IO": 1}
    check_stage_names(cfg)
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['detec'\]"):
        check_stage_names(offline_config(execution={"stage_resources": {"detec": {"GPU": 1}}}))
