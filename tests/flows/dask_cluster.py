"""A real multi-process Dask deployment for tests: ``dask scheduler`` and ``dask worker`` subprocesses.

The scheduler and each worker are started the way an operator starts them (the ``dask`` CLI
modules, a scheduler file for the address), each in its own process group so a worker can be
SIGKILLed with its nanny, as when a machine dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(REPO)
    env["PREFECT_HOME"] = str(home)  # the workers get the API address from each task's context
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that crashes in native code leaves its Python stack in its log
    return env


class DaskDeployment:
    """A scheduler on a free port and named workers (one thread each), all separate processes.

    Args:
        workdir: folder for the scheduler file, the processes' logs and local directories.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = _env(workdir / "prefect-home")
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.address = ""
        self._client = None

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        out = open(self.workdir / f"{log_name}.log", "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    def start_scheduler(self, timeout: float = 60.0) -> str:
        """Start ``dask scheduler --port 0`` and return its address (read from the scheduler file)."""
        path = self.workdir / "scheduler.json"
        self.scheduler = self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(path)], "scheduler")
        deadline = time.time() + timeout
        while not path.exists():
            if self.scheduler.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler')[-2000:]}")
            time.sleep(0.1)
        self.address = json.loads(path.read_text())["address"]
        return self.address

    def add_worker(self, name: str) -> subprocess.Popen:
        """Start ``dask worker ADDRESS --name NAME --nthreads 1`` (with its nanny, as operators run it)."""
        proc = self._spawn(["distributed.cli.dask_worker", self.address, "--name", name, "--nthreads", "1",
                            "--nworkers", "1", "--no-dashboard", "--local-directory", str(self.workdir / name),
                            "--death-timeout", "60"], name)
        self.workers[name] = proc
        return proc

    def client(self):
        """A plain ``distributed.Client`` on the scheduler (the test's view of the cluster)."""
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, timeout=60, set_as_default=False)
        return self._client

    def wait_for_workers(self, names: set[str], timeout: float = 120.0) -> None:
        """Block until every named worker is registered with the scheduler."""
        deadline = time.time() + timeout
        while not names <= self.worker_names():
            for name in names:
                if self.workers[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited: {self.log(name)[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"workers {sorted(names - self.worker_names())} did not join in {timeout} s")
            time.sleep(0.2)

    def worker_names(self) -> set[str]:
        return {str(w["name"]) for w in self.client().scheduler_info(n_workers=-1)["workers"].values()}

    def worker_pids(self) -> dict[str, int]:
        """``{worker name: pid}`` of the worker processes (the nannies' children)."""
        info = self.client().scheduler_info(n_workers=-1)["workers"]
        pids = self.client().run(os.getpid)
        return {str(info[addr]["name"]): pid for addr, pid in pids.items() if addr in info}

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its nanny (the whole process group): nothing restarts it."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_workers(self, timeout: float = 60.0) -> None:
        """Stop every worker started here and wait until the scheduler has removed them."""
        _stop(list(self.workers.values()))
        names = set(self.workers)
        self.workers.clear()
        deadline = time.time() + timeout
        while self.scheduler is not None and names & self.worker_names() and time.time() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        _stop(list(self.workers.values()))
        self.workers.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        _stop([self.scheduler] if self.scheduler is not None else [])


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is still alive after 20 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --------------------------------------------------------------------------- run on the workers
def torch_threads() -> int:
    """torch's intra-op thread count in this process."""
    import torch

    return torch.get_num_threads()


def loaded_backbones() -> list[tuple[str, str]]:
    """``(backbone name, device)`` of every backbone this process's model cache holds."""
    from tasks.runtime import _models

    return sorted((ident[0], ident[1]) for ident in _models)


def resolved_device(requested: str) -> str:
    """What ``StageContext.device`` gives in this process for ``device: requested`` (asked twice)."""
    from tasks.runtime import worker_device

    first = worker_device(requested)
    assert worker_device(requested) == first
    return first


def set_allowed_failures(n: int, dask_scheduler=None) -> int:
    """Set the scheduler's ``allowed-failures`` (run on the scheduler); returns the previous value."""
    before = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return before
