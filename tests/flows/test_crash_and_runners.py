"""Crash safety (SIGKILL then rerun), two runs on one store, and the Dask runner: same outputs as a clean local run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.conftest import computed, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

REPO = Path(__file__).resolve().parents[2]


def _snapshot(store: Path) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    st = Store(store)
    out = {}
    for info in st.list_stages(with_bytes=False):
        for item in st.complete_items(info.stage, info.key):
            out[(info.stage, info.key, item)] = st.read_item(info.stage, info.key, item)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys(), k
        for name in a[k]:
            np.testing.assert_array_equal(a[k][name], b[k][name], err_msg=str((k, name)))


def _exp(store: Path, limit: int = 3):
    return tiny_experiment(store, datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "limit": limit,
                                             "root": str(REPO / "examples" / "data" / "voc2012-sample")}])


def _write_yaml(exp, path: Path) -> Path:
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


def _spawn(exp_file: Path) -> subprocess.Popen:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PREFECT_API") or k == "PREFECT_HOME":
            env.pop(k)
    env["PREFECT_HOME"] = str(exp_file.parent / "prefect-home")  # a private ephemeral server database
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(exp_file), "-q"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("reference")
    summary = run_experiment(_exp(store), progress=False)
    assert summary.failed == 0
    return _snapshot(store)


def test_sigkill_mid_stage_then_rerun_gives_identical_outputs(tmp_path, reference):
    store = tmp_path / "store"
    exp = _exp(store)
    proc = _spawn(_write_yaml(exp, tmp_path / "exp.yaml"))
    st = Store(store)
    deadline = time.time() + 300
    killed_during = None
    try:
        while time.time() < deadline and proc.poll() is None:
            done = {i.stage: i.complete for i in st.list_stages(with_bytes=False)} if (store / "stages").exists() else {}
            if done.get("mask_class_tokens", 0) >= 1:  # part-way through the CorrCLIP stages
                killed_during = dict(done)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert killed_during is not None, "the run finished or stalled before the kill point"
    partial = _snapshot(store)
    assert 0 < len(partial) < len(reference)
    for k, arrays in partial.items():  # whatever is marked complete after the kill is already right
        for name, a in arrays.items():
            np.testing.assert_array_equal(a, reference[k][name])
    summary = run_experiment(exp, progress=False)
    assert summary.failed == 0
    assert sum(s.done for s in summary.stages) == len(reference) - len(partial)  # completed work not redone
    _assert_same(_snapshot(store), reference)


def test_two_runs_on_one_store_do_not_corrupt_or_duplicate(tmp_path, reference):
    store = tmp_path / "store"
    exp = _exp(store)
    f1 = _write_yaml(exp, (tmp_path / "a").mkdir() or tmp_path / "a" / "exp.yaml")
    f2 = _write_yaml(exp, (tmp_path / "b").mkdir() or tmp_path / "b" / "exp.yaml")
    p1, p2 = _spawn(f1), _spawn(f2)
    out1, _ = p1.communicate(timeout=600)
    out2, _ = p2.communicate(timeout=600)
    assert p1.returncode == 0, out1.decode()[-2000:]
    assert p2.returncode == 0, out2.decode()[-2000:]
    again = run_experiment(exp, progress=False)
    assert computed(again) == {}  # between them the two runs completed everything
    _assert_same(_snapshot(store), reference)


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
    reference = _snapshot(tmp_path / "local")
    store = tmp_path / "store"
    exp = _exp(store).model_copy(update={"runner": _exp(store).runner.model_copy(update={"kind": "dask", "workers": 2, "batch_size": 1})})
    summary = run_experiment(exp, progress=False)
    assert summary.failed == 0
    _assert_same(_snapshot(store), reference)
