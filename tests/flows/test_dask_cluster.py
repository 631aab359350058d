"""Scaling out: one GPU per worker (device binding), and ``runner: {kind: dask, address: ...}`` against a
real cluster: a ``dask scheduler`` and ``dask worker`` processes started here, as an operator starts them.

Cluster runs must give outputs bit-identical to a local run with the same torch thread count
(the workers' nannies set ``OMP_NUM_THREADS=1``, so the local reference runs with one thread),
also when a worker is SIGKILLed while it computes a batch; a worker that joins after the run
started must be given batches.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from flows.pipeline import run_experiment
from storage.fsio import is_temporary
from storage.maintenance import gc
from storage.store import Store
from tasks.runtime import RunSettings, StageContext, StageNode, bind_device, worker_device, worker_index
from tests.flows.conftest import assert_same_outputs, store_snapshot, tiny_experiment
from tests.flows.dask_cluster import (REPO, DaskDeployment, loaded_backbones, resolved_device, set_allowed_failures,
                                      torch_threads)

pytestmark = pytest.mark.filterwarnings("ignore")


def on_cluster(test):
    """Slow (CI runs slow tests too) and needing a Dask cluster of subprocesses."""
    return pytest.mark.slow(pytest.mark.dask_cluster(test))

LEASE_TTL = 8.0  # seconds before a dead worker's claim expires (the default, 120, would make the tests wait)


# --------------------------------------------------------------------------- device binding (no cluster)
@pytest.mark.parametrize("requested, gpus, index, expected", [
    ("auto", 0, None, "cpu"),  # no GPU: CPU fallback
    ("auto", 0, 3, "cpu"),
    ("auto", 1, None, "cuda:0"),
    ("auto", 4, 0, "cuda:0"),  # dask worker --name gpu --nworkers 4: gpu-0 .. gpu-3 on GPUs 0 .. 3
    ("auto", 4, 3, "cuda:3"),
    ("auto", 4, 6, "cuda:2"),  # more workers than GPUs: round-robin (6 mod 4)
    ("cuda", 2, 1, "cuda:1"),
    ("cuda", 2, None, "cuda:0"),  # not in a named worker: the first visible GPU
    ("cuda", 1, 3, "cuda:0"),  # CUDA_VISIBLE_DEVICES=3 for worker 3: its one visible GPU
    ("cuda:1", 4, 3, "cuda:1"),  # an explicit device is kept
    ("cpu", 4, 2, "cpu"),
    ("mps", 0, 0, "mps"),
])
def test_bind_device_gives_each_worker_its_own_gpu(requested, gpus, index, expected):
    assert bind_device(requested, gpus, index) == expected


def test_bind_device_cuda_without_a_visible_gpu_is_an_error():
    with pytest.raises(ValueError, match="device: 'cuda' but no CUDA device is visible.*device: auto"):
        bind_device("cuda", 0, 0)


@pytest.mark.parametrize("name, expected", [
    (0, 0), (5, 5), ("gpu-3", 3), ("7", 7), ("node12-gpu-10", 10), ("tcp://10.0.0.5:40211", None), ("w", None),
    (-1, None), (True, None),
])
def test_worker_index_from_dask_worker_names(name, expected):
    assert worker_index(name) == expected


def test_device_auto_falls_back_to_cpu_and_says_so_once(caplog):
    """This machine has no GPU: ``auto`` runs on the CPU for real, with one warning per process."""
    import torch

    assert torch.cuda.device_count() == 0
    node = StageNode("text_embeddings", None, "1")
    ctx = StageContext(node, RunSettings("unused", device="auto"))
    worker_device.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="ovseg"):
            assert [ctx.device, ctx.device, ctx.device] == ["cpu"] * 3
    finally:
        worker_device.cache_clear()
    said = [r for r in caplog.records if "no CUDA device visible" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "running on cpu" in said[0].getMessage()


# --------------------------------------------------------------------------- a real cluster
def _exp(store: Path, **runner):
    """Three VOC sample images, tiny random models, one image per batch (many batches)."""
    return tiny_experiment(store, datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "limit": 3,
                                             "root": str(REPO / "examples" / "data" / "voc2012-sample")}],
                           runner={"kind": "local", "workers": 1, "batch_size": 1, "lease_ttl": LEASE_TTL, **runner})



def _stored(store: Path, path: Path, lease: dict) -> bool:
    """Whether every item of a lease file (``leases/<stage>/<key>/<id>.json``) has its completion record."""
    state = Store(store).state(path.parent.parent.name, path.parent.name)
    return all(state.pack_of(iid) is not None for iid in lease["items"])


def _lease_files(store: Path) -> dict[Path, dict]:
    """The lease files present now (``leases/<stage>/<key>/<id>.json``: owner host/pid/run, items).

    Temporaries (``.tmp-*``: a heartbeat's rewrite cut short by a kill) are not leases: the lease
    manager skips them and gc removes them.
    """
    out = {}
    for path in (store / "leases").glob("*/*/*.json"):
        if is_temporary(path.name):
            continue
        try:
            out[path] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue  # released (or being rewritten) while listing
    return out


def _task_workers(client, since: float) -> dict[str, int]:
    """``{worker name: batches it finished}`` (stage batches and fused chain batches) from the scheduler's task stream."""
    names = {addr: str(w["name"]) for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    out: Counter = Counter()
    for rec in client.get_task_stream(start=since):
        if str(rec["key"]).startswith(("stage_batch", "chain_batch")):
            out[names.get(rec["worker"], rec["worker"])] += 1
    return dict(out)


def _task_run_states(since: datetime) -> Counter:
    """States of the Prefect task runs that started after ``since``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)))
    return Counter(r.state_type.value for r in runs)


class _Run(threading.Thread):
    """``run_experiment`` in a thread, so the test can act on the cluster meanwhile."""

    def __init__(self, exp):
        super().__init__(daemon=True)
        self.exp, self.summary, self.error = exp, None, None

    def run(self) -> None:
        try:
            self.summary = run_experiment(self.exp, progress=False)
        except Exception as e:  # noqa: BLE001 - inspected by the test
            self.error = e


def _kill_mid_batch(cluster: DaskDeployment, store: Path, run: _Run, after_records: int) -> tuple[str, Path, bool]:
    """Once ``after_records`` batches are stored, SIGKILL a worker while it holds a lease (computes a batch).

    Returns the victim, its lease file and whether the lease's items were all stored when it died: a worker writes
    an item's record, then releases its lease, and a kill may fall in between (nobody then needs the lease; gc
    removes it). Leases whose items are not stored yet are picked first."""
    pids = cluster.worker_pids()
    while run.is_alive():
        if len(list(store.glob("stages/*/*/records/*.json"))) >= after_records:
            leases = sorted(_lease_files(store).items(), key=lambda pl: _stored(store, *pl))
            for path, lease in leases:
                victim = next((n for n, pid in pids.items() if pid == lease["owner"]["pid"]), None)
                if victim is not None:
                    cluster.kill_worker(victim)
                    if path.exists():  # the dead worker could not release it: it died mid-batch
                        return victim, path, _stored(store, path, lease)
        time.sleep(0.01)
    raise AssertionError(f"the run ended before a worker could be killed mid-batch: {run.error or run.summary}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The outputs of a local run with one torch thread, as on a Dask worker."""
    import torch

    store = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_experiment(_exp(store), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.status == "complete"
    return store_snapshot(store)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """One ``dask scheduler`` for the module; each test starts (and stops) its own workers."""
    pytest.importorskip("prefect_dask")
    deployment = DaskDeployment(tmp_path_factory.mktemp("dask"))
    try:
        deployment.start_scheduler()
        deployment.client().get_task_stream()  # starts the scheduler's task-stream plugin (see _task_workers)
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def cluster(scheduler):
    try:
        yield scheduler
    finally:
        scheduler.stop_workers()


def _start(cluster: DaskDeployment, *names: str) -> None:
    for name in names:
        cluster.add_worker(name)
    cluster.wait_for_workers(set(names))


@on_cluster
def test_cli_run_on_an_existing_cluster_matches_a_local_run(tmp_path, cluster, reference):
    """``ovseg run`` with ``runner.address``: same bytes as locally, both workers used, no Dask chatter."""
    from prefect.settings import PREFECT_API_URL

    _start(cluster, "cli-0", "cli-1")
    client = cluster.client()
    assert set(client.run(torch_threads).values()) == {1}  # as in the reference
    since = time.time()
    exp = _exp(tmp_path / "store", kind="dask", address=cluster.address, workers=2)
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    env = dict(cluster.env, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(exp_file), "-q"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert [line for line in output.splitlines() if "distributed" in line] == []  # Dask's INFO lines are quiet
    assert_same_outputs(store_snapshot(tmp_path / "store"), reference)
    ran = _task_workers(client, since)
    assert set(ran) == {"cli-0", "cli-1"}, ran
    crashed = [n for n in ran if "was killed by signal" in cluster.log(n)]  # restarted by its nanny
    # one task per vocabulary item (text_embeddings, stage by stage) and one fused chain batch per image (batch_size 1:
    # every other stage of the image in it); a batch runs again only when its worker process crashed (once seen:
    # SIGSEGV, under load)
    expected = sum(1 for stage, _, _ in reference if stage == "text_embeddings") + 3
    assert sum(ran.values()) == expected or (sum(ran.values()) > expected and crashed), (ran, expected, crashed)
    for held in client.run(loaded_backbones).values():  # each backbone loaded once per worker, on its device
        assert held and len({name for name, _ in held}) == len(held) and {dev for _, dev in held} == {"cpu"}


@on_cluster
def test_worker_killed_mid_batch_its_items_are_recomputed_elsewhere(tmp_path, cluster, reference):
    """SIGKILL a worker (and its nanny) while it computes a batch: Dask reruns the batch on the other
    worker, which finds the items held by the dead worker's lease; the flow waits for the lease
    to expire and resubmits them. The run ends complete, with the local run's bytes."""
    _start(cluster, "kill-0", "kill-1")
    since = datetime.now(timezone.utc)
    store = tmp_path / "store"
    run = _Run(_exp(store, kind="dask", address=cluster.address, workers=2))
    run.start()
    victim, lease, stored_at_kill = _kill_mid_batch(cluster, store, run, after_records=3)
    run.join(600)
    assert run.error is None, run.error
    assert run.summary.status == "complete", [(s.stage, s.failures) for s in run.summary.stages if s.failures]
    assert victim not in cluster.worker_names()
    assert_same_outputs(store_snapshot(store), reference)  # nothing half-written is read
    if not stored_at_kill:  # the dead lease was taken over, then released
        assert not lease.exists() and _lease_files(store) == {}
    else:  # killed between its record and its release: nothing needed it; gc (below) removes it
        assert set(_lease_files(store)) <= {lease}
    gc(Store(store), keep=Store(store).stage_sets(), stale_after=0)  # a heartbeat rewrite cut short by the kill
    assert not list((store / "leases").rglob("*.json"))
    assert "RUNNING" not in _task_run_states(since)  # the rerun batch took over the lost task run


@on_cluster
def test_batch_whose_every_worker_dies_fails_and_a_rerun_completes(tmp_path, cluster, reference):
    """With ``allowed-failures`` exhausted Dask gives the batch up (KilledWorker): its items fail with
    WorkerLostError, the run goes on and ends failed, the lost Prefect task run is marked Crashed (not left Running), and a rerun on the
    surviving worker completes with the local run's bytes."""
    from flows.runners import WorkerLostError

    _start(cluster, "lost-0", "lost-1")
    client = cluster.client()
    before = client.run_on_scheduler(set_allowed_failures, 0)
    try:
        since = datetime.now(timezone.utc)
        store = tmp_path / "store"
        exp = _exp(store, kind="dask", address=cluster.address, workers=2)
        run = _Run(exp)
        run.start()
        _kill_mid_batch(cluster, store, run, after_records=3)
        run.join(600)
    finally:
        client.run_on_scheduler(set_allowed_failures, before)
    assert run.error is None, run.error  # the lost batch's items fail; the run goes on and ends failed
    assert run.summary.status == "failed"
    lost = [f for s in run.summary.stages for f in s.failures if f[1] == WorkerLostError.__name__]
    assert lost and all("died" in f[2] for f in lost)
    again = run_experiment(exp, progress=False)
    assert again.status == "complete", [(s.stage, s.failures) for s in again.stages if s.failures]
    assert_same_outputs(store_snapshot(store), reference)
    states = _task_run_states(since)  # read after the rerun: batches of the first run still in flight have ended
    assert states["CRASHED"] == 1 and "RUNNING" not in states, states


@on_cluster
def test_worker_joining_mid_run_is_given_batches(tmp_path, cluster, reference, caplog):
    """A third worker started after the run began computes batches; each worker binds its device
    once (``auto`` falls back to cpu here and says so once per worker process)."""
    from prefect import flow

    from flows.runners import dask_runner_class, parallelism

    _start(cluster, "join-0", "join-1")
    client = cluster.client()
    since = time.time()
    store = tmp_path / "store"
    # stage by stage: many small batches, so some are still waiting when the third worker joins (fused, the three
    # images' chain batches are all submitted at once)
    run = _Run(_exp(store, kind="dask", address=cluster.address, workers=3, fuse=False))
    with caplog.at_level(logging.INFO, logger="ovseg"):
        run.start()
        while run.is_alive() and not list(store.glob("stages/*/*/records/*.json")):
            time.sleep(0.05)
        assert run.is_alive(), "the run ended before the third worker could join"
        cluster.add_worker("join-2")
        cluster.wait_for_workers({"join-2"})
        run.join(600)
    assert run.error is None, run.error
    assert run.summary.status == "complete"
    assert_same_outputs(store_snapshot(store), reference)
    ran = _task_workers(client, since)
    assert ran.get("join-2", 0) >= 1, ran
    announced = [r.getMessage() for r in caplog.records if r.name == "ovseg.runners"]
    assert len(announced) == 1 and cluster.address in announced[0] and "dashboard: http://" in announced[0]
    assert logging.getLogger("distributed").getEffectiveLevel() == logging.WARNING

    @flow(task_runner=dask_runner_class()(address=cluster.address))
    def batches_at_once() -> int:
        return parallelism(1)

    assert batches_at_once() == 3  # the late worker counts
    workers = {str(w["name"]): addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    for name, addr in workers.items():
        assert client.submit(resolved_device, "auto", workers=[addr], pure=False).result() == "cpu"
        assert cluster.log(name).count("no CUDA device visible to worker " + name) == 1, cluster.log(name)[-2000:]
