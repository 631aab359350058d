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
  forgotten once no later node of the chain reads them.

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

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tasks.executor import PendingBatch, start_batch
from tasks.memory import ChainMemory
from tasks.runtime import BatchResult, ItemResult, StageContext
from tasks.stages import STAGES


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
            pending = start_batch(replace(ctx, memory=memory), runnable, gate=gate)
            outcome[ctx.node.ident] = pending.results | blocked  # as computed; final once its pack is stored
            started.append((ctx.node.ident, pending, blocked, time.perf_counter() - t0))
            for ident, last in last_reader.items():
                if last == i:
                    memory.forget(ident)
    except BaseException:  # the packs computed so far are stored and the leases released before it propagates
        for _, pending, _, _ in started:
            pending.wait()
        raise
    out = []
    for (_, pending, blocked, seconds), node_rows in zip(started, rows):
        t0 = time.perf_counter()  # what is left of writing its pack (the others' writes overlapped compute)
        ran = pending.result()
        by_id = {r.item: r for r in ran.items} | blocked
        out.append(BatchResult([by_id[str(r["image_id"])] for r in node_rows], ran.fatal,
                               seconds + time.perf_counter() - t0))
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
    """For each node of the chain, the index of the last node of the chain that reads it (itself when none)."""
    last = {ctx.node.ident: i for i, ctx in enumerate(ctxs)}
    for i, ctx in enumerate(ctxs):
        for up in ctx.node.upstream.values():
            if up.ident in last:
                last[up.ident] = i
    return last
