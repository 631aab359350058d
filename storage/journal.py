"""The run journal: a record per run, written when it starts and kept current while it works.

``journal/<run_id>.json`` holds the run's experiment, its whole resolved plan (every stage
key of the experiment, not only the stages the run executes), its status and a heartbeat
refreshed every TTL/4 by a background thread, and per-stage progress. Status goes
``running`` -> ``complete`` | ``incomplete`` | ``failed`` | ``interrupted``; a ``running`` run
whose heartbeat is older than its TTL is ``dead`` (killed, or its machine gone). ``ovseg runs``
lists journals; ``ovseg cache gc`` keeps every key in the plan of a live run and of the newest
run of each experiment. The file carries ``RESERVE`` bytes of trailing spaces (valid JSON), so
that on a full disk the final write still fits in place and the run does not look ``running``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.fsio import Backend, is_temporary

log = logging.getLogger("ovseg.storage")

JOURNAL = "journal"
FINAL = ("complete", "incomplete", "failed", "interrupted")
RESERVE = 4096  # bytes of padding kept in the journal file: its final write fits there when the disk is full


@dataclass(frozen=True)
class RunEntry:
    """One journal as read back."""

    run_id: str
    data: Mapping[str, Any]

    @property
    def status(self) -> str:
        """The recorded status, or ``dead`` for a ``running`` run with a stale heartbeat."""
        st = str(self.data.get("status", "?"))
        if st == "running" and time.time() - float(self.data.get("heartbeat", 0)) > float(self.data.get("ttl", 120)):
            return "dead"
        return st

    @property
    def live(self) -> bool:
        return self.status == "running"

    @property
    def experiment(self) -> str:
        return str(self.data.get("experiment", "?"))

    @property
    def started(self) -> float:
        return float(self.data.get("started", 0))

    def plan_keys(self) -> set[tuple[str, str]]:
        return {(p["stage"], p["key"]) for p in self.data.get("plan", [])}


class RunJournal:
    """The journal of the current run (one writer: the process that runs the flow).

    Args:
        backend: the store's backend.
        run_id: the run id (sortable: UTC start time first).
        content: experiment name, file, store, plan rows ``{dataset, stage, key}`` ...
        ttl: heartbeat TTL in seconds.
    """

    def __init__(self, backend: Backend, run_id: str, content: Mapping[str, Any], ttl: float):
        self.backend = backend
        self.run_id = run_id
        self.path = backend.path(JOURNAL, f"{run_id}.json")
        self.ttl = float(ttl)
        now = time.time()
        self._data: dict[str, Any] = {"format": 1, "run_id": run_id, "status": "running", "started": now,
                                      "heartbeat": now, "ended": None, "ttl": self.ttl, "host": socket.gethostname(),
                                      "pid": os.getpid(), "argv": list(sys.argv), "stages": {}, "exit_code": None,
                                      **dict(content)}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RunJournal":
        self._write()
        self._thread = threading.Thread(target=self._beat, name="ovseg-run-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stage(self, ident: str, **progress: Any) -> None:
        """Record progress of one stage node (``dataset/stage/key``)."""
        with self._lock:
            self._data["stages"][ident] = {**self._data["stages"].get(ident, {}), **progress}
        self._write()

    def finish(self, status: str, exit_code: int, **extra: Any) -> None:
        if status not in FINAL:
            raise ValueError(f"final status must be one of {FINAL}, got {status!r}")
        self._stop.set()
        with self._lock:
            self._data.update(status=status, exit_code=exit_code, ended=time.time(), heartbeat=time.time(), **extra)
        if self._thread is not None:
            self._thread.join()  # no heartbeat write after the final one
        self._write(final=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self._write()

    def _write(self, final: bool = False) -> None:
        with self._lock:
            self._data["heartbeat"] = time.time()
            data = json.dumps(self._data, default=str).encode()
            compact = json.dumps({**self._data, "stages": {}, "stages_lost": True}, default=str).encode()
        try:
            # trailing spaces (valid JSON) reserve room for the final write on a full disk
            self.backend.put_atomic(self.path, data + b" " * RESERVE)
        except OSError as e:  # a full disk must not stop the run
            if final and (self.backend.overwrite_in_place(self.path, data)
                          or self.backend.overwrite_in_place(self.path, compact)):
                log.warning("the run journal %s was finished in place: %s", self.path, e)
                return
            log.warning("cannot update the run journal %s: %s", self.path, e)


def read_journals(backend: Backend) -> tuple[list[RunEntry], list[tuple[str, str]]]:
    """Every journal of the store (sorted by run id) and the unreadable ones as ``(path, error)``."""
    out, damaged = [], []
    folder = backend.path(JOURNAL)
    for name in sorted(backend.listdir(folder)):
        if not name.endswith(".json") or is_temporary(name):
            continue
        path = f"{folder}/{name}"
        try:
            data = json.loads(backend.get(path))
            if not isinstance(data, dict) or "run_id" not in data:
                raise ValueError("not a run journal")
            out.append(RunEntry(str(data["run_id"]), data))
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001
            damaged.append((path, f"{type(e).__name__}: {e}"))
    return out, damaged


def newest_per_experiment(entries: Sequence[RunEntry]) -> dict[str, RunEntry]:
    newest: dict[str, RunEntry] = {}
    for e in entries:
        cur = newest.get(e.experiment)
        if cur is None or (e.started, e.run_id) > (cur.started, cur.run_id):
            newest[e.experiment] = e
    return newest


@dataclass
class KeepSet:
    """What ``gc`` must keep, and why."""

    keys: set[tuple[str, str]] = field(default_factory=set)
    live_runs: list[RunEntry] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, keys: set[tuple[str, str]], why: str) -> None:
        self.keys |= keys
        self.reasons[why] = self.reasons.get(why, 0) + len(keys)
