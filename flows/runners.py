"""Prefect task runners for the experiment's ``runner`` settings (local threads or Dask)."""

from __future__ import annotations

from flows.config import Experiment


def make_task_runner(exp: Experiment):
    """The Prefect task runner for the experiment's runner settings."""
    if exp.runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("runner kind 'dask' needs prefect-dask: pip install 'ovseg[dask]'") from e
        if exp.runner.address:
            return DaskTaskRunner(address=exp.runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": exp.runner.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=exp.runner.workers)
