"""A long-lived process (``ovseg serve``, a notebook, this test session) runs many flow runs: each must store the
bits a fresh ``ovseg run`` process stores, whatever ran in the process before it, and what it starts afterwards
must be a fresh process too.

A temporary Dask cluster's nannies run in the process that starts it and set their workers' variables
(``OMP_NUM_THREADS=1``, ...) in its environment (``flows.runners.nanny_environment``); before the runner gave them
back, every ``ovseg run`` child started afterwards ran torch at one thread: its outputs differed in the last bits
from the in-process runs (in CI, the S3 crash test's in-process reference, run after the Dask tests, against its
``ovseg run`` children).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_experiment
from flows.runners import make_task_runner, nanny_environment
from ovseg_core.bank.config import IndexConfig
from ovseg_core.bank.index import build_index
from tests.flows.concurrent_runs import experiment, finish, spawn, write_yaml
from tests.flows.conftest import store_snapshot, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole runs, some in fresh processes


def mismatches(a: dict, b: dict) -> list[str]:
    """Every array of two :func:`store_snapshot` results that is not the same bit for bit, with its count of
    differing elements (all of them, not only the first: where a difference starts shows its cause)."""
    out = [f"items only in one: {sorted(a.keys() ^ b.keys())}"] if a.keys() != b.keys() else []
    for k in sorted(a.keys() & b.keys()):
        for name in sorted(a[k].keys() | b[k].keys()):
            x, y = a[k].get(name), b[k].get(name)
            if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
                out.append(f"{k} {name}: missing or another shape/dtype")
            elif not np.array_equal(x, y):
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                out.append(f"{k} {name}: {int((x != y).sum())} of {x.size} differ, max {diff.max():.3g}")
    return out


def run_fresh(tmp: Path) -> dict:
    """The experiment (CorrCLIP + SC-CLIP, tiny random models, 2 VOC images) by ``ovseg run --no-prefect`` in a new
    process, which inherits this process's environment."""
    rc, out = finish(spawn(write_yaml(experiment(tmp / "store", images=2), tmp / "exp.yaml")))
    assert rc == 0, out[-3000:]
    return store_snapshot(tmp / "store")


def run_here(store: Path) -> dict:
    """The same experiment in this process (``--no-prefect``: local threads)."""
    summary = run_experiment(experiment(store, images=2), progress=False, orchestrate=False)
    assert summary.status == "complete", summary.status
    return store_snapshot(store)


def test_a_temporary_dask_cluster_leaves_this_process_environment_as_it_was(tmp_path, monkeypatch):
    before = nanny_environment()
    for name in before:
        monkeypatch.delenv(name, raising=False)  # unset, as in a fresh shell: a variable set here would show
    exp = tiny_experiment(tmp_path / "store", runner={"kind": "dask", "workers": 1})
    with make_task_runner(exp) as runner:
        assert runner.client.scheduler_info()["workers"]  # the cluster and its nanny started in this process
        assert nanny_environment() == dict.fromkeys(before)
    assert nanny_environment() == dict.fromkeys(before)


def test_two_runs_in_one_process_with_other_work_between_store_the_bits_of_fresh_processes(tmp_path):
    fresh = run_fresh(tmp_path / "fresh")
    assert mismatches(run_here(tmp_path / "first"), fresh) == []
    # what earlier flow runs and tests of a long-lived process do: a reduced-precision run with SC-CLIP's options
    # (other cached models, other code paths), a FAISS index build (OpenMP), a run on a temporary Dask cluster
    between = tiny_experiment(tmp_path / "between", dtype="bfloat16", methods=[
        {"name": "scclip-options", "method": "scclip", "params": {"dynamic_detection": True,
                                                                   "boundary_aware_repair": True}}])
    assert run_experiment(between, progress=False, orchestrate=False).status == "complete"
    keys = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    bank = build_index(keys, cfg=IndexConfig(pq_m=8))  # k-means and PQ training on FAISS's OpenMP threads
    assert (bank.kind, bank.ntotal) == ("ivfpq", 3000)
    on_dask = tiny_experiment(tmp_path / "dask", runner={"kind": "dask", "workers": 1})
    on_dask = on_dask.model_copy(update={"datasets": [on_dask.datasets[0].model_copy(update={"limit": 1})]})
    assert run_experiment(on_dask, progress=False).failed == 0
    assert mismatches(run_here(tmp_path / "second"), fresh) == []
    assert mismatches(run_fresh(tmp_path / "fresh-after"), fresh) == []  # a process started from this one
