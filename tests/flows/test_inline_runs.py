"""A local run with one worker computes in the thread that called ``run_experiment`` (``flows.runners.InlineExecutor``
without Prefect; with Prefect, its task runs are called in the flow's thread; docs/design.md, "OpenMP on a shared
machine"): a second thread would make a second GNU OpenMP pool beside the caller's. Several workers still compute in
their own threads. An interrupt (Ctrl-C) during an inline batch keeps what is stored,
leaves no lease and no temporary behind, and a rerun completes with the outputs of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.concurrent_runs import REPO, experiment, finish, has_complete_item, spawn, write_yaml
from tests.flows.conftest import store_snapshot, tiny_experiment


def _compute_threads(exp, orchestrate: bool = False) -> set[str]:
    """Run ``exp`` from a thread named ``caller``; the names of the threads that ran a stage's compute (seen by a
    profile function: ``sys.setprofile`` in the caller, ``threading.setprofile`` for threads it starts)."""
    seen: set[str] = set()
    got: dict = {}

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_compute_group":
            seen.add(threading.current_thread().name)

    def caller() -> None:
        threading.setprofile(hook)  # threads started from now on (the pool's)
        sys.setprofile(hook)  # this thread
        try:
            got["summary"] = run_experiment(exp, progress=False, orchestrate=orchestrate)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            got["error"] = e
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    t = threading.Thread(target=caller, name="caller")
    t.start()
    t.join()
    if "error" in got:  # an assertion in the caller thread would only be a warning
        raise got["error"]
    summary = got["summary"]
    assert summary.status == "complete", (summary.status, [(s.stage, f) for s in summary.stages for f in s.failures],
                                          summary.notes)
    return seen


@pytest.mark.parametrize("workers", [1, 2])
def test_one_local_worker_computes_in_the_calling_thread_more_in_their_own(tmp_path, workers):
    exp = tiny_experiment(tmp_path / "store", runner={"kind": "local", "workers": workers, "batch_size": 1})
    threads = _compute_threads(exp)
    if workers == 1:
        assert threads == {"caller"}
    else:
        assert threads and all(name.startswith("ovseg-batch") for name in threads), threads


@pytest.mark.slow  # a Prefect server (the session's harness)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_prefect_run_with_one_local_worker_computes_in_the_flows_thread(tmp_path, workers):
    """The flow runs in the calling thread; with one worker its task runs run there too (called, not submitted),
    with two in the task runner's threads."""
    exp = tiny_experiment(tmp_path / "store", runner={"kind": "local", "workers": workers, "batch_size": 1})
    threads = _compute_threads(exp, orchestrate=True)
    if workers == 1:
        assert threads == {"caller"}
    else:
        assert threads and "caller" not in threads, threads


@pytest.mark.slow
def test_an_interrupt_during_an_inline_batch_keeps_the_store_whole_and_a_rerun_completes(tmp_path):
    store = tmp_path / "store"
    exp = experiment(store, images=8, batch_size=1, ttl=60.0)  # a lease left behind would hold a rerun 60 s
    exp_file = write_yaml(exp, tmp_path / "exp.yaml")
    # The child installs Python's KeyboardInterrupt handler itself: started from a shell's background job (a CI
    # script run with `&`), this process and its children inherit SIGINT ignored, and Python then installs none
    ovseg = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from flows.cli import main; "
             f"sys.exit(main(['run', {str(exp_file)!r}, '-q', '--no-prefect']))")
    proc = subprocess.Popen([sys.executable, "-c", ovseg], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ready, end = has_complete_item(store, "clip_layers"), time.time() + 300
    while proc.poll() is None and time.time() < end:
        try:
            if ready():
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the interrupt"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: to the process, whose one thread computing is the main thread
    code, out = finish(proc)
    assert code == 130 and "interrupted" in out, out[-2000:]
    assert not list((store / "leases").rglob("*.json")), "a lease was left behind"
    assert not list(store.rglob(".tmp-*")), "a temporary file was left behind"
    partial = store_snapshot(store)
    assert partial, "nothing was stored before the interrupt"

    t0 = time.time()
    code, out = finish(spawn(exp_file))
    assert code == 0, out[-2000:]
    assert time.time() - t0 < 55, "the rerun waited for a lease"  # generous: well under the 60 s TTL

    reference = tmp_path / "reference"
    assert run_experiment(experiment(reference, images=8, batch_size=1), progress=False,
                          orchestrate=False).status == "complete"
    got, want = store_snapshot(store), store_snapshot(reference)
    assert set(got) == set(want)
    for k in want:
        assert set(got[k]) == set(want[k])
        for name in want[k]:
            np.testing.assert_array_equal(got[k][name], want[k][name], err_msg=str(k))
    for k in partial:  # what was stored before the interrupt is what the rerun kept
        for name in partial[k]:
            np.testing.assert_array_equal(partial[k][name], got[k][name], err_msg=str(k))
    assert Store(store, create=False).stage_sets()
