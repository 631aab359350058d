"""Running one stage output set's batches: submission with a bounded number in flight, outcomes,
waiting for items another live run holds, and which upstream items are available."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from flows.config import Experiment
from flows.runners import parallelism
from flows.summary import StageReport
from storage.store import Store
from tasks.runtime import BatchResult, ItemResult, StageContext, StageNode
from tasks.stages import STAGES, VOCAB_ITEM

log = logging.getLogger("ovseg.flows")


def available(store: Store, node: StageNode) -> set[str] | None:
    """Items whose output of ``node`` can be read: stored ones, and for a node that is not persisted
    those its own inputs allow computing on demand (None: every item).

    A stage output set this run already checked is not listed again (its state was refreshed when
    its stage ended)."""
    done = store.state(node.stage, node.key, refresh=not store.state_is_fresh(node.stage, node.key)).complete()
    if node.persist:
        return done
    out: set[str] | None = None
    for up in node.upstream.values():
        got = available(store, up)
        if STAGES[up.stage].per != "image":
            if got is not None and VOCAB_ITEM not in got:
                return done
            continue
        if got is not None:
            out = got if out is None else out & got
    return None if out is None else out | done


def submit_all(exp: Experiment, ctx: StageContext, todo: list[dict[str, Any]], rep: StageReport,
                failed_here: dict[tuple[str, str], set[str]], bar, submit) -> dict[str, str]:
    """Run ``todo`` in batches, at most ``2 x workers`` in flight; returns the busy items (id -> holder).

    ``submit(ctx, rows, name)`` starts one batch (a Prefect task run named ``name``, or a local
    thread) and returns a future. The name says whose work it is:
    ``<dataset>:<stage>[<methods>] batch i/n``, the methods being those whose results depend on it.
    """
    size = exp.runner.batch_size
    batches = deque(todo[i : i + size] for i in range(0, len(todo), size))
    n = len(batches)
    in_flight: deque = deque()
    busy: dict[str, str] = {}
    fatal = ""
    i = 0
    while batches or in_flight:
        while batches and not fatal and len(in_flight) < 2 * parallelism(exp.runner.workers):
            i += 1
            batch = batches.popleft()
            name = f"{ctx.dataset}:{ctx.stage}[{rep.methods}] batch {i}/{n}"
            in_flight.append((batch, submit(ctx, batch, name)))
            log.debug("%s: %d item(s) submitted", name, len(batch))
        if not in_flight:
            break
        batch, fut = in_flight.popleft()
        try:
            result: BatchResult = fut.result()
        except Exception as e:  # noqa: BLE001 - a batch lost with its worker: its items fail, the run goes on
            log.warning("%s: a batch of %d items was lost (%s: %s)", ctx.stage, len(batch), type(e).__name__, e)
            result = BatchResult([ItemResult(str(it["image_id"]), "failed", 0.0, type(e).__name__, str(e))
                                  for it in batch])
        fatal = fatal or result.fatal
        for r in result.items:
            count_result(r, rep, failed_here.setdefault(ctx.node.ident, set()), busy)
        bar.update(len(result.items))
        if fatal and batches:  # the stage cannot run here: fail the rest once, without attempting them
            for b in batches:
                for it in b:
                    count_result(ItemResult(it["image_id"], "failed", 0.0, "BackboneLoadError", f"not attempted: {fatal}"),
                           rep, failed_here[ctx.node.ident], busy)
                bar.update(len(b))
            batches.clear()
    return busy


def count_result(r: ItemResult, rep: StageReport, failed: set[str], busy: dict[str, str]) -> None:
    if r.status == "done":
        rep.done += 1
    elif r.status == "cached":
        rep.cached += 1
    elif r.status == "busy":
        busy[r.item] = r.error
    elif r.error_type == "SkippedUpstream":
        rep.skipped += 1
        rep.failures.append((r.item, r.error_type, r.error))
        failed.add(r.item)
    else:
        rep.failed += 1
        rep.failures.append((r.item, r.error_type, r.error))
        failed.add(r.item)
    rep.seconds += r.seconds


def wait_for(store: Store, ctx: StageContext, busy: dict[str, str], rep: StageReport, bar, poll: float
              ) -> list[str]:
    """Wait until each busy item is complete (cached) or its holder is gone; returns the ids to compute here.

    Items still held by a live run when another one is returned are returned too: resubmitting
    them costs one claim (they come back busy) and keeps one loop.
    """
    log.info("%s: waiting for %d item(s) another run is computing", ctx.stage, len(busy))
    waiting = set(busy)
    while waiting:
        time.sleep(poll)
        # leases first, then completion: a holder writes an item's record before it releases the item, so an
        # item not held at the first read is either never held or already complete at the second
        held = store.leases.busy_items(ctx.stage, ctx.key)
        state = store.state(ctx.stage, ctx.key)
        for iid in sorted(waiting):
            if state.pack_of(iid) is not None:
                rep.cached += 1
                bar.update(1)
                waiting.discard(iid)
        if any(iid not in held for iid in waiting):
            return sorted(waiting)
    return []
