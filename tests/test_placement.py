"""GPU stages carry the Dask resource GPU=1 when the config asks for a GPU device.

A real Dask cluster with two worker processes, only one of which offers the
resource; Prefect tasks submitted inside `placement` must all land on it.
"""

from __future__ import annotations

import pytest
from distributed import Nanny, Scheduler, SpecCluster
from helpers import offline_config
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from facecap.models.retinaface import providers_for
from facecap.flows.executor import placement, wants_gpu
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

    from facecap.flows import executor

    cfg = offline_config(**config)
    workers = executor.size_local_cluster(cfg, shards)
    view = _worker_view.submit().result() if submit else None
    return workers, view, FlowRunContext.get().task_runner._client is not None  # a cluster was created


def test_the_local_cluster_starts_on_the_first_task_with_a_worker_per_shard(prefect_api_url):
    """No task, no worker; a one-shard run pays for one worker's start-up, a bigger run gets every configured
    worker; each imports the stage code as it starts."""
    from facecap.flows import executor

    config = {"execution": {"n_workers": 2}}
    cfg = offline_config(**config)
    for shards, submit, expected in ((1, False, (1, None, False)), (1, True, (1, (1, True), True)),
                                     (5, True, (2, (2, True), True))):
        runner = executor.task_runner_for(cfg)
        assert sized_run.with_options(task_runner=runner)(config, shards, submit) == expected
    # Outside a flow with this process's local runner, it can only say what prefect-dask would start.
    assert executor.size_local_cluster(cfg, 1) == 2
    assert executor.size_local_cluster(offline_config(execution={"dask_address": "tcp://10.0.0.1:8786"}), 1) is None
