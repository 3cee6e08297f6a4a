"""Where stage tasks run: GPU stages carry the Dask resource GPU=1 when the config asks for a GPU device, and on
a local cluster the flow sends a task only when a slot of its kind is free, best-ranked first.

Real Dask clusters of worker processes: one where only one of two workers offers the GPU resource (Prefect
tasks submitted inside `placement` must all land on it), and the local cluster a run starts.
"""

from __future__ import annotations

import pytest
from distributed import Nanny, Scheduler, SpecCluster
from helpers import offline_config
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from facecap.models.retinaface import providers_for
from facecap.flows import executor
from facecap.flows.executor import CPU, IO, ShardExecutor, local_slots, placement, wants_gpu
from facecap.stages.detect import Detect as DETECT
from facecap.stages.ingest import Ingest as INGEST


@task(cache_policy=NO_CACHE)
def where_am_i(i: int) -> tuple[str, dict]:
    from distributed import get_worker

    worker = get_worker()
    return worker.address, dict(worker.state.total_resources)


@flow
def probe(config: dict, n: int) -> list[tuple[str, dict]]:
    cfg = offline_config(**config)
    with placement(DETECT, cfg):
        futures = [where_am_i.submit(i) for i in range(n)]
    return [f.result() for f in futures]


@pytest.fixture(scope="module")
def gpu_and_cpu_workers():
    workers = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}) as cluster:
        cluster.wait_for_workers(2)
        yield cluster


def test_gpu_stage_runs_only_on_the_gpu_worker(prefect_api_url, gpu_and_cpu_workers):
    runner = DaskTaskRunner(address=gpu_and_cpu_workers.scheduler_address)
    placed = probe.with_options(task_runner=runner)({"detect": {"device": "cuda"}}, 8)
    assert len(placed) == 8 and all(resources == {"GPU": 1} for _, resources in placed)


def test_cpu_device_is_not_annotated(prefect_api_url, gpu_and_cpu_workers):
    runner = DaskTaskRunner(address=gpu_and_cpu_workers.scheduler_address)
    placed = probe.with_options(task_runner=runner)({"detect": {"device": "cpu"}}, 8)
    assert len(placed) == 8  # runs anywhere; nothing waits for a resource
    assert not wants_gpu(DETECT, offline_config(detect={"device": "cpu"}))
    assert not wants_gpu(INGEST, offline_config(detect={"device": "cuda"})), "ingest never needs a GPU"


def test_cuda_without_a_cuda_runtime_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        providers_for("cuda")
    assert providers_for("auto") == ["CPUExecutionProvider"]


def _stage_code_loaded() -> bool:
    import sys

    return "facecap.tasks.stages" in sys.modules


@task(cache_policy=NO_CACHE)
def _worker_view() -> tuple[int, bool]:
    from distributed import get_client

    client = get_client()
    return len(client.scheduler_info()["workers"]), all(client.run(_stage_code_loaded).values())


@flow
def sized_run(config: dict, shards: int, submit: bool) -> tuple[int | None, tuple[int, bool] | None, bool]:
    from prefect.context import FlowRunContext

    cfg = offline_config(**config)
    workers = executor.size_local_cluster(cfg, shards)
    view = _worker_view.submit().result() if submit else None
    return workers, view, FlowRunContext.get().task_runner._client is not None  # a cluster was created


def test_the_local_cluster_starts_on_the_first_task_with_a_worker_per_shard(prefect_api_url):
    """No task, no worker; a one-shard run pays for one worker's start-up, a bigger run gets every configured
    worker; each imports the stage code as it starts."""
    config = {"execution": {"n_workers": 2}}
    cfg = offline_config(**config)
    for shards, submit, expected in ((1, False, (1, None, False)), (1, True, (1, (1, True), True)),
                                     (5, True, (2, (2, True), True))):
        runner = executor.task_runner_for(cfg)
        assert sized_run.with_options(task_runner=runner)(config, shards, submit) == expected
    # Outside a flow with this process's local runner, it can only say what prefect-dask would start.
    assert executor.size_local_cluster(cfg, 1) == 2
    assert executor.size_local_cluster(offline_config(execution={"dask_address": "tcp://10.0.0.1:8786"}), 1) is None


