"""How a batch's items move between its steps (``tasks.executor``): compute groups, the stand-ins for the loader's
and the writer's queues when items load and are added in the compute thread, whether to use those threads at all,
and waiting for a batch's writer through an interrupt."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("ovseg.tasks")

END = object()  # the end of a batch's items, in the loader's and the writer's queues


def io_threads(setting: str, device: str, remote_store: bool = False) -> bool:
    """Whether a batch loads and adds its items on a loader and a writer thread beside the compute (``on``; ``auto``
    on a CUDA device or with an object store, whose reads are network waits worth overlapping) or in the compute
    thread itself (``off``; ``auto`` on a CPU with a local store). See ``RunSettings.io_threads``."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"io_threads must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and (device.startswith("cuda") or remote_store))


class InterruptedAgain(KeyboardInterrupt):
    """An interrupt while the writes under way were being finished after an earlier one: they are left as they are
    (a temporary file for ``ovseg cache gc``, a lease for its TTL)."""


_FINISHING = ("interrupted: finishing the write of the batch under way (interrupt again to stop now, leaving its "
              "temporary files and lease for `ovseg cache gc` and the lease TTL)")


def wait_through_interrupt(ended: threading.Event, interrupted: bool = False) -> None:
    """Wait for a batch's writer thread to end (``ended`` set); an interrupt (Ctrl-C) meanwhile is raised once it has.

    The writer writes the pack and its record, then releases the lease; the process ending in the middle (the main
    thread leaving the wait, the daemon writer stopped at exit) would leave a temporary file or a lease behind. A
    second interrupt while waiting leaves at once (``InterruptedAgain``); ``interrupted``: the caller is handling one
    already, so the next one leaves at once. An Event, not ``Thread.join``: in Python 3.11 an interrupted join marks
    a running thread as ended (its ``_wait_for_tstate_lock`` releases the lock the thread still holds)."""
    held: KeyboardInterrupt | None = None
    if interrupted and not ended.is_set():
        log.warning("%s", _FINISHING)
    while True:
        try:
            ended.wait()
            break
        except KeyboardInterrupt as e:
            if interrupted or held is not None:
                raise InterruptedAgain("interrupted again: the batch's write under way was left unfinished") from e
            held = e
            log.warning("%s", _FINISHING)
    if held is not None:
        raise held


class Inline:
    """The loader's queue when items load in the compute thread: ``get`` loads the next item (then ``END``)."""

    def __init__(self, load_one: Callable[[Mapping[str, Any]], tuple], rows: Sequence[Mapping[str, Any]]):
        self._load, self._rows = load_one, iter(rows)

    def get(self) -> Any:
        row = next(self._rows, None)
        return END if row is None else self._load(row)


class Direct:
    """The writer's queue when items are added in the compute thread: ``put`` adds an item to the pack now; only
    ``END`` reaches the writer thread, which then commits the pack (its fsyncs still overlap the next compute)."""

    def __init__(self, add_one: Callable[[tuple], None], writer_queue: queue.Queue):
        self._add, self._queue = add_one, writer_queue

    def put(self, got: Any) -> None:
        if got is END:
            self._queue.put(END)
        else:
            self._add(got)


class Grouper:
    """Forms compute groups: items accumulate until their windows reach ``window_batch``.

    Stages without a window count (``Stage.windows`` None) compute one item at a time. A group
    is one ``compute`` call; its forwards never mix images (``tasks.common.run_windows``). The
    benchmark forms its groups with the same class, so it times exactly the pipeline's calls.
    """

    def __init__(self, stage, window_batch: int):
        self.stage = stage
        self.budget = max(1, int(window_batch))
        self.pending: list[tuple[Mapping[str, Any], Any]] = []
        self.windows = 0

    def add(self, row: Mapping[str, Any], inp: Any) -> list[tuple[Mapping[str, Any], Any]] | None:
        """Add one loaded item; returns a full group, or None."""
        self.pending.append((row, inp))
        self.windows += self.stage.windows(inp) if self.stage.windows else self.budget
        return self.flush() if self.windows >= self.budget else None

    def flush(self) -> list[tuple[Mapping[str, Any], Any]] | None:
        group, self.pending, self.windows = self.pending, [], 0
        return group or None
