"""Prefect task runners for the experiment's ``runner`` settings (local threads or Dask).

``runner.kind: local`` runs batches in a thread pool of ``runner.workers`` threads.
``runner.kind: dask`` runs them on Dask: a temporary cluster of ``runner.workers`` processes
(one thread each) on this machine, or an existing cluster at ``runner.address`` (a scheduler
and workers started with ``dask scheduler`` / ``dask worker``; see docs/scaling-out.md).

The Dask runner (``OvsegDaskTaskRunner``) adds to prefect-dask's:

- each batch task is shipped with its own arguments only, not the flow run's parameters
  (the open store, the run journal, every manifest): Prefect would otherwise serialise them into
  every task's context, which fails on their locks and would copy the whole plan per batch;
- Dask's own INFO lines (scheduler, nanny, connections: ~35 per run) are kept at WARNING unless
  the ``ovseg`` logger is at DEBUG; the scheduler and its dashboard URL are logged once, at INFO,
  by ``ovseg.runners``;
- worker loss: Dask reruns a batch whose worker died on another worker (up to
  ``distributed.scheduler.allowed-failures`` times, default 3); the rerun finds the batch's items
  still held by the dead worker's lease and reports them busy, and the flow waits until that
  lease expires (``runner.lease_ttl``) and submits them again, so the run ends complete. When
  Dask gives up on a batch (every worker that ran it died: usually the batch itself exhausts
  memory), its Prefect task run is marked Crashed and the future raises ``WorkerLostError``;
- ``capacity()``: the threads of the workers connected now (workers that joined count);
  ``parallelism(runner.workers)`` reads it from inside the flow (for its bound on batches in flight);
- this process's environment is given back: a temporary cluster's nannies run here and, before
  spawning each worker, set ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``,
  ``MKL_NUM_THREADS=1``, ...) in this process's ``os.environ`` and never unset it, so every
  process started from here afterwards (an ``ovseg run`` child of a long-lived process or of a
  test) would run torch at one thread, and store other bits than a fresh process
  (``nanny_environment`` / ``restore_environment``; docs/design.md, determinism).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from typing import Any

from flows.config import Experiment

log = logging.getLogger("ovseg.runners")

DASK_LOGGERS = ("distributed", "bokeh", "tornado")  # loggers that print cluster chatter at INFO


class WorkerLostError(RuntimeError):
    """Every Dask worker that ran a batch died while running it; its items are left for a rerun."""


def make_task_runner(exp: Experiment):
    """The Prefect task runner for the experiment's runner settings."""
    if exp.runner.kind == "dask":
        cls = dask_runner_class()
        quiet_dask_logs()
        if exp.runner.address:
            return cls(address=exp.runner.address)
        return cls(cluster_kwargs={"n_workers": exp.runner.workers, "threads_per_worker": 1, "processes": True,
                                   "dashboard_address": ":0", "silence_logs": logging.WARNING})  # :0 a free port
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=exp.runner.workers)


class _ShutdownNoise(logging.Filter):
    """Drops the nanny's "Worker process still alive after 4.0 seconds, killing" of a temporary
    cluster's shutdown: it comes after every batch has ended (nothing is being written)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Worker process still alive after")


def computes_inline(exp: Experiment) -> bool:
    """Whether the run's batches run in the calling thread (``InlineExecutor``; with Prefect, task runs called in
    the flow's thread): a local runner with one worker."""
    return exp.runner.kind == "local" and exp.runner.workers == 1


class InlineExecutor(Executor):
    """Runs each submitted call at once in the submitting thread; its future is done when ``submit`` returns.

    A local run with one worker (``computes_inline``) computes in the thread that called
    ``run_experiment``: one thread computes either way, and no second GNU OpenMP pool is made beside that thread's own (a pool
    lives as long as its thread; while two live on this 2-core machine each parallel region's
    workers sleep instead of spinning: small operations up to twice as slow). An exception of the
    call is the future's, as in a pool; an interrupt (``KeyboardInterrupt``) propagates from
    ``submit``: the batch's stored packs and released leases are the chain's own
    (``tasks.chain.run_chain``), as when a pool's batch fails."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the caller with the future, as a pool does
            future.set_exception(e)
        return future


def parallelism(default: int) -> int:
    """Batches that can run at once now: inside a flow on a Dask cluster, its workers' threads at this
    moment (workers that joined count, dead ones do not), never less than ``default``
    (``runner.workers``); ``default`` otherwise. Without Prefect loaded (``--no-prefect``) there is no flow run, and
    Prefect is not imported for the question (its import cost a cold ``--no-prefect`` bank build ~1 s of CPU)."""
    if "prefect.context" not in sys.modules:
        return default
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    capacity = getattr(ctx.task_runner, "capacity", None) if ctx is not None else None
    return max(default, capacity()) if capacity is not None else default


def quiet_dask_logs() -> None:
    """Dask's loggers at WARNING in this process, unless ``ovseg`` logs at DEBUG (then left as they are)."""
    if logging.getLogger("ovseg").isEnabledFor(logging.DEBUG):
        return
    for name in DASK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    nanny = logging.getLogger("distributed.nanny")
    if not any(isinstance(f, _ShutdownNoise) for f in nanny.filters):
        nanny.addFilter(_ShutdownNoise())


