"""The streaming batch executor: load -> compute -> write, overlapped, for one batch of items.

For a batch of items of one stage output set (one Prefect task):

1. the items (those the flow found incomplete) are claimed with ONE lease (items another live
   process holds are ``busy``: the flow waits for them or reports them); completion is read
   again after the claim, so an item another run completed and released in between is
   ``cached``, never computed twice (a run writes an item's record before it releases the item);
2. a loader thread decodes each image once and reads the upstream outputs, ``prefetch`` items
   ahead (pinned memory on CUDA);
3. the calling thread runs the stage's pure compute, on groups of items whose windows fill
   ``window_batch`` for stages with windows (one call per group; each network forward holds the
   windows of one image only, ``tasks.common.run_windows``, so an item's outputs do not depend on
   its group); a group that fails is retried item by item, so one bad image fails alone;
4. a writer thread appends each computed item to the batch's pack through a bounded queue;
   the pack and then its completion record are written when the batch ends. A writer error
   fails the items it concerns, never the run.

``run_batch`` returns once the pack and its record are in place and the lease is released.
``start_batch`` returns as soon as every computed item has been handed to the pack (and, in a
fused chain, kept in the chain's memory): the writer thread then writes the pack and its record
(their fsyncs are waits, not compute) and releases the lease while the caller goes on with the
next stage of the chain; ``PendingBatch.result()`` waits for that. A ``gate`` given to
``start_batch`` runs in the writer before the pack is written and names items that must not be
stored (a fused chain: items whose input's pack failed to be stored after they were computed).

A backbone that cannot be loaded fails the whole batch with ``BatchResult.fatal`` set, so the
flow stops submitting that stage instead of failing once per image.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from storage.leases import LeaseError
from storage.paths import is_remote
from storage.store import MissingOutputError
from tasks.runtime import (
    BackboneLoadError,
    BatchResult,
    ItemResult,
    StageContext,
    software_versions,
)
from tasks.stages import STAGES
from tasks.streams import END, Direct, Grouper, Inline, io_threads, wait_through_interrupt

log = logging.getLogger("ovseg.tasks")



class UpstreamMissingError(RuntimeError):
    """An input of the item is not (or no longer) complete; the item is retried by a later run."""


Gate = Callable[[], Mapping[str, ItemResult]]  # -> items of the batch not to store, with their results


class PendingBatch:
    """A batch whose items are computed and handed to its writer; the pack, its record and the lease release may
    still be under way (``result()`` waits for them)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]):
        self.rows = list(rows)
        self.results: dict[str, ItemResult] = {}
        self.writer: threading.Event | None = None  # set when the batch's writer thread has ended
        self.release: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._release_lock = threading.Lock()

    def wait(self, interrupted: bool = False) -> None:
        """Wait for the pack and its record, then release the lease (once; safe from any thread). ``interrupted``:
        the caller handles an interrupt already (``wait_through_interrupt``)."""
        with self._lock:
            if self.writer is not None:
                wait_through_interrupt(self.writer, interrupted)
                self.writer = None
        self.release_lease()

    def release_lease(self) -> None:
        """Release the lease now, once (the writer does so as soon as the pack and its record are stored, so that a
        fused chain does not hold a node's items, already complete, until its last node is written)."""
        with self._release_lock:
            release, self.release = self.release, None
        if release is not None:
            release()

    def result(self) -> BatchResult:
        self.wait()
        fatal = next((r.error for r in self.results.values() if r.error_type == BackboneLoadError.__name__), "")
        return BatchResult([self.results[str(r["image_id"])] for r in self.rows], fatal)


def run_batch(ctx: StageContext, rows: Sequence[Mapping[str, Any]], stage: Any = None) -> BatchResult:
    """Compute and store every item of ``rows`` that is not complete yet (see the module docstring).

    ``stage`` defaults to the stage table's entry for ``ctx.stage``.
    """
    return start_batch(ctx, rows, stage).result()


