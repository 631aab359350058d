"""The work of a run, stage by stage: ingest, then per stage output set the missing items in batches.

``flows.pipeline.run_experiment`` validates the experiment (``validate``) and hands the work to
the functions here, inside a Prefect flow run or in local threads.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from flows.batches import available, submit_all, wait_for
from flows.config import Experiment
from flows.emptiness import empty_dataset_error
from flows.graph import DatasetPlan, build_plan, check_device, descendants, method_users
from flows.summary import RunSummary, StageReport
from storage.store import Store
from tasks.runtime import RunSettings, StageContext
from tasks.stages import STAGES, get_stage

log = logging.getLogger("ovseg.flows")

COMPACT_AFTER = 32  # completion records not yet in the stage's index that trigger a compaction


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def validate(exp: Experiment, force: Iterable[str] = (), only_stages: Iterable[str] | None = None,
             missing: list[str] | None = None) -> list[DatasetPlan]:
    """Build and check the whole plan before anything is written (raises ``ValueError`` naming the problem).

    ``missing``: collect missing weight files there instead of raising (dry runs).
    """
    for name in [*force, *(only_stages or ())]:
        get_stage(name)
    check_device(exp.device, remote=exp.runner.kind == "dask" and bool(exp.runner.address))
    return build_plan(exp, missing)


def _ingest_all(store: Store, plans: Sequence[DatasetPlan], summary: RunSummary, progress: bool
                ) -> dict[str, list[dict[str, Any]]]:
    """Ingest every dataset; a dataset without images raises ``EmptyDatasetError`` naming what its root holds."""
    from flows.ingest import ingest_dataset

    manifests = {}
    for p in plans:
        rows = ingest_dataset(store, p, progress=progress)
        if not rows:
            raise empty_dataset_error(p.dataset.name, p.dataset.root, p.dataset.layout)
        manifests[p.dataset.name] = rows
        summary.images[p.dataset.name] = len(rows)
        bad = [r for r in rows if r.get("status", "ok") != "ok"]
        log.info("%s: %d images (%d unreadable) from %s", p.dataset.name, len(rows), len(bad), p.dataset.root)
        for r in bad:
            log.warning("%s: image %s is skipped: %s", p.dataset.name, r.get("rel_path") or r["image_id"], r["error"])
    return manifests


def _run_dataset(exp: Experiment, store: Store, plan: DatasetPlan, manifest: Sequence[Mapping[str, Any]],
                 settings: RunSettings, force: Sequence[str], only: Sequence[str] | None, summary: RunSummary,
                 progress: bool, wait: bool, journal, submit) -> None:
    from flows.scores import aggregate_scores

    ok_rows = [dict(r) for r in manifest if r.get("status", "ok") == "ok"]
    bad_rows = [r for r in manifest if r.get("status", "ok") != "ok"]
    if bad_rows:
        rep = StageReport(plan.dataset.name, "ingest", "-", total=len(manifest), failed=len(bad_rows))
        rep.failures = [(r["image_id"], "ImageError", r["error"]) for r in bad_rows]
        summary.stages.append(rep)
    forced = descendants(plan, set(force))
    users = method_users(plan)
    failed_here: dict[tuple[str, str], set[str]] = {}  # items that failed in this run, per node
    nodes = [n for n in plan.ordered() if (only is None or n.stage in only) and n.persist]  # others: on demand
    for k, node in enumerate(nodes, 1):
        label = f"{plan.dataset.name}:{node.stage}[{','.join(sorted(users.get(node.ident, ())))}]"
        rep = StageReport(plan.dataset.name, node.stage, node.key, started=time.time(),
                          methods=",".join(sorted(users.get(node.ident, ()))))
        ctx = StageContext(node, settings, plan.dataset.name)
        store.register_stage(node.stage_key, random_weights=node.random_weights)  # also rewrites a damaged stage.json
        store.touch(node.stage, node.key, summary.run_id)  # the storage budget evicts least recently used sets
        repaired = store.check_presence(node.stage, node.key)
        if repaired:
            summary.notes.append(f"{plan.dataset.name}:{node.stage} {node.key}: {len(repaired)} stored outputs were "
                                 f"missing or truncated ({repaired[0][1]}, ...): recomputed now")
        _run_node(exp, store, ctx, STAGES[node.stage].items(ok_rows), node.ident in forced, rep, failed_here, progress, wait,
                  f"{label} ({k}/{len(nodes)})", submit)
        state = store.state(node.stage, node.key)  # one listing: what the workers wrote
        store.mark_fresh(node.stage, node.key)  # downstream checks in this run need no other listing
        if state.uncovered_records() >= COMPACT_AFTER:  # later runs read one index instead of many records
            state.compact()
        rep.ended = time.time()
        log.info("%s stage %d/%d (key %s): %d computed, %d cached, %d failed, %d not done, %.1f s of compute",
                 label, k, len(nodes), node.key, rep.done, rep.cached, rep.failed, rep.skipped + rep.busy, rep.seconds)
        summary.stages.append(rep)
        journal.stage(f"{plan.dataset.name}/{node.stage}/{node.key}", done=rep.done, cached=rep.cached,
                      failed=rep.failed, skipped=rep.skipped, busy=rep.busy, total=rep.total, ended=rep.ended)
    if only is None or "scoring" in only:
        rows, notes, damaged = aggregate_scores(store, exp.name, plan, manifest, summary.run_id)
        summary.metrics.extend(rows)
        summary.notes.extend(notes)
        summary.damaged += damaged


def _run_node(exp: Experiment, store: Store, ctx: StageContext, items: list[dict[str, Any]], forced: bool,
              rep: StageReport, failed_here: dict[tuple[str, str], set[str]], progress: bool, wait: bool,
              label: str, submit) -> None:
    from tqdm.auto import tqdm

    node = ctx.node
    rep.total = len(items)
    state = store.state(node.stage, node.key)
    if forced:
        store.drop_items(node.stage, node.key, [it["image_id"] for it in items], reason="--force")
    ready = items
    for role, up in node.upstream.items():
        up_done = available(store, up)
        up_failed = failed_here.get(up.ident, set())
        keep = []
        for it in ready:
            iid = STAGES[up.stage].item_of(it)
            if up_done is None or iid in up_done:
                keep.append(it)
                continue
            rep.skipped += 1
            why = (f"its {up.stage} output failed in this run" if iid in up_failed
                   else f"its {up.stage} output is missing (run `ovseg run`, or the {up.stage} stage first)")
            rep.failures.append((it["image_id"], "SkippedUpstream", why))
            failed_here.setdefault(node.ident, set()).add(it["image_id"])
        ready = keep
    done = state.complete()
    todo = [it for it in ready if it["image_id"] not in done]
    rep.cached = len(ready) - len(todo)
    if not todo:
        return
    bar = tqdm(total=len(todo), desc=label, unit="img", disable=not progress, leave=True, dynamic_ncols=True)
    pending = todo
    poll = min(2.0, exp.runner.lease_ttl / 10)
    try:
        while pending:
            busy = submit_all(exp, ctx, pending, rep, failed_here, bar, submit)
            pending = []
            if not busy:
                break
            if not wait:
                rep.busy += len(busy)
                rep.failures += [(iid, "Busy", why) for iid, why in busy.items()]
                break
            by_id = {it["image_id"]: it for it in todo}
            pending = [by_id[i] for i in wait_for(store, ctx, busy, rep, bar, poll)]
    finally:
        bar.close()