def nanny_environment() -> dict[str, str | None]:
    """This process's values (None: unset) of the variables a Dask nanny started here sets in it before spawning its
    worker (``distributed.nanny.pre-spawn-environ``, and ``PYTHONHASHSEED``, which the nanny adds)."""
    import dask
    import distributed  # noqa: F401 - puts its defaults (the nanny's variables) into dask.config

    names = [*dask.config.get("distributed.nanny.pre-spawn-environ"), "PYTHONHASHSEED"]
    return {k: os.environ.get(k) for k in names}


def restore_environment(saved: Mapping[str, str | None]) -> None:
    """Set the variables of ``saved`` (from :func:`nanny_environment`) back in ``os.environ``: unset where None."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        elif os.environ.get(k) != v:
            os.environ[k] = v


_RUNNER_CLASS: type | None = None


def dask_runner_class() -> type:
    """``OvsegDaskTaskRunner``, defined on first use (prefect-dask is an optional dependency)."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is None:
        _RUNNER_CLASS = _define_runner_class()
    return _RUNNER_CLASS


def __getattr__(name: str) -> Any:
    """``flows.runners.OvsegDaskTaskRunner`` resolves lazily, so a pickled runner is found by name on workers."""
    if name == "OvsegDaskTaskRunner":
        return dask_runner_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_runner_class() -> type:
    try:
        from distributed import KilledWorker
        from prefect_dask import DaskTaskRunner
        from prefect_dask.task_runners import PrefectDaskFuture
    except ImportError as e:
        raise RuntimeError("runner kind 'dask' needs prefect-dask and dask.distributed here and on every worker: "
                           "pip install 'ovseg[dask]'") from e
    from prefect.context import FlowRunContext

    class OvsegDaskFuture(PrefectDaskFuture):
        """A batch's future: a batch Dask gave up on raises ``WorkerLostError`` after marking its run Crashed."""

        def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
            try:
                return super().result(timeout=timeout, raise_on_failure=raise_on_failure)
            except KilledWorker as e:
                msg = (f"every Dask worker that ran this batch died ({e.allowed_failures + 1} tries; "
                       f"distributed.scheduler.allowed-failures = {e.allowed_failures}); its items are left for a "
                       f"rerun. The workers' logs say why (out of memory?); last worker: {e.last_worker.address}")
                _mark_crashed(self.task_run_id, msg)
                raise WorkerLostError(msg) from e

    class OvsegDaskTaskRunner(DaskTaskRunner):
        """prefect-dask's runner: batches shipped without the flow's parameters, one log line, worker-loss errors."""

        _announced = False
        _capacity: tuple[float, int] = (0.0, 0)
        _environment: Mapping[str, str | None] = {}

        def __enter__(self):
            self._environment = nanny_environment()
            return super().__enter__()

        def __exit__(self, *args: Any) -> None:
            try:
                super().__exit__(*args)
            finally:
                restore_environment(self._environment)  # a worker restarted during the run set them again

        @property
        def client(self):
            """prefect-dask's client; a temporary cluster started here gives the process environment back."""
            started = not self._client
            client = DaskTaskRunner.client.fget(self)
            if started:
                restore_environment(self._environment)
            return client

        def submit(self, task, parameters: dict[str, Any], wait_for=None, dependencies=None) -> OvsegDaskFuture:
            flow_ctx = FlowRunContext.get()
            if flow_ctx is None or not flow_ctx.parameters:
                future = super().submit(task, parameters, wait_for, dependencies)
            else:
                with flow_ctx.model_copy(update={"parameters": {}}):
                    future = super().submit(task, parameters, wait_for, dependencies)
            if not self._announced:
                self._announced = True
                self._announce()
            return OvsegDaskFuture(wrapped_future=future.wrapped_future, task_run_id=future.task_run_id)

        def capacity(self, max_age: float = 2.0) -> int:
            """Threads of the workers connected now (re-read at most every ``max_age`` seconds)."""
            read_at, threads = self._capacity
            if time.monotonic() - read_at > max_age:
                workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
                threads = sum(int(w.get("nthreads", 1)) for w in workers)
                self._capacity = (time.monotonic(), threads)
            return threads

        def _announce(self) -> None:
            where = self.address or self.client.scheduler.address
            try:
                link = self.client.dashboard_link
            except KeyError:  # the scheduler serves no HTTP endpoint
                link = ""
            if link:
                log.info("Dask scheduler %s; dashboard: %s", where, link)
            else:
                log.info("Dask scheduler %s (no dashboard)", where)

    for cls in (OvsegDaskFuture, OvsegDaskTaskRunner):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return OvsegDaskTaskRunner


def _mark_crashed(task_run_id, message: str) -> None:
    """Set a task run whose process died to Crashed (it would stay Running in the Prefect UI)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as e:  # noqa: BLE001 - the state is cosmetic; the error itself is raised by the caller
        log.warning("could not mark task run %s crashed: %s", task_run_id, e)