def start_batch(ctx: StageContext, rows: Sequence[Mapping[str, Any]], stage: Any = None, gate: Gate | None = None,
                prepare: Callable[[list[Mapping[str, Any]]], None] | None = None) -> PendingBatch:
    """``run_batch`` up to the point where every computed item is in its writer's hands (see the module docstring).

    ``prepare(rows)``, when given, runs under the lease on the rows this batch computes (claimed, not complete),
    before their models load: a fused chain computes there the inputs it does not store (``tasks.chain``)."""
    stage = stage or STAGES[ctx.stage]
    pending = PendingBatch(rows)
    if rows:  # the flow sends only items it found incomplete: no listing of the stage's records per batch
        _run_claimed(ctx, stage, pending, gate, prepare)
    return pending


def _run_claimed(ctx: StageContext, stage, pending: PendingBatch, gate: Gate | None,
                 prepare: Callable[[list[Mapping[str, Any]]], None] | None = None) -> None:
    store = ctx.store()
    rows, results = pending.rows, pending.results
    try:
        claim = store.leases.claim(ctx.stage, ctx.key, [str(r["image_id"]) for r in rows], ctx.settings.run_id)
    except (LeaseError, OSError) as e:
        for r in rows:
            results[str(r["image_id"])] = ItemResult(str(r["image_id"]), "failed", 0.0, "LeaseError", str(e))
        return
    pending.release = lambda: store.leases.release(claim)
    try:
        for iid, info in claim.busy.items():
            results[iid] = ItemResult(iid, "busy", error=f"being computed by {info.describe()}")
        mine = set(claim.mine)
        if mine:  # another run may have completed (and released) an item since the flow found it incomplete
            state = store.state(ctx.stage, ctx.key)
            for iid in sorted(i for i in mine if state.pack_of(i) is not None):
                results[iid] = ItemResult(iid, "cached")
                mine.discard(iid)
        mine_rows = [r for r in rows if str(r["image_id"]) in mine]
        if not mine_rows:
            return
        if prepare is not None:
            prepare(mine_rows)
        try:
            models = stage.models(ctx)
        except Exception as e:  # noqa: BLE001 - a backbone or model that cannot be built fails the stage once
            err = e if isinstance(e, BackboneLoadError) else BackboneLoadError(f"{type(e).__name__}: {e}")
            for r in mine_rows:
                results[str(r["image_id"])] = ItemResult(str(r["image_id"]), "failed", 0.0, BackboneLoadError.__name__,
                                                         str(err))
            return
        _pipeline(ctx, stage, models, mine_rows, pending, gate)
    finally:
        if pending.writer is None:  # nothing left to write in the background: release the lease now
            pending.wait()


def _fail(results: dict[str, ItemResult], iid: str, e: BaseException, seconds: float = 0.0) -> None:
    kind = "SkippedUpstream" if isinstance(e, (UpstreamMissingError, MissingOutputError)) else type(e).__name__
    results[iid] = ItemResult(iid, "failed", seconds, kind, str(e))
    log.warning("%s failed on %s: %s: %s", kind, iid, type(e).__name__, e)
    log.debug("%s", "".join(traceback.format_exception(e)))


