"""Fused stage chains: several stages of one batch of images, one after the other on one worker.

A cold run (``runner.fuse``, the default) sends one chain batch per batch of images instead of
one batch per stage (``flows.fused``). ``run_chain`` runs, for each node of the chain in
dependency order, exactly the streaming executor's batch (``tasks.executor.run_batch``: one
lease per node and batch, the same loader, compute groups, writer, pack, completion record and
failure handling), with one difference: the nodes share a ``tasks.memory.ChainMemory``, so

- each image is decoded once per chain batch (``tasks.common.decoded_rgb``), and resized,
  normalised and windowed once per window geometry (``row_windows``), its region map windowed
  once per plan (``row_region_windows``);
- each item a node stores is kept in memory as stored, and the later nodes of the chain read it
  from there (``StageContext.read_upstream``) instead of the store; a node's outputs are
  forgotten once no later node of the chain reads them;
- a per-image input that is not persisted (``persist: {stage: false}``; a bank's intermediate
  stages by default) is computed once per chain batch, by its first reader once that reader holds
  its lease, for the images the reader claimed and that have no stored copy (``compute_in_memory``:
  the stage's own loader and compute groups, outputs kept in memory only; no lease, pack or record
  of its own), instead of once per reader and item on demand.

A node's pack and completion record are written while the next node computes
(``tasks.executor.start_batch``: the writes' fsyncs are waits that would otherwise stall the
chain); packs are committed in chain order, each after the previous one, and a node whose input
(computed in this chain batch) then fails to be stored stores nothing: its items that read that
input fail ``SkippedUpstream`` as they would had the input failed before they ran. The chain batch
returns once every pack is in place and every lease released.

Per node the rows are those the flow found missing for it (an incremental run computes only
the missing stages). An item whose input the chain was to compute but did not is not attempted:
``SkippedUpstream`` when that input failed, ``busy`` when another live run holds it (the flow
then waits for it and runs the item stage by stage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tasks.executor import PendingBatch, check_declared, compute_rows, start_batch
from tasks.memory import ChainMemory
from tasks.runtime import BatchResult, ItemResult, StageContext, StageNode
from tasks.stages import STAGES
from tasks.streams import InterruptedAgain

log = logging.getLogger("ovseg.tasks")


def run_chain(ctxs: Sequence[StageContext], rows: Sequence[Sequence[Mapping[str, Any]]],
              memory: ChainMemory | None = None) -> list[BatchResult]:
    """Run the chain's nodes (``ctxs``, in dependency order) on their rows; one ``BatchResult`` per node.

    ``rows[i]`` are the manifest rows node ``i`` computes (its missing items of the batch's images).
    ``memory`` is made here when None (a test passes its own to look inside). ``BatchResult.seconds``
    is the wall time of each node's part of the chain.
    """
    if len(ctxs) != len(rows):
        raise ValueError(f"a chain of {len(ctxs)} nodes needs as many row lists, got {len(rows)}")
    memory = memory if memory is not None else ChainMemory()
    outcome: dict[tuple[str, str], dict[str, ItemResult]] = {}  # node -> item -> result, for the nodes run so far
    last_reader = _last_readers(ctxs)
    started: list[tuple[tuple[str, str], PendingBatch, dict[str, ItemResult], float]] = []
    tallies: list[dict[tuple[str, str], list[ItemResult]]] = [{} for _ in ctxs]  # inputs computed in memory
    try:
        for i, (ctx, node_rows) in enumerate(zip(ctxs, rows)):
            t0 = time.perf_counter()
            blocked: dict[str, ItemResult] = {}
            runnable = []
            for row in node_rows:
                why = _blocked(ctx, row, outcome)
                if why is None:
                    runnable.append(row)
                else:
                    blocked[why.item] = why
            gate = _gate(ctx, runnable, started)
            pending = start_batch(replace(ctx, memory=memory), runnable, gate=gate,
                                  prepare=_prepare(ctx, memory, tallies[i]) if _memory_inputs(ctx.node) else None)
            outcome[ctx.node.ident] = pending.results | blocked  # as computed; final once its pack is stored
            started.append((ctx.node.ident, pending, blocked, time.perf_counter() - t0))
            for ident, last in last_reader.items():
                if last == i:
                    memory.forget(ident)
        out = []
        for (_, pending, blocked, seconds), node_rows, tally in zip(started, rows, tallies):
            t0 = time.perf_counter()  # what is left of writing its pack (the others' writes overlapped compute)
            ran = pending.result()
            by_id = {r.item: r for r in ran.items} | blocked
            out.append(BatchResult([by_id[str(r["image_id"])] for r in node_rows], ran.fatal,
                                   seconds + time.perf_counter() - t0, tally))
    except InterruptedAgain:  # a second interrupt while the writes were being finished: they are left as they are
        raise
    except BaseException as e:  # an interrupt: the packs computed so far are stored and the leases released first
        for _, pending, _, _ in started:
            pending.wait(interrupted=isinstance(e, KeyboardInterrupt))
        raise
    return out


def _gate(ctx: StageContext, rows: Sequence[Mapping[str, Any]],
          started: Sequence[tuple[tuple[str, str], PendingBatch, dict[str, ItemResult], float]]):
    """The node's commit gate (``start_batch``): waits for the packs of the nodes started before it (in order: each
    waited for its predecessors), then names its items whose input, computed in this chain batch, was not stored."""
    earlier = list(started)

    def gate() -> dict[str, ItemResult]:
        for _, pending, _, _ in earlier:
            pending.wait()
        final = {ident: pending.results | blocked for ident, pending, blocked, _ in earlier}
        return {why.item: why for row in rows if (why := _blocked(ctx, row, final)) is not None}

    return gate


def _blocked(ctx: StageContext, row: Mapping[str, Any], outcome: Mapping[tuple[str, str], Mapping[str, ItemResult]]
             ) -> ItemResult | None:
    """The result of an item whose input this chain was to compute and did not, or None when it can run."""
    iid = str(row["image_id"])
    for up in ctx.node.upstream.values():
        got = outcome.get(up.ident, {}).get(STAGES[up.stage].item_of(row))
        if got is None or got.status in ("done", "cached"):
            continue  # not the chain's to compute (stored before), computed now, or found stored by its batch
        if got.status == "busy":
            return ItemResult(iid, "busy", error=f"its {up.stage} output {got.error}")
        return ItemResult(iid, "failed", 0.0, "SkippedUpstream", f"its {up.stage} output failed in this run")
    return None


def _last_readers(ctxs: Sequence[StageContext]) -> dict[tuple[str, str], int]:
    """For each node of the chain and each input it computes in memory, the index of the last node of the chain
    that reads it, directly or through such an input (a chain node no later node reads: itself)."""
    last = {ctx.node.ident: i for i, ctx in enumerate(ctxs)}
    for i, ctx in enumerate(ctxs):
        for node in (ctx.node, *_memory_inputs(ctx.node)):
            for up in node.upstream.values():
                if up.ident in last or not up.persist:
                    last[up.ident] = i
    return last


def _memory_inputs(node: StageNode) -> list[StageNode]:
    """The per-image inputs of ``node`` that are not persisted, with theirs, in dependency order (inputs first)."""
    out: dict[tuple[str, str], StageNode] = {}

    def visit(n: StageNode) -> None:
        for up in n.upstream.values():
            if not up.persist and STAGES[up.stage].per == "image" and up.ident not in out:
                visit(up)
                out[up.ident] = up

    visit(node)
    return list(out.values())


def _prepare(ctx: StageContext, memory: ChainMemory, tally: dict[tuple[str, str], list[ItemResult]]):
    """``start_batch``'s ``prepare`` for a node with inputs that are not stored: computes them (and theirs) once,
    in memory, for the rows the node claimed (so items another run holds, or has completed, cost nothing);
    ``tally``: per input node, the results of the items computed (``BatchResult.in_memory``)."""
    def prepare(rows: list[Mapping[str, Any]]) -> None:
        for up in _memory_inputs(ctx.node):  # inputs first
            got = compute_in_memory(StageContext(up, ctx.settings, ctx.dataset, memory),
                                    _needed(ctx, up, rows, memory))
            if got:
                tally.setdefault(up.ident, []).extend(got.values())

    return prepare


def _needed(reader: StageContext, up: StageNode, rows: Sequence[Mapping[str, Any]], memory: ChainMemory
            ) -> list[Mapping[str, Any]]:
    """The rows whose ``up`` item the reader's rows need and neither the chain's memory nor the store holds."""
    state = reader.store().state(up.stage, up.key, refresh=False)
    item_of, out, seen = STAGES[up.stage].item_of, [], set()
    for row in rows:
        iid = str(item_of(row))
        if iid not in seen and not memory.has(up.ident, iid) and state.pack_of(iid) is None:
            seen.add(iid)
            out.append(row)
    return out


def compute_in_memory(ctx: StageContext, rows: Sequence[Mapping[str, Any]]) -> dict[str, ItemResult]:
    """A node that is not persisted, computed for ``rows`` in a fused chain and kept in ``ctx.memory`` only.

    The stored batch's loader, compute groups, group retry and ``Stage.arrays`` check, in the calling thread
    (``tasks.executor.compute_rows``); no lease, pack or completion record: nothing is stored, so there is
    nothing to claim. Returns each item's result. A failed item is not kept: its reader computes it on demand
    (``StageContext.read_upstream``) and fails with that item's own error.
    """
    if ctx.memory is None:
        raise ValueError(f"{ctx.stage}: computing in memory needs the chain's memory (StageContext.memory)")
    stage, results = STAGES[ctx.stage], {}
    if not rows:
        return results
    try:
        models = stage.models(ctx)
    except Exception as e:  # noqa: BLE001 - its readers load it on demand and fail with that error
        log.warning("%s (not persisted): its models failed to load: %s: %s", ctx.stage, type(e).__name__, e)
        return {str(r["image_id"]): ItemResult(str(r["image_id"]), "failed", 0.0, type(e).__name__, str(e))
                for r in rows}
    compute_rows(ctx, stage, models, rows, _Keep(ctx, stage, results), results)
    return results


class _Keep:
    """``compute_in_memory``'s sink: ``put`` keeps an item whose arrays are the declared ones (``Stage.arrays``)."""

    def __init__(self, ctx: StageContext, stage, results: dict[str, ItemResult]):
        self._ctx, self._stage, self._results = ctx, stage, results
        self._declared = stage.array_names(ctx.params)

    def put(self, got: Any) -> None:
        iid, arrays, _, seconds = got
        try:
            check_declared(self._stage, iid, arrays, self._declared)
        except ValueError as e:  # not kept: its reader computes it on demand and fails there
            log.warning("%s", e)
            self._results[iid] = ItemResult(iid, "failed", seconds, "ValueError", str(e))
            return
        self._ctx.memory.keep(self._ctx.node.ident, iid, arrays)
        self._results[iid] = ItemResult(iid, "done", seconds)
