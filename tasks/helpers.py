"""Reused helper threads for the executor's loader and writer.

Every batch of every stage runs a loader and a writer beside its compute (``tasks.executor``): a
fused chain of 8 nodes over 1000 images in batches of 8 started 2,000 threads, and each start
waits until the new thread has been scheduled (milliseconds on a loaded machine). A finished
helper waits for the next job instead; a job runs with the thread named after it. The pool grows
to the most jobs ever running at once and never refuses a job (a job may wait on another job: a
bounded pool could deadlock). A forked child starts with an empty pool (threads do not survive a
fork).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("ovseg.tasks")

_lock = threading.Lock()
_idle: list["_Helper"] = []


class Job:
    """One function run on a helper thread; ``join()`` waits for it to return."""

    def __init__(self, fn: Callable[[], None], name: str):
        self.fn, self.name = fn, name
        self._done = threading.Event()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def _run(self) -> None:
        thread = threading.current_thread()
        thread.name = self.name
        try:
            self.fn()
        except BaseException:  # noqa: BLE001 - as an uncaught error in a thread: logged, the thread goes on
            log.exception("helper job %s failed", self.name)
        finally:
            thread.name = "ovseg-helper-idle"
            self._done.set()


class _Helper:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="ovseg-helper-idle", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            job._run()
            with _lock:
                _idle.append(self)


def start(fn: Callable[[], None], name: str) -> Job:
    """Run ``fn`` on an idle helper thread (a new one when none is idle); returns its ``Job``."""
    with _lock:
        helper = _idle.pop() if _idle else None
    if helper is None:
        helper = _Helper()
    job = Job(fn, name)
    helper.jobs.put(job)
    return job


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _idle.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
