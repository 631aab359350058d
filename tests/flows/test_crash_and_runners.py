"""Crash safety and concurrency with real processes: SIGKILL in another hostname then a plain rerun, two runs at
once on one store, and the Dask LocalCluster runner: always the same outputs as a clean local run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.concurrent_runs import kill_during_write
from tests.flows.conftest import assert_same_outputs, computed, store_snapshot, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect

REPO = Path(__file__).resolve().parents[2]
TTL = 6.0  # lease TTL of these runs: a rerun after a kill waits at most this long
UNSHARE = shutil.which("unshare")



def _exp(store: Path, limit: int = 3):
    base = tiny_experiment(store)
    return tiny_experiment(store, datasets=[{**base.datasets[0].model_dump(), "limit": limit}],
                           runner={"kind": "local", "workers": 1, "batch_size": 1, "lease_ttl": TTL})


def _write_yaml(exp, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


def _can_unshare() -> bool:
    if UNSHARE is None:
        return False
    return subprocess.run([UNSHARE, "-u", "true"], capture_output=True).returncode == 0


def _spawn(exp_file: Path, hostname: str | None = None) -> subprocess.Popen:
    """``ovseg run`` in a new process (optionally in its own UTS namespace with another hostname), talking to
    this session's Prefect server so that no second server has to start."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(exp_file), "-q"]
    if hostname:
        cmd = [UNSHARE, "-u", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("reference") / "store"
    summary = run_experiment(_exp(store), progress=False)
    assert summary.status == "complete"
    return store_snapshot(store)


def test_sigkill_in_another_hostname_then_a_plain_rerun_gives_identical_outputs(tmp_path, reference):
    store = tmp_path / "store"
    exp = _exp(store)
    other_host = "another-container" if _can_unshare() else None
    proc = _spawn(_write_yaml(exp, tmp_path / "exp.yaml"), hostname=other_host)
    kill_during_write(proc, store, "mask_class_tokens")
    killed_at = time.time()
    partial = store_snapshot(store)
    assert 0 < len(partial) < len(reference)
    for k, arrays in partial.items():  # whatever is complete after the kill is already right
        for name, a in arrays.items():
            np.testing.assert_array_equal(a, reference[k][name])

    t0 = time.time()
    summary = run_experiment(exp, progress=False)  # the dead run's leases are not alive: no "busy", no partial
    assert summary.status == "complete" and summary.exit_code == 0
    assert time.time() - t0 < 120
    assert sum(s.done for s in summary.stages) == len(reference) - len(partial)  # completed work not redone
    assert_same_outputs(store_snapshot(store), reference)
    runs, _ = Store(store).runs()
    killed = next(r for r in runs if r.run_id != summary.run_id)
    assert killed.status in ("dead", "running") and (killed.status == "dead" or time.time() - t0 < TTL)
    if other_host:
        assert killed.data["host"] == other_host
    # a lease of the dead run is taken over when its items are claimed; one left for items it finished is
    # dead once its last heartbeat is older than the TTL (the rerun may end sooner), and gc removes it then
    from storage.maintenance import gc

    time.sleep(max(0.0, killed_at + TTL + 0.5 - time.time()))
    gc(Store(store), keep=Store(store).stage_sets(), stale_after=0)
    assert not list((store / "leases").rglob("*.json"))


def test_two_runs_at_once_both_complete_with_identical_scores(tmp_path, reference):
    store = tmp_path / "store"
    exp = _exp(store)
    p1 = _spawn(_write_yaml(exp, tmp_path / "a" / "exp.yaml"))
    p2 = _spawn(_write_yaml(exp, tmp_path / "b" / "exp.yaml"))
    out1 = p1.communicate(timeout=600)[0].decode()
    out2 = p2.communicate(timeout=600)[0].decode()
    assert p1.returncode == 0, out1[-3000:]
    assert p2.returncode == 0, out2[-3000:]

    def scores(out: str) -> list[str]:
        return sorted(re.findall(r"^voc\s+\S+\s+[\d.]+\s+[\d.]+\s+3/3\s*$", out, flags=re.M))

    assert len(scores(out1)) == 2 and scores(out1) == scores(out2)  # both over all 3 images, identical
    again = run_experiment(exp, progress=False)
    assert computed(again) == {}  # between them the two runs completed everything
    assert_same_outputs(store_snapshot(store), reference)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_outputs(tmp_path):
    """Dask workers run torch with one thread (the nanny sets OMP_NUM_THREADS=1), and BLAS reductions
    depend on the thread count: the local reference is computed with one thread too, then the
    outputs must be bit-identical."""
    pytest.importorskip("prefect_dask")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(_exp(tmp_path / "local"), progress=False)
    finally:
        torch.set_num_threads(threads)
    reference = store_snapshot(tmp_path / "local")
    store = tmp_path / "store"
    exp = _exp(store).model_copy(update={"runner": _exp(store).runner.model_copy(update={"kind": "dask", "workers": 2})})
    summary = run_experiment(exp, progress=False)
    assert summary.failed == 0
    assert_same_outputs(store_snapshot(store), reference)