def _pipeline(ctx: StageContext, stage, models: Any, rows: list[Mapping[str, Any]], pending: PendingBatch,
              gate: Gate | None) -> None:
    """Load, compute and hand to the writer; on return the writer holds every item and may still be committing
    (``pending.writer``), unless the compute raised (then the writer is waited for before the error propagates)."""
    settings, results = ctx.settings, pending.results
    handed = threading.Event()  # the writer has added every item to the pack (and to the chain's memory)
    loaded: queue.Queue = queue.Queue(maxsize=max(1, settings.prefetch))
    to_write: queue.Queue = queue.Queue(maxsize=max(1, settings.write_queue))
    pin = ctx.device.startswith("cuda")  # the device this worker is bound to (``device: auto`` included)

    threads = io_threads(settings.io_threads, ctx.device, is_remote(settings.store_location))

    def load_one(row: Mapping[str, Any]) -> tuple:
        return _load_one(ctx, stage, row, pin)

    stop = threading.Event()  # the compute ended early (an interrupt): the loader loads no more

    def load_all() -> None:
        for row in rows:
            if stop.is_set():
                break
            loaded.put(load_one(row))
        loaded.put(END)

    pack: dict[str, Any] = {}  # session, open_error: the batch's pack, opened by whoever adds its first item
    added: list[str] = []
    declared = stage.array_names(ctx.params)

    def add_one(got: tuple) -> None:
        if not pack:
            try:
                pack["session"], pack["open_error"] = ctx.store().open_pack(ctx.node.stage_key, {
                    "software": software_versions(), "random_weights": ctx.node.random_weights,
                    "run_id": settings.run_id, "dataset": ctx.dataset}), None
            except Exception as e:  # noqa: BLE001
                pack["session"], pack["open_error"] = None, e
        iid, arrays, attrs, seconds = got
        if pack["open_error"] is not None:
            _fail(results, iid, pack["open_error"], seconds)
            return
        try:
            check_declared(stage, iid, arrays, declared)
            pack["session"].add(iid, arrays, {**attrs, "seconds": seconds, "random_weights": ctx.node.random_weights})
            added.append(iid)
            if ctx.memory is not None:  # a fused chain: the next stage reads what was stored from memory
                ctx.memory.keep(ctx.node.ident, iid, arrays)
            results[iid] = ItemResult(iid, "done", seconds)
        except Exception as e:  # noqa: BLE001 - a writer error fails that item, never the run
            _fail(results, iid, e, seconds)

    def write_all() -> None:
        try:
            try:
                while (got := to_write.get()) is not END:
                    add_one(got)  # the compute thread's own adds (io_threads off) come here as END only
            finally:
                handed.set()  # even after an unexpected error: the compute thread waits for this
            if pack.get("session") is not None:
                commit(pack["session"], added)
            pending.release_lease()  # the record is written (or the pack aborted): other runs need not wait longer
        finally:
            finished.set()

    def commit(session, added: list[str]) -> None:
        try:
            held = dict(gate()) if gate is not None else {}
            if any(iid in held for iid in added):  # an input of these items was not stored: none of the pack is
                raise InputNotStoredError(held)
            session.commit()
        except Exception as e:  # noqa: BLE001 - the pack could not be stored: its items are not done
            session.abort()
            for iid in added:
                if isinstance(e, InputNotStoredError) and iid in e.held:
                    results[iid] = e.held[iid]
                else:
                    _fail(results, iid, e, results[iid].seconds)
                if ctx.memory is not None:
                    ctx.memory.drop(ctx.node.ident, iid)

    source: Any = loaded if threads else Inline(load_one, rows)
    sink: Any = to_write if threads else Direct(add_one, to_write)
    loader = threading.Thread(target=load_all, name=f"ovseg-load-{ctx.stage}", daemon=True) if threads else None
    finished = threading.Event()  # the writer thread has ended (an Event: Python 3.11's interrupted join is unsafe)
    writer = threading.Thread(target=write_all, name=f"ovseg-write-{ctx.stage}", daemon=True)
    if loader is not None:
        loader.start()
    writer.start()
    computed, error = False, None
    try:
        _compute_all(ctx, stage, models, source, sink, results)
        computed = True
    except BaseException as e:
        error = e
        raise
    finally:
        to_write.put(END)
        if loader is not None:
            stop.set()
            while loader.is_alive():  # take what it loaded, so that a full queue does not block it
                try:
                    loaded.get(timeout=0.05)
                except queue.Empty:
                    pass
        pending.writer = finished  # once every item is handed the caller waits for it (``PendingBatch.wait``)
        if not computed:  # the error propagates once the writer has stored what it was handed
            pending.wait(interrupted=isinstance(error, KeyboardInterrupt))
        else:
            try:
                handed.wait()
            except KeyboardInterrupt:
                pending.wait(interrupted=True)
                raise


