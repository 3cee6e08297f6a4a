"""The one module that knows Dask: the cluster, task placement, and the completion loop.

Stages and the shard runner know nothing of Dask; the curate flow submits
stage tasks through `ShardExecutor` and reads finished shards from it.

Slots. A local cluster's workers run `threads_per_worker` CPU slots (the
Dask resource CPU) plus `execution.io_threads` I/O slots (the resource IO),
one thread each. CPU-bound stage tasks take a CPU slot, I/O-bound ones
(ingest: downloads, reading sources) an IO slot, so a URL shard waiting on
the network never holds the thread a detect task needs: downloads overlap
with detection. An existing cluster gets the same behaviour when its workers
are started with `--nthreads N+K --resources "CPU=N,IO=K"`; on a cluster
whose workers do not offer both, tasks are not annotated with them (they
would never run).

Dispatch. On a local cluster the flow knows every slot: it hands a queued
task to Dask only when a slot of its kind is free, best-ranked first (later
stage, then larger shard), and names the worker whose slot it is. Left to
Dask, every ready task is assigned to a worker when submitted (tasks with
resource restrictions are never queued on the scheduler), chosen by
estimated occupancy, not by free resources; a worker runs its waiting tasks
in priority order and one that waits for a busy slot holds up the rest; and
its I/O threads count towards its threads, so the scheduler never sees it
saturated and never moves its queued tasks to an idle worker. Measured: a
worker sat idle for a whole shard at the start or end of a run. The named
worker is a preference (allow_other_workers): if it dies, Dask runs the task
elsewhere. On an existing cluster everything is submitted at once, so that an
adaptive cluster sees the work waiting and scales up.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any, Iterator

import dask
from distributed import WorkerPlugin, as_completed
from prefect.context import FlowRunContext
from prefect_dask import DaskTaskRunner

from facecap.config import Config
from facecap.stages.base import Stage

CPU, IO = "CPU", "IO"


def local_workers(cfg: Config) -> int:
    return cfg.execution.n_workers or max(1, os.cpu_count() or 1)


def nanny_environ() -> dict[str, str]:
    """What Dask's nannies set in a local worker's environment (distributed.nanny.pre-spawn-environ: one
    thread for OpenMP, MKL and OpenBLAS), less MALLOC_TRIM_THRESHOLD_=65536.

    Setting that at all turns off glibc's adaptive mmap threshold, so every decoded
    image and crop is a fresh mmap and page faults: detect ran 15-20 % slower in a
    worker than in a plain process (bench/README.md). Local workers go without.
    """
    spawn_environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {k: str(v) for k, v in spawn_environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}


def _local_cluster_kwargs(cfg: Config) -> dict[str, Any]:
    dask.config.set({"distributed.nanny.pre-spawn-environ": nanny_environ()})  # no MALLOC_TRIM_THRESHOLD_
    slots = cfg.execution.threads_per_worker
    return {
        "n_workers": local_workers(cfg),
        "threads_per_worker": slots + cfg.execution.io_threads,
        "resources": {CPU: slots, IO: cfg.execution.io_threads},
        "processes": True,
        "dashboard_address": ":0",  # a free port: concurrent runs must not collide
    }


def local_cluster(**kwargs: Any):
    """The local cluster of a run's task runner (its `cluster_class`), created on the run's first task: a run
    whose every shard is already done starts no worker process at all."""
    from distributed import LocalCluster

    # Workers inherit the run's PREFECT_API_URL from this process's environment (facecap.prefect_api).
    return LocalCluster(**kwargs, plugins=(StageImports(), LeaveInterruptsToTheCommand()))


def task_runner_for(cfg: Config) -> DaskTaskRunner:
    """An existing Dask scheduler if configured, else a local cluster of worker processes, started when the run
    submits its first task and sized by `size_local_cluster`."""
    if cfg.execution.dask_address:
        return DaskTaskRunner(address=cfg.execution.dask_address)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=_local_cluster_kwargs(cfg))


def _flow_task_runner() -> Any:
    return getattr(FlowRunContext.get(), "task_runner", None)


def _local_runner(runner: Any) -> bool:
    return isinstance(runner, DaskTaskRunner) and runner.cluster_class is local_cluster


def size_local_cluster(cfg: Config, shards: int) -> int | None:
    """Workers for a run of `shards` shards, called by the flow before its first task: the local cluster it
    will start gets min(execution.n_workers or one per core, shards) workers, since a worker without a shard
    only costs start-up. Returns the local workers (their cores are shared among them), or None on an
    existing cluster (execution.dask_address)."""
    if cfg.execution.dask_address:
        return None
    wanted = max(1, min(local_workers(cfg), shards))
    runner = _flow_task_runner()
    if _local_runner(runner) and runner._client is None:  # not started yet
        runner.cluster_kwargs["n_workers"] = wanted
        return wanted
    return local_workers(cfg)


def io_slots(cfg: Config, local: int | None) -> int:
    """Shards of an I/O-bound stage (downloads) that can run at once: each local worker's
    execution.io_threads, or on an existing cluster the IO slots (else threads) its workers offer now."""
    if local:
        return local * cfg.execution.io_threads
    runner = _flow_task_runner()
    if isinstance(runner, DaskTaskRunner) and runner._client is not None:
        workers = runner.client.scheduler_info().get("workers", {}).values()
        return max(1, sum(int((w.get("resources") or {}).get(IO) or w.get("nthreads") or 1) for w in workers))
    return 1


def _flush_prefect() -> None:
    import threading

    from facecap.prefect_api import drain_to_api

    # client.run calls this on the worker's event loop, where Prefect's drain would only
    # return a coroutine; a thread of its own makes it block until sent.
    flushing = threading.Thread(target=drain_to_api, kwargs={"timeout": 5.0})
    flushing.start()
    flushing.join()


class StageImports(WorkerPlugin):
    """What a worker's first stage task would import, done as the worker starts (before it takes a task):
    Prefect's task engine and the stage code, so that the first shard's time is the stage's own."""

    name = "facecap-stage-imports"

    def setup(self, worker) -> None:
        import prefect.task_engine  # noqa: F401

        import facecap.tasks.stages  # noqa: F401