@task(cache_policy=NO_CACHE)
def hold_slot(name: str, seconds: float) -> tuple[str, str]:
    import time

    from distributed import get_worker

    time.sleep(seconds)
    return name, get_worker().address


class Recorded:
    """The Prefect task, with a record of each submission: its name, the tasks of each kind in flight then, and
    the worker the executor named for it."""

    def __init__(self, shards: ShardExecutor, log: list):
        self.shards, self.log = shards, log

    def submit(self, name: str, seconds: float):
        import dask

        in_flight = [kind for _, _, kind, _ in self.shards.pending.values()]
        named = (dask.get_annotations().get("workers") or [None])[0]
        self.log.append((name, in_flight.count(CPU), in_flight.count(IO), named))
        return hold_slot.submit(name, seconds)


@flow
def dispatched(config: dict) -> tuple[list, list]:
    """Six detect tasks of shards of growing size and four ingest tasks, all submitted at once, on a local
    cluster of two workers with one CPU and one IO slot each."""
    cfg = offline_config(**config)
    shards = ShardExecutor(cfg, local_slots(cfg, 2))
    log: list = []
    task_ = Recorded(shards, log)
    for i in range(6):
        shards.submit(task_, DETECT, f"detect{i}", f"detect{i}", 0.3, larger=i / 5)
    for i in range(4):
        shards.submit(task_, INGEST, f"ingest{i}", f"ingest{i}", 0.1, larger=i / 3)
    finished = [(tag, result, error) for tag, result, error in shards.finished()]
    return log, finished


def test_a_local_cluster_gets_a_task_only_when_a_slot_of_its_kind_is_free_best_ranked_first(prefect_api_url):
    """Left to Dask, every task is assigned to a worker when submitted, and a worker's queued CPU tasks are never
    moved to an idle one; so the flow holds them until a slot is free, then sends the largest shard first."""
    config = {"execution": {"n_workers": 2, "threads_per_worker": 1, "io_threads": 1}}
    runner = executor.task_runner_for(offline_config(**config))
    log, finished = dispatched.with_options(task_runner=runner)(config)
    names = [f"detect{i}" for i in range(6)] + [f"ingest{i}" for i in range(4)]
    assert sorted(tag for tag, _, _ in finished) == sorted(names)
    assert all(error is None and result[0] == tag for tag, result, error in finished)
    assert all((cpu if name.startswith("detect") else io) < 2 for name, cpu, io, _ in log), \
        f"a task was sent with no free slot of its kind: {log}"
    detect_order = [name for name, _, _, _ in log if name.startswith("detect")]
    ingest_order = [name for name, _, _, _ in log if name.startswith("ingest")]
    # The first two took the free slots as they came; the rest waited and went largest first.
    assert detect_order == ["detect0", "detect1", "detect5", "detect4", "detect3", "detect2"]
    assert ingest_order == ["ingest0", "ingest1", "ingest3", "ingest2"]
    # Each ran where its free slot was, so no task queued behind a busy one; the two detect tasks sent first
    # went to different workers.
    named = {name: worker for name, _, _, worker in log}
    ran = {tag: result[1] for tag, result, _ in finished}
    assert all(named[name] for name in names) and named == ran
    assert named["detect0"] != named["detect1"]


def test_an_existing_cluster_gets_every_task_at_once():
    """Without local slots (an existing cluster, which may scale with the work it sees waiting) nothing is held."""
    shards = ShardExecutor(offline_config(), None)
    sent: list = []

    class Probe:
        def submit(self, *args):
            sent.append(args)
            raise RuntimeError("sent")  # stop before Dask: what matters is that it was sent at once

    for i in range(5):
        with pytest.raises(RuntimeError, match="sent"):
            shards.submit(Probe(), DETECT, i, i)
    assert len(sent) == 5 and not shards.waiting
