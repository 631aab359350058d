"""Fused execution of a dataset's per-image stage output sets: one chain batch per batch of images.

``flows.execute`` plans, per node of the chain (the dataset's persisted per-image nodes, in
dependency order), the items it computes: those missing, whose inputs are stored or computed
earlier in the same chain. ``run_chains`` then cuts the images that any node computes into
batches of ``runner.batch_size`` and submits one chain batch per batch (``tasks.chain.run_chain``
as one Prefect task run ``<dataset>:<stage>+<stage>+...[<methods>] batch i/n``, or a local thread), at most
``2 x workers`` in flight, and counts each node's results into its own ``StageReport``.

A node whose models cannot be loaded (``BatchResult.fatal``) is left out of the later batches:
its items fail once, "not attempted", and the items of the chain that read them are skipped.
Items that came back busy are returned; the flow runs them stage by stage afterwards (waiting
for their holder as a stage-by-stage run does).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flows.batches import count_result
from flows.config import Experiment
from flows.logs import progress_bar
from flows.runners import parallelism
from flows.summary import StageReport
from tasks.runtime import BatchResult, ItemResult, StageContext

log = logging.getLogger("ovseg.flows")

SubmitChain = Callable[[list[StageContext], list[list[dict[str, Any]]], str], Any]  # -> future of [BatchResult]


def run_chains(exp: Experiment, ctxs: Sequence[StageContext], todos: Sequence[Sequence[dict[str, Any]]],
               reps: Sequence[StageReport], failed_here: dict[tuple[str, str], set[str]], progress: bool,
               submit_chain: SubmitChain, methods: str = "", in_memory: dict[tuple[str, str], StageReport] | None = None
               ) -> list[dict[str, str]]:
    """Compute ``todos[i]`` of node ``ctxs[i]`` as chain batches; returns per node its busy items (id -> holder).

    ``methods``: the methods whose results depend on the chain, for the task runs' names. ``in_memory``: a report
    per input node that is not persisted, counting what the chain computed of it in memory (``tasks.chain``);
    added to as the batches come back (its reports need ``dataset``, ``stage`` and ``key`` set by the caller)."""
    order = list(dict.fromkeys(str(r["image_id"]) for todo in todos for r in todo))
    size = exp.runner.batch_size
    batches = deque(set(order[i : i + size]) for i in range(0, len(order), size))
    n = len(batches)
    name0 = f"{ctxs[0].dataset}:{'+'.join(c.stage for c in ctxs)}[{methods}]"
    busy: list[dict[str, str]] = [{} for _ in ctxs]
    fatal: list[str] = ["" for _ in ctxs]
    in_flight: deque = deque()
    bar = progress_bar(len(order), f"{name0} ({len(ctxs)} stages fused)", enabled=progress,
                       interval=exp.runner.progress_seconds, leave=True, dynamic_ncols=True)
    i = 0
    try:
        while batches or in_flight:
            while batches and len(in_flight) < 2 * parallelism(exp.runner.workers):
                i += 1
                ids = batches.popleft()
                rows = [[r for r in todo if str(r["image_id"]) in ids] for todo in todos]
                rows = _without_fatal(ctxs, rows, fatal, reps, failed_here, busy)
                in_flight.append((ids, rows, submit_chain(list(ctxs), rows, f"{name0} batch {i}/{n}")))
                log.debug("%s batch %d/%d: %d image(s) submitted", name0, i, n, len(ids))
            ids, rows, fut = in_flight.popleft()
            try:
                results: list[BatchResult] = fut.result()
            except Exception as e:  # noqa: BLE001 - a batch lost with its worker: its items fail, the run goes on
                log.warning("%s: a chain batch of %d images was lost (%s: %s)", name0, len(ids), type(e).__name__, e)
                results = [BatchResult([ItemResult(str(r["image_id"]), "failed", 0.0, type(e).__name__, str(e))
                                        for r in node_rows]) for node_rows in rows]
            for k, (ctx, result) in enumerate(zip(ctxs, results)):
                fatal[k] = fatal[k] or result.fatal
                reps[k].ended += result.seconds  # the node's share of the chain's wall time (see execute)
                for r in result.items:
                    count_result(r, reps[k], failed_here.setdefault(ctx.node.ident, set()), busy[k])
                for ident, computed in (result.in_memory.items() if in_memory is not None else ()):
                    rep = in_memory.setdefault(ident, StageReport(ctx.dataset, *ident))
                    rep.total += len(computed)
                    for r in computed:
                        count_result(r, rep, set(), {})  # nothing reads it as failed: its reader fails on its own
            bar.update(len(ids))
    finally:
        bar.close()
    return busy


def _without_fatal(ctxs: Sequence[StageContext], rows: list[list[dict[str, Any]]], fatal: Sequence[str],
                   reps: Sequence[StageReport], failed_here: dict[tuple[str, str], set[str]],
                   busy: list[dict[str, str]]) -> list[list[dict[str, Any]]]:
    """The batch's rows without those of nodes that cannot run here (counted failed once, not attempted) and
    without the items of the chain that read them (counted skipped)."""
    if not any(fatal):
        return rows
    gone: dict[tuple[str, str], set[str]] = {}  # node -> items of this batch it will not compute
    out = []
    for k, (ctx, node_rows) in enumerate(zip(ctxs, rows)):
        keep = []
        for r in node_rows:
            iid = str(r["image_id"])
            lost = [up.stage for up in ctx.node.upstream.values() if iid in gone.get(up.ident, ())]
            if fatal[k]:
                res = ItemResult(iid, "failed", 0.0, "BackboneLoadError", f"not attempted: {fatal[k]}")
            elif lost:
                res = ItemResult(iid, "failed", 0.0, "SkippedUpstream", f"its {lost[0]} output failed in this run")
            else:
                keep.append(r)
                continue
            gone.setdefault(ctx.node.ident, set()).add(iid)
            count_result(res, reps[k], failed_here.setdefault(ctx.node.ident, set()), busy[k])
        out.append(keep)
    return out


def chain_of(ctxs: Sequence[StageContext], per: Mapping[str, str]) -> list[StageContext]:
    """The nodes that fuse into one chain: the per-image ones (``per``: stage -> ``Stage.per``); [] for fewer than 2."""
    chain = [c for c in ctxs if per[c.stage] == "image"]
    return chain if len(chain) > 1 else []
