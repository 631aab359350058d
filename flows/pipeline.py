"""The overnight flow: validate, ingest, compute what is missing per stage and image, say how it went.

``run_experiment`` is what ``ovseg run`` calls:

1. the plan is built and validated (configs, window geometry, device, backbones and weight
   files) before the store is created or touched: a bad experiment leaves nothing behind and
   ``--force`` deletes nothing;
2. a run journal is written (status ``running``, heartbeat, the whole plan);
3. the datasets are ingested (a dataset without images stops the run with
   ``EmptyDatasetError``); for each stage output set in dependency order the store's
   completion state is read once, the missing items are batched (one Prefect task per batch)
   and run by the streaming executor; items another live run is computing are waited for
   (``wait=False`` reports them instead); failed items are recorded and skipped downstream;
4. scores are aggregated with their coverage; the journal and the run record say how it ended:
   ``complete`` (exit 0), ``failed`` (some item failed: exit 1) or ``incomplete`` (items left
   for a later run: busy, missing inputs, damaged outputs: exit 3).

Steps 3-4 run inside one Prefect flow run (``flows.orchestration``: name, parameters, tags,
logs, artifacts, final state); with ``orchestrate=False`` they run without Prefect, each
batch through the same executor (``tasks.executor.run_batch``) in a local thread pool, which
costs no Prefect start-up (``ovseg segment`` without a configured Prefect server).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flows.batches import available, submit_all, wait_for
from flows.config import Experiment
from flows.emptiness import EmptyDatasetError, empty_dataset_error
from flows.graph import DatasetPlan, build_plan, check_device, descendants, method_users
from flows.logs import progress_bar
from storage.store import Store
from tasks.runtime import (
    RunSettings,
    StageContext,
    StageNode,
    open_store,
)
from tasks.stages import STAGE_ORDER, STAGES, get_stage

log = logging.getLogger("ovseg.flows")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
COMPACT_AFTER = 32  # completion records not yet in the stage's index that trigger a compaction


@dataclass
class StageReport:
    """What one stage node did in a run."""

    dataset: str
    stage: str
    key: str
    total: int = 0
    done: int = 0
    cached: int = 0
    skipped: int = 0  # inputs missing (failed upstream in this run, or not computed yet)
    busy: int = 0  # held by another live run and not waited for
    failed: int = 0
    seconds: float = 0.0
    methods: str = ""  # the methods whose results depend on this stage output (comma-separated)
    started: float = 0.0
    ended: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, error_type, error)


@dataclass
class RunSummary:
    """The outcome of ``run_experiment``."""

    run_id: str
    experiment: str
    store: str
    stages: list[StageReport] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan_only: bool = False
    random_weights: bool = False
    damaged: int = 0  # stored outputs found damaged when read at the end (left for the next run)
    started: float = 0.0
    ended: float = 0.0
    images: dict[str, int] = field(default_factory=dict)  # images per dataset (its manifest rows)
    report: str | None = None  # index.html written by the run (``report_dir``)
    state: str = ""  # name of the Prefect flow run's final state ("" without Prefect)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def computed(self) -> int:
        return sum(s.done for s in self.stages)

    @property
    def incomplete(self) -> int:
        """Items left for a later run (busy elsewhere, inputs missing) plus damaged outputs found."""
        return sum(s.busy + s.skipped for s in self.stages) + self.damaged

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return "incomplete" if self.incomplete else "complete"

    @property
    def exit_code(self) -> int:
        return {"complete": EXIT_OK, "failed": EXIT_FAILED, "incomplete": EXIT_INCOMPLETE}[self.status]


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


def run_experiment(exp: Experiment, force: Iterable[str] = (), dry_run: bool = False, progress: bool = True,
                   only_stages: Iterable[str] | None = None, wait: bool = True,
                   experiment_file: str | None = None, orchestrate: bool = True, report_dir: str | None = None,
                   max_failed: float | None = None) -> RunSummary:
    """Run (or plan, with ``dry_run``) an experiment. ``force`` recomputes the named stages and their dependants.

    ``only_stages`` restricts the run to the named stages (``ovseg stage NAME``); their inputs
    must then already be complete (items without them are reported, and the run is incomplete).
    ``orchestrate`` runs the work as a Prefect flow run (False: local threads, no Prefect);
    ``report_dir`` writes the HTML report of the experiment there at the end; ``max_failed``
    (default ``flows.orchestration.DEFAULT_MAX_FAILED``) is the fraction of failed images above
    which the flow run is ``Failed`` rather than ``Completed`` named ``Partial``.
    """
    from flows.ingest import plan_status
    from flows.orchestration import DEFAULT_MAX_FAILED
    from flows.records import write_run_record

    force = list(force)
    only = list(only_stages) if only_stages is not None else None
    max_failed = DEFAULT_MAX_FAILED if max_failed is None else float(max_failed)
    if not 0.0 <= max_failed <= 1.0:
        raise ValueError(f"max_failed must be a fraction in [0, 1], got {max_failed}")
    missing: list[str] | None = [] if dry_run else None
    plans = validate(exp, force, only, missing)
    run_id = new_run_id()
    summary = RunSummary(run_id, exp.name, "", started=time.time())
    summary.random_weights = any(n.random_weights for p in plans for n in p.nodes.values())
    if dry_run:
        summary.notes += [f"weights missing: {m}; a run needs them (the plan shows what it would compute)"
                          for m in dict.fromkeys(missing or [])]
        return plan_status(exp, plans, force, summary)
    store = open_store(Store(exp.store, lease_ttl=exp.runner.lease_ttl).location, exp.runner.lease_ttl)
    store.forget_fresh()  # another process may have changed the store since this process last looked
    summary.store = store.location
    plan_rows = [{"dataset": p.dataset.name, "stage": n.stage, "key": n.key,
                  "methods": sorted(method_users(p).get(n.ident, ()))} for p in plans for n in p.ordered()]
    journal = store.journal(run_id, {"experiment": exp.name, "experiment_file": experiment_file or "",
                                     "experiment_files": list(exp.provenance.files),
                                     "overrides": list(exp.provenance.overrides),
                                     "store": store.location, "plan": plan_rows, "force": force, "only_stages": only,
                                     "random_weights": summary.random_weights}).start()
    settings = RunSettings(store.location, exp.device, exp.window_batch, exp.models.weights_dir, run_id,
                           exp.runner.lease_ttl)

    def body(submit) -> dict[str, list[dict[str, Any]]]:
        manifests = _ingest_all(store, plans, summary, progress)
        for plan in plans:
            _run_dataset(exp, store, plan, manifests[plan.dataset.name], settings, force, only, summary, progress,
                         wait, journal, submit)
        if report_dir is not None:
            from flows.report import write_report

            summary.report = str(write_report(store.location, report_dir, experiments=[exp.name]))
        return manifests

    status = "failed"
    try:
        if orchestrate:
            from flows.orchestration import run_in_flow

            run_in_flow(exp, summary, body, experiment_file or "", force, only, max_failed)
        else:
            from concurrent.futures import ThreadPoolExecutor

            from tasks.executor import run_batch

            if exp.runner.kind != "local":
                raise ValueError(f"runner.kind {exp.runner.kind!r} needs Prefect; run with orchestration "
                                 "(without --no-prefect) or use runner.kind: local")
            with ThreadPoolExecutor(max_workers=exp.runner.workers, thread_name_prefix="ovseg-batch") as pool:
                body(lambda ctx, rows, name: pool.submit(run_batch, ctx, rows))
        status = summary.status
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary.ended = time.time()
        journal.finish(status, {"complete": 0, "incomplete": 3, "failed": 1, "interrupted": 130}[status],
                       counts={"computed": summary.computed, "failed": summary.failed, "incomplete": summary.incomplete})
        if status != "interrupted":
            write_run_record(store, exp, plans, summary, status)
    return summary


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
        _run_node(exp, store, ctx, _items(node, ok_rows), node.ident in forced, rep, failed_here, progress, wait,
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


def _items(node: StageNode, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    stage = STAGES[node.stage]
    if stage.per == "vocabulary":
        return [{"image_id": "vocab"}]
    if stage.scored_only:  # images without ground truth are predicted, not scored
        return [r for r in rows if r.get("gt_path")]
    return list(rows)


def _run_node(exp: Experiment, store: Store, ctx: StageContext, items: list[dict[str, Any]], forced: bool,
              rep: StageReport, failed_here: dict[tuple[str, str], set[str]], progress: bool, wait: bool,
              label: str, submit) -> None:
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
            iid = it["image_id"] if STAGES[up.stage].per == "image" else "vocab"
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
    bar = progress_bar(len(todo), label, enabled=progress, leave=True, dynamic_ncols=True)
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


__all__ = ["EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_OK", "EXIT_USAGE", "STAGE_ORDER", "EmptyDatasetError", "RunSummary",
           "StageReport", "run_experiment", "validate"]
