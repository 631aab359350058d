"""Real ``ovseg run`` processes on one store (local folder or S3 URL), shared by the concurrency and crash tests:
start them, kill one during a write, and count how many completion records list each item."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from storage.records import RECORDS
from storage.store import Store
from tests.flows.conftest import tiny_experiment

REPO = Path(__file__).resolve().parents[2]


def experiment(store: str | Path, images: int = 8, batch_size: int = 1, ttl: float = 6.0):
    """The tiny experiment on ``images`` VOC sample images, one item per batch (one claim per item: the most
    chances for two runs to meet on an item)."""
    base = tiny_experiment(store)
    return tiny_experiment(store, datasets=[{**base.datasets[0].model_dump(), "limit": images}],
                           runner={"kind": "local", "workers": 1, "batch_size": batch_size, "lease_ttl": ttl})


def write_yaml(exp, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


def spawn(exp_file: Path, *extra: str, kill_point: str | None = None) -> subprocess.Popen:
    """``ovseg run --no-prefect`` in a new process (its own process group); the AWS variables of this process
    (the local S3 endpoint) are inherited. ``kill_point``: the process SIGKILLs itself there
    (``tests.flows.kill_point``)."""
    return spawn_cli("run", str(exp_file), "-q", "--no-prefect", *extra, kill_point=kill_point)


def spawn_cli(*args: str, kill_point: str | None = None) -> subprocess.Popen:
    """``ovseg ARGS`` in a new process (its own process group), as ``spawn``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    entry = ["-m", "tests.flows.kill_point", kill_point] if kill_point else ["-m", "flows.cli"]
    return subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out = proc.communicate(timeout=timeout)[0].decode()
    return proc.returncode, out


def records_per_item(location: str | Path) -> Counter:
    """How many completion records list each ``(stage, key, item)`` of the store (one per computation)."""
    store = Store(location, create=False)
    counts: Counter = Counter()
    for stage, key in store.stage_sets():
        folder = f"{store.stage_dir(stage, key)}/{RECORDS}"
        for name in store.backend.listdir(folder):
            if name.endswith(".json") and not name.startswith("."):
                for item in json.loads(store.backend.get(f"{folder}/{name}"))["items"]:
                    counts[(stage, key, item)] += 1
    return counts


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], deadline: float = 300) -> None:
    """SIGKILL ``proc`` (its whole group) as soon as ``ready()`` (polled every 50 ms; a ``FileNotFoundError``
    there means "not yet": the store is not created yet); fails when the run ends or ``deadline`` passes first."""
    end = time.time() + deadline
    try:
        while time.time() < end and proc.poll() is None:
            try:
                if ready():
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    out = proc.stdout.read().decode() if proc.stdout else ""
    raise AssertionError(f"the run finished or stalled before the kill point:\n{out[-2000:]}")


def has_complete_item(location: str | Path, stage: str) -> Callable[[], bool]:
    """A ``kill_when`` condition: ``stage`` has one complete item in the store at ``location`` (the run is then
    writing)."""
    opened: list[Store] = []  # opened once it exists

    def ready() -> bool:
        if not opened:
            opened.append(Store(location, create=False))
        return any(len(opened[0].complete_items(s, k)) for s, k in opened[0].stage_sets() if s == stage)

    return ready


def kill_during_write(proc: subprocess.Popen, location: str | Path, stage: str, deadline: float = 300) -> None:
    """SIGKILL ``proc`` (its whole group) as soon as ``stage`` has one complete item: the run is then writing."""
    kill_when(proc, has_complete_item(location, stage), deadline)