class LeaveInterruptsToTheCommand(WorkerPlugin):
    """A local worker ignores SIGINT. Ctrl-C at a terminal reaches the whole process group, the workers
    included, and each of them printed a KeyboardInterrupt traceback of its own; the command that started
    them, interrupted, closes its cluster, and the nannies stop their workers. Only local clusters get this:
    a worker of an existing cluster (execution.dask_address) belongs to whoever started it."""

    name = "facecap-leave-interrupts-to-the-command"

    def setup(self, worker) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # where a nanny's worker runs its loop
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def wants_gpu(stage: type[Stage], cfg: Config) -> bool:
    """A stage asks Dask for a GPU=1 worker only when its config section asks for a cuda device."""
    return bool(stage.device_section) and getattr(cfg, stage.device_section).device == "cuda"


def stage_resources(stage: type[Stage], cfg: Config, slots: bool = False) -> dict[str, float]:
    """Dask resources one task of `stage` needs: GPU=1 for a cuda stage, else a CPU or IO slot (when the
    cluster offers them), plus execution.stage_resources."""
    resources: dict[str, float] = {"GPU": 1} if wants_gpu(stage, cfg) else {}
    if slots and not resources:
        resources[IO if stage.io_bound else CPU] = 1
    resources.update(cfg.execution.stage_resources.get(stage.name, {}))
    return resources


def rank(stage: type[Stage], larger: float = 0.0) -> float:
    """A task's place among queued tasks, higher first: its stage's priority, plus up to 0.5 for a bigger shard."""
    return stage.priority + 0.5 * min(max(larger, 0.0), 1.0)


def local_slots(cfg: Config, workers: int | None) -> dict[str, int] | None:
    """CPU and IO slots of the flow's local cluster of `workers` workers; None on an existing cluster (or under a
    task runner other than Dask's)."""
    if not workers or not _local_runner(_flow_task_runner()):
        return None
    return {CPU: workers * cfg.execution.threads_per_worker, IO: workers * cfg.execution.io_threads}


@contextmanager
def placement(stage: type[Stage], cfg: Config, slots: bool = False, larger: float = 0.0,
              worker: str | None = None) -> Iterator[None]:
    """Dask annotations (priority, resources) for tasks submitted inside this block.

    `larger` (0 to 1) ranks a task among queued tasks of the same stage: bigger shards run first, so the
    last shards to finish are small ones and workers do not idle behind one long shard at the end of a
    run. It never outranks the stage order (a later stage still runs before more upstream work). `worker`, when
    given, is where the task should run (another worker may take it if that one is gone)."""
    annotations: dict[str, Any] = {"priority": rank(stage, larger)}
    resources = stage_resources(stage, cfg, slots)
    if resources:
        annotations["resources"] = resources
    if worker:
        annotations.update(workers=[worker], allow_other_workers=True)
    with dask.annotate(**annotations):
        yield


def _cluster_offers_slots() -> bool:
    runner = _flow_task_runner()
    if _local_runner(runner):
        return True  # its workers are started with both kinds of slot
    if not isinstance(runner, DaskTaskRunner):
        return False
    workers = runner.client.scheduler_info().get("workers", {}).values()
    return bool(workers) and all({CPU, IO} <= set(w.get("resources") or {}) for w in workers)


