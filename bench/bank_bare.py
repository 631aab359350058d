"""The bare bank build of the benchmark: a bank's per-image work and its index build in a plain loop, no pipeline.

What a user's own script would have to do to build the same bank, in one process, with the same
models and settings, and nothing of ovseg's pipeline: no store (nothing read or written), no
leases, no Prefect, no journal, no ingest check, no threads. Per batch of ``batch_size`` images
(sorted by image id), for every per-image node of the bank's plan in dependency order, each
image is loaded with the stage's own ``load`` (decode, resize, normalise, window: the loaders'
preprocessing; upstream outputs from a ``tasks.memory.ChainMemory``, exactly as a fused chain
reads them) and computed with the stage's own ``compute``, in the compute groups the executor
forms (``tasks.streams.Grouper``); then ``ovseg_core.bank.index.build_index`` over every key in
image-id order and the index serialised. Nothing is re-implemented here: the same functions run
as in the pipeline, only the pipeline around them is missing.

The models are the process's cached ones (``tasks.runtime.get_backbone``): run after the
pipeline build, the bare loop does not pay their construction (tiny random models: milliseconds),
which makes the bare time a lower bound and the ratio ``wall / bare`` an upper bound.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows.bank_graph import BANK_DATASET_PREFIX
from flows.config import Experiment
from flows.graph import build_plan
from flows.ingest import ingest_dataset
from ovseg_core.bank.index import build_index, index_to_bytes
from tasks.streams import Grouper
from tasks.memory import ChainMemory
from tasks.runtime import RunSettings, StageContext, StageNode
from tasks.stages import STAGES


def bank_nodes(exp: Experiment) -> tuple[str, list[StageNode], StageNode]:
    """The bank dataset's name, its per-image nodes in dependency order, and its ``bank_index`` node.

    Every per-image node, stored or not (a bank's intermediates are computed in memory by default): each is
    computed once per batch, as the pipeline's chain does."""
    plan = next(p for p in build_plan(exp) if p.dataset.name.startswith(BANK_DATASET_PREFIX))
    nodes = plan.ordered()
    index = next(n for n in nodes if n.stage == "bank_index")
    return plan.dataset.name, [n for n in nodes if STAGES[n.stage].per == "image"], index


def bank_rows(exp: Experiment) -> list[dict[str, Any]]:
    """The bank's manifest rows, from its images alone (no store): ``flows.ingest.ingest_dataset`` unwritten."""
    plan = next(p for p in build_plan(exp) if p.dataset.name.startswith(BANK_DATASET_PREFIX))
    return [r for r in ingest_dataset(None, plan, progress=False, write=False) if r.get("status", "ok") == "ok"]


def bare_build(exp: Experiment, rows: Sequence[Mapping[str, Any]], batch_size: int, nowhere: Path) -> dict[str, Any]:
    """Run the bank's work on ``rows`` (manifest rows) without the pipeline; wall and CPU seconds, per part.

    ``nowhere``: a path that must not exist and is given as the store location; it is checked to
    still not exist at the end (the bare loop must never touch a store).
    """
    dataset, nodes, index_node = bank_nodes(exp)
    settings = RunSettings(str(nowhere), exp.device, exp.window_batch, exp.models.weights_dir, "bare")
    keys_node = next(n for n in nodes if n.stage == "bank_keys")
    rows = sorted(rows, key=lambda r: str(r["image_id"]))
    per_stage = {n.ident: [0.0, 0.0] for n in nodes}  # wall, CPU: load + compute of the node
    keys: list[np.ndarray] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), batch_size):
        memory = ChainMemory()
        batch = rows[start : start + batch_size]
        for node in nodes:
            s0, sc0 = time.perf_counter(), time.process_time()
            _run_node(StageContext(node, settings, dataset, memory), batch, memory)
            per_stage[node.ident][0] += time.perf_counter() - s0
            per_stage[node.ident][1] += time.process_time() - sc0
        keys += [memory.output(keys_node.ident, str(r["image_id"]), ["keys"])["keys"] for r in batch]
    i0, ic0 = time.perf_counter(), time.process_time()
    stacked = np.concatenate(keys)
    blob = index_to_bytes(build_index(stacked, np.arange(stacked.shape[0], dtype=np.int64), index_node.params.index))
    index_wall, index_cpu = time.perf_counter() - i0, time.process_time() - ic0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if nowhere.exists():
        raise RuntimeError(f"the bare build touched a store at {nowhere}")
    stages = [{"stage": n.stage, "key": n.key, "wall_seconds": per_stage[n.ident][0],
               "cpu_seconds": per_stage[n.ident][1]} for n in nodes]
    stages.append({"stage": "bank_index", "key": index_node.key, "wall_seconds": index_wall, "cpu_seconds": index_cpu})
    return {"wall_seconds": wall, "cpu_seconds": cpu, "regions": int(stacked.shape[0]), "index_bytes": len(blob),
            "stages": stages}


def _run_node(ctx: StageContext, rows: Sequence[Mapping[str, Any]], memory: ChainMemory) -> None:
    """Load and compute one node on a batch's images, keeping its outputs for the later nodes (errors propagate)."""
    stage = STAGES[ctx.stage]
    models = stage.models(ctx)
    grouper = Grouper(stage, ctx.settings.window_batch)
    groups = [g for row in rows if (g := grouper.add(row, stage.load(ctx, row))) is not None]
    if (last := grouper.flush()) is not None:
        groups.append(last)
    for group in groups:
        for (row, _), (arrays, _) in zip(group, stage.compute(ctx, models, [inp for _, inp in group])):
            memory.keep(ctx.node.ident, str(row["image_id"]), arrays)
