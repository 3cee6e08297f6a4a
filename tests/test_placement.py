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