class ShardExecutor:
    """Submits stage tasks with their placement and yields them as they finish, in completion order.

    `done` hands in a result the flow already has (a shard whose output the driver found intact), yielded
    like a finished task, before any task result: no task run and no worker for work that is done.

    With `slots` (a local cluster's CPU and IO slots, from `local_slots`), a task waits in the flow until a
    slot of its kind is free, and the best-ranked waiting task goes first (see Dispatch above).
    """

    def __init__(self, cfg: Config, slots: dict[str, int] | None = None):
        self.cfg = cfg
        # dask future -> (tag, prefect future, slot kind, worker named for it)
        self.pending: dict[Any, tuple[Any, Any, str | None, str | None]] = {}
        self.ready: deque[tuple[Any, Any]] = deque()
        self.completions: as_completed | None = None
        self.annotate_slots: bool | None = None
        self.slots = {kind: max(1, n) for kind, n in (slots or {}).items()}
        self.waiting: dict[str, list] = {kind: [] for kind in self.slots}  # kind -> heap of (-rank, seq, task)
        self.order = itertools.count()

    def _kind(self, stage: type[Stage]) -> str | None:
        """The slot kind the flow counts for this stage's tasks, or None when it does not hold them back."""
        if stage_resources(stage, self.cfg):
            return None  # a GPU or a resource of the user's: Dask places these
        kind = IO if stage.io_bound else CPU
        return kind if kind in self.slots else None

    def submit(self, task, stage: type[Stage], tag: Any, *args, larger: float = 0.0) -> None:
        kind = self._kind(stage)
        if kind is None:
            self._send(task, stage, tag, args, larger, None)
            return
        heapq.heappush(self.waiting[kind], (-rank(stage, larger), next(self.order), (task, stage, tag, args, larger)))
        self._dispatch(kind)

    def _in_flight(self, kind: str) -> Counter[str | None]:
        """Tasks of slot kind `kind` sent and not yet finished, per worker named for them (None: Dask chose)."""
        return Counter(worker for _, _, k, worker in self.pending.values() if k == kind)

    def _dispatch(self, kind: str) -> None:
        queue = self.waiting[kind]
        while queue and self._in_flight(kind).total() < self.slots[kind]:
            task, stage, tag, args, larger = heapq.heappop(queue)[2]
            self._send(task, stage, tag, args, larger, kind)

    def _free_worker(self, kind: str) -> str | None:
        """The local worker with a free `kind` slot and the fewest such tasks, counting what this run sent it;
        None if none is known to be free (a worker restarting): Dask then chooses."""
        workers = _flow_task_runner().client.scheduler_info().get("workers", {})  # starts the cluster if need be
        sent = self._in_flight(kind)
        free = [(sent[address], address) for address, info in workers.items()
                if sent[address] < (info.get("resources") or {}).get(kind, 0)]
        return min(free)[1] if free else None

    def _send(self, task, stage: type[Stage], tag: Any, args: tuple, larger: float, kind: str | None) -> None:
        worker = self._free_worker(kind) if kind is not None else None
        if self.annotate_slots is None:
            self.annotate_slots = _cluster_offers_slots()
        with placement(stage, self.cfg, self.annotate_slots, larger, worker):
            future = task.submit(*args)
        inner = future.wrapped_future  # the distributed.Future behind Prefect's
        self.pending[inner] = (tag, future, kind, worker)
        if self.completions is None:
            self.completions = as_completed([inner], loop=inner.client.loop)
        else:
            self.completions.add(inner)

    def done(self, tag: Any, result: Any) -> None:
        self.ready.append((tag, result))

    def finished(self) -> Iterator[tuple[Any, Any, BaseException | None]]:
        """(tag, result, error) for every submitted or handed-in result, including those added while iterating.

        A finished task's slot is refilled after the caller has seen it: the next stage of that shard, which
        the caller submits then, outranks the waiting tasks of the stage that just finished."""
        while self.ready or self.pending:
            while self.ready:
                tag, result = self.ready.popleft()
                yield tag, result, None
            if not self.pending:
                break
            done = next(self.completions)
            tag, future, kind, _ = self.pending.pop(done)
            try:
                yield tag, future.result(), None
            except Exception as exc:
                yield tag, None, exc
            if kind is not None:
                self._dispatch(kind)
        runner = _flow_task_runner()
        if self.completions is not None and _local_runner(runner):  # tasks ran on its workers
            # Workers hold Prefect's log and event senders; flushed now, they exit when the cluster closes
            # instead of being killed after the nanny's 4 s grace.
            runner.client.run(_flush_prefect, on_error="ignore")