def _load_one(ctx: StageContext, stage, row: Mapping[str, Any], pin: bool = False) -> tuple:
    """``(row, input, error, seconds)`` of one item: its stage's ``load`` (pinned for CUDA); an error fails one item."""
    t0 = time.perf_counter()
    try:
        inp = stage.load(ctx, row)
        return (row, _pin(inp) if pin else inp, None, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one unreadable input fails one item
        log.debug("load of %s failed", row["image_id"])
        return (row, None, e, time.perf_counter() - t0)


def check_declared(stage, iid: str, arrays: Mapping[str, Any], declared: Sequence[str]) -> None:
    """Raises ``ValueError`` when the arrays computed for ``iid`` are not the ones the stage declares."""
    if sorted(arrays) != sorted(declared):
        raise ValueError(f"stage {stage.name!r} computed the arrays {sorted(arrays)} for {iid} but declares "
                         f"{sorted(declared)} (Stage.arrays in tasks/stages.py); nothing of it is stored")


def compute_rows(ctx: StageContext, stage, models: Any, rows: Sequence[Mapping[str, Any]], sink: Any,
                 results: dict[str, ItemResult]) -> None:
    """Load and compute ``rows`` in the calling thread, in compute groups, handing each computed item
    ``(id, arrays, attrs, seconds)`` to ``sink.put``; a load or compute error fails its item in ``results``
    (a group that fails is retried item by item). ``tasks.chain.compute_in_memory`` uses it."""
    pin = ctx.device.startswith("cuda")
    _compute_all(ctx, stage, models, Inline(lambda row: _load_one(ctx, stage, row, pin), rows), sink, results)


class InputNotStoredError(UpstreamMissingError):
    """A pack not stored because the gate held some of its items (``held``: their results): an input of theirs,
    computed in the same chain batch, failed to be stored after they were computed."""

    def __init__(self, held: Mapping[str, ItemResult]):
        first = next(iter(held.values()))
        super().__init__(f"not stored: items of its batch lost an input ({first.error})")
        self.held = held


def _compute_all(ctx: StageContext, stage, models: Any, loaded: queue.Queue, to_write: queue.Queue,
                 results: dict[str, ItemResult]) -> None:
    grouper = Grouper(stage, ctx.settings.window_batch)
    while (got := loaded.get()) is not END:
        row, inp, err, _ = got
        if err is not None:
            _fail(results, str(row["image_id"]), err)
        elif (group := grouper.add(row, inp)) is not None:
            _compute_group(ctx, stage, models, group, to_write, results)
    if (group := grouper.flush()) is not None:
        _compute_group(ctx, stage, models, group, to_write, results)


def _compute_group(ctx: StageContext, stage, models: Any, group: list[tuple[Mapping[str, Any], Any]],
                   to_write: queue.Queue, results: dict[str, ItemResult]) -> None:
    t0 = time.perf_counter()
    try:
        outputs = stage.compute(ctx, models, [inp for _, inp in group])
    except Exception as e:  # noqa: BLE001
        if len(group) > 1:  # isolate the bad item
            for one in group:
                _compute_group(ctx, stage, models, [one], to_write, results)
            return
        _fail(results, str(group[0][0]["image_id"]), e, time.perf_counter() - t0)
        return
    seconds = (time.perf_counter() - t0) / len(group)
    for (row, _), (arrays, attrs) in zip(group, outputs):
        to_write.put((str(row["image_id"]), arrays, attrs, seconds))


def _pin(x: Any) -> Any:
    """Pinned copies of the tensors of a loaded input (a dict), for non-blocking copies to the GPU."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, dict):
        return {k: _pin(v) for k, v in x.items()}
    return x
