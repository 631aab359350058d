"""The work of a run: journal, ingest, then per stage output set the missing items in batches, scores,
report, run record.

``execute`` does it for a ``RunRequest`` (plain, picklable data: the experiment and the run's
options) and the validated plan, submitting each batch through the ``submit`` it is given: a
Prefect task run inside the run's flow run (``flows.orchestration``) or a local thread
(``flows.pipeline``, ``--no-prefect``). Both run the same code, so both give the same outputs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from flows.batches import available, submit_all, wait_for
from flows.config import Experiment
from flows.emptiness import empty_dataset_error, root_error
from flows.fused import SubmitChain, chain_of, run_chains
from flows.graph import DatasetPlan, build_plan, check_device, descendants, method_users, read_nodes
from flows.logs import progress_bar
from flows.ingest import ingest_dataset
from flows.records import write_run_record
from flows.report import write_report
from flows.scores import aggregate_scores
from flows.summary import EXIT_STORAGE, RunSummary, StageReport
from storage.fserrors import StoreWriteError
from storage.store import Store
from tasks.runtime import RunSettings, StageContext, open_store
from tasks.stages import STAGES, get_stage

log = logging.getLogger("ovseg.flows")

COMPACT_AFTER = 32  # completion records not yet in the stage's index that trigger a compaction


class RunStorageError(StoreWriteError):
    """A run stopped because the store could not be written (disk full, read-only ...): exit 4."""


Submit = Callable[[StageContext, list[dict[str, Any]], str], Any]  # (ctx, rows, name) -> future of a BatchResult


def run_id_at(when: datetime, token: str) -> str:
    """A run id: ``<UTC time>-<6 hex>`` (``20261206T195544Z-9e00b8``), sortable by start time."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + token[:6]


def new_run_id() -> str:
    return run_id_at(datetime.now(timezone.utc), uuid.uuid4().hex)


@dataclass(frozen=True)
class RunRequest:
    """What a run does, as plain data (picklable; the Prefect flow run receives it as parameters).

    Attributes:
        experiment: the validated experiment (with its provenance: files read, overrides).
        run_id: the run's id (journal, tables, leases, flow run name).
        force: stages recomputed with their dependants.
        only: the stages run (``ovseg stage``), None for all.
        wait: wait for items another live run holds (False: report them, the run is incomplete).
        progress: progress bars on the terminal.
        report_dir: folder for the HTML report written at the end, None for none.
        experiment_file: the experiment file, "" when the experiment was built in memory.
    """

    experiment: Experiment
    run_id: str
    force: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    wait: bool = True
    progress: bool = True
    report_dir: str | None = None
    experiment_file: str = ""


def execute(request: RunRequest, plans: Sequence[DatasetPlan], submit: Submit, submit_chain: SubmitChain | None = None
            ) -> tuple[RunSummary, dict[str, list[dict[str, Any]]]]:
    """Run ``request`` on its validated ``plans``; returns the summary and the manifests ingested.

    The run journal is written first (status ``running``, the whole plan) and finished last with
    the outcome, followed by the run record, whatever happened in between (an interrupted run
    gets no run record). An exception (e.g. a dataset without images) is re-raised.

    ``submit_chain`` starts a fused chain batch (``flows.fused``); with ``runner.fuse`` (the default) the
    per-image stages of a dataset run as chains through it; None: every stage batch by batch through ``submit``.
    """
    exp, run_id = request.experiment, request.run_id
    force, only = list(request.force), (list(request.only) if request.only is not None else None)
    summary = RunSummary(run_id, exp.name, "", started=time.time())
    summary.random_weights = any(n.random_weights for p in plans for n in p.nodes.values())
    store = open_store(Store(exp.store, lease_ttl=exp.runner.lease_ttl).location, exp.runner.lease_ttl)
    store.forget_fresh()  # another process may have changed the store since this process last looked
    summary.store = store.location
    plan_rows = [{"dataset": p.dataset.name, "stage": n.stage, "key": n.key,
                  "methods": sorted(method_users(p).get(n.ident, ()))} for p in plans for n in read_nodes(p)]
    journal = store.journal(run_id, {"experiment": exp.name, "experiment_file": request.experiment_file,
                                     "experiment_files": list(exp.provenance.files),
                                     "overrides": list(exp.provenance.overrides),
                                     "store": store.location, "plan": plan_rows, "force": force, "only_stages": only,
                                     "random_weights": summary.random_weights}).start()
    settings = RunSettings(store.location, exp.device, exp.window_batch, exp.models.weights_dir, run_id,
                           exp.runner.lease_ttl, progress_seconds=exp.runner.progress_seconds,
                           io_threads=exp.runner.io_threads)
    status, exit_code = "failed", None
    try:
        manifests = _ingest_all(store, plans, summary, request.progress)
        for plan in plans:
            _run_dataset(exp, store, plan, manifests[plan.dataset.name], settings, force, only, summary,
                         request.progress, request.wait, journal, submit, submit_chain)
        if request.report_dir is not None:
            summary.report = str(write_report(store.location, request.report_dir, experiments=[exp.name]))
        status = summary.status
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except StoreWriteError as e:  # the run's own bookkeeping cannot be written: the run stops, its outputs stay
        exit_code = EXIT_STORAGE
        raise RunStorageError(f"the store {store.location} cannot be written ({e}); the run stopped, its completed "
                              "outputs are kept: free space (`ovseg cache gc`, `--max-bytes`) or fix the store, "
                              "then rerun the same command") from e
    finally:
        summary.ended = time.time()
        journal.finish(status, exit_code or {"complete": 0, "incomplete": 3, "failed": 1, "interrupted": 130}[status],
                       counts={"computed": summary.computed, "failed": summary.failed, "incomplete": summary.incomplete})
        if status != "interrupted":
            try:
                write_run_record(store, exp, plans, summary, status)
            except StoreWriteError as e:
                if exit_code is None:
                    raise
                log.warning("the run record was not written: %s", e)
    return summary, manifests


def validate(exp: Experiment, force: Iterable[str] = (), only_stages: Iterable[str] | None = None,
             missing: list[str] | None = None) -> list[DatasetPlan]:
    """Build and check the whole plan before anything is written (raises ``ValueError`` naming the problem).

    ``missing``: collect missing weight files there instead of raising (dry runs).
    """
    for name in [*force, *(only_stages or ())]:
        get_stage(name)
    for i, ds in enumerate(exp.datasets):  # before the store is opened: a bad plan touches no store
        if not Path(ds.root).exists():
            raise root_error(ds.name, ds.root, i, "the dataset root does not exist")
    check_device(exp.device, remote=exp.runner.kind == "dask" and bool(exp.runner.address))
    return build_plan(exp, missing)


def _ingest_all(store: Store, plans: Sequence[DatasetPlan], summary: RunSummary, progress: bool
                ) -> dict[str, list[dict[str, Any]]]:
    """Ingest every dataset; a dataset without images raises ``EmptyDatasetError`` naming what its root holds."""
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
                 progress: bool, wait: bool, journal, submit: Submit, submit_chain: SubmitChain | None) -> None:
    if plan.batch_size is not None and plan.batch_size != exp.runner.batch_size:  # a bank's own batch size
        exp = exp.model_copy(update={"runner": exp.runner.model_copy(update={"batch_size": plan.batch_size})})
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
    ctxs = [StageContext(n, settings, plan.dataset.name) for n in nodes]
    chain = chain_of(ctxs, {s: STAGES[s].per for s in STAGES}) if exp.runner.fuse and submit_chain else []
    n = len(nodes)
    in_chain = {c.node.ident for c in chain}

    def after_chain(node) -> bool:  # reads a chain node's outputs, directly or through others (bank_index)
        return any(u.ident in in_chain or after_chain(u) for u in node.upstream.values())

    def stage_by_stage(later: bool) -> None:  # the nodes outside the chain (per vocabulary, per bank), or all
        for k, ctx in enumerate(ctxs, 1):
            if ctx in chain or after_chain(ctx.node) != later:
                continue
            rep, label = _begin_node(store, plan, ctx.node, users, summary)
            _run_node(exp, store, ctx, STAGES[ctx.stage].items(ok_rows), ctx.node.ident in forced, rep, failed_here,
                      progress, wait, f"{label} ({k}/{n})", submit)
            _end_node(store, ctx.node, rep, f"{label} stage {k}/{n}", summary, journal)

    stage_by_stage(later=False)
    if chain:
        _run_chain(exp, store, plan, chain, ok_rows, forced, users, summary, failed_here, progress, wait, journal,
                   submit, submit_chain, [ctxs.index(c) + 1 for c in chain], n)
        stage_by_stage(later=True)
    if only is None or "scoring" in only:
        rows, notes, damaged = aggregate_scores(store, exp.name, plan, manifest, summary.run_id)
        summary.metrics.extend(rows)
        summary.notes.extend(notes)
        summary.damaged += damaged


def _run_chain(exp: Experiment, store: Store, plan: DatasetPlan, chain: Sequence[StageContext],
               ok_rows: list[dict[str, Any]], forced: set, users: Mapping, summary: RunSummary,
               failed_here: dict[tuple[str, str], set[str]], progress: bool, wait: bool, journal, submit: Submit,
               submit_chain: SubmitChain, positions: Sequence[int], n: int) -> None:
    """The chain's nodes fused (``flows.fused``): per node its missing items, whose inputs are stored or come
    earlier in the chain; then the chain batches; then, stage by stage, the items that were busy.

    A fused node's report spans its share of the chain: ``ended - started`` is the wall time of its parts of
    the chain batches (plus its stage-by-stage rest), so per-stage wall and fixed cost stay comparable."""
    reps, labels, todos = [], [], []
    coming: dict[tuple[str, str], set[str]] = {}  # node -> items the chain computes
    for ctx, k in zip(chain, positions):
        rep, label = _begin_node(store, plan, ctx.node, users, summary)
        todo = _todo(store, ctx.node, STAGES[ctx.stage].items(ok_rows), ctx.node.ident in forced, rep, failed_here,
                     coming)
        coming[ctx.node.ident] = {STAGES[ctx.stage].item_of(it) for it in todo}
        reps.append(rep)
        labels.append(label)
        todos.append(todo)
    active = [i for i, todo in enumerate(todos) if todo]  # an incremental run fuses only the stages it computes
    busy: dict[int, dict[str, str]] = {}
    if len(active) > 1:
        for i in active:
            reps[i].ended = reps[i].started  # its share of the chain's wall time is added per chain batch
        methods = ",".join(sorted({m for i in active for m in users.get(chain[i].node.ident, ())}))
        in_memory: dict[tuple[str, str], StageReport] = {}
        held = run_chains(exp, [chain[i] for i in active], [todos[i] for i in active], [reps[i] for i in active],
                          failed_here, progress, submit_chain, methods, in_memory)
        for rep in in_memory.values():  # computed in memory for their readers, never stored (persist: false)
            log.info("%s:%s (key %s, not persisted): %d computed in memory for their readers, %d failed, %d not done, "
                     "%.1f s of compute", rep.dataset, rep.stage, rep.key, rep.done, rep.failed, rep.skipped + rep.busy,
                     rep.seconds)
            summary.in_memory.append(rep)
        busy = {i: h for i, h in zip(active, held) if h}
    for i, (ctx, rep, label, todo, k) in enumerate(zip(chain, reps, labels, todos, positions)):
        if len(active) <= 1:  # nothing to fuse: stage by stage
            rep.started = time.time()  # its span is its own run, not also the nodes run before it
            _submit_todo(exp, store, ctx, todo, rep, failed_here, progress, wait, f"{label} ({k}/{n})", submit)
        elif busy.get(i):  # held by another live run (or waiting on an input that is): stage by stage
            t0 = time.time()
            by_id = {str(it["image_id"]): it for it in todo}
            rest = StageReport(rep.dataset, rep.stage, rep.key)
            _run_node(exp, store, ctx, [by_id[iid] for iid in busy[i]], False, rest, failed_here, progress, wait,
                      f"{label} ({k}/{n})", submit)
            for f in ("done", "cached", "skipped", "busy", "failed", "seconds"):
                setattr(rep, f, getattr(rep, f) + getattr(rest, f))
            rep.failures += rest.failures
            rep.ended += time.time() - t0
        fused = len(active) > 1  # a fused node's span is its share of the chains; a node with nothing to do has none
        _end_node(store, ctx.node, rep, f"{label} stage {k}/{n}", summary, journal,
                  ended=(rep.ended if i in active else rep.started) if fused else None)


def _begin_node(store: Store, plan: DatasetPlan, node, users: Mapping, summary: RunSummary
                ) -> tuple[StageReport, str]:
    """A node's report and label; its stage registered, touched and its stored outputs checked."""
    methods = ",".join(sorted(users.get(node.ident, ())))
    label = f"{plan.dataset.name}:{node.stage}[{methods}]"
    rep = StageReport(plan.dataset.name, node.stage, node.key, started=time.time(), methods=methods)
    store.register_stage(node.stage_key, random_weights=node.random_weights)  # also rewrites a damaged stage.json
    store.touch(node.stage, node.key, summary.run_id)  # the storage budget evicts least recently used sets
    repaired = store.check_presence(node.stage, node.key)
    if repaired:
        summary.notes.append(f"{plan.dataset.name}:{node.stage} {node.key}: {len(repaired)} stored outputs were "
                             f"missing or truncated ({repaired[0][1]}, ...): recomputed now")
    return rep, label


def _end_node(store: Store, node, rep: StageReport, label: str, summary: RunSummary, journal,
              ended: float | None = None) -> None:
    """A node's completion state listed once (fresh for this run's later checks, compacted when due); reported."""
    state = store.state(node.stage, node.key)  # one listing: what the workers wrote
    store.mark_fresh(node.stage, node.key)  # downstream checks in this run need no other listing
    if state.damaged and not (rep.failed or rep.skipped or rep.busy):  # its items are complete again
        for path in store.remove_damaged_records(node.stage, node.key):
            summary.notes.append(f"removed the unreadable completion record {path}: its items are complete again")
    if state.uncovered_records() >= COMPACT_AFTER:  # later runs read one index instead of many records
        state.compact()
    rep.ended = time.time() if ended is None else ended
    log.info("%s (key %s): %d computed, %d cached, %d failed, %d not done, %.1f s of compute",
             label, node.key, rep.done, rep.cached, rep.failed, rep.skipped + rep.busy, rep.seconds)
    summary.stages.append(rep)
    journal.stage(f"{rep.dataset}/{node.stage}/{node.key}", done=rep.done, cached=rep.cached,
                  failed=rep.failed, skipped=rep.skipped, busy=rep.busy, total=rep.total, ended=rep.ended)


def _todo(store: Store, node, items: list[dict[str, Any]], forced: bool, rep: StageReport,
          failed_here: dict[tuple[str, str], set[str]], coming: Mapping[tuple[str, str], set[str]] | None = None
          ) -> list[dict[str, Any]]:
    """The node's items to compute: not complete, every input available (stored, or in ``coming``: computed
    earlier in the same chain); the others are counted (cached, or skipped naming the missing input)."""
    coming = coming or {}
    rep.total = len(items)
    state = store.state(node.stage, node.key)
    if forced:
        store.drop_items(node.stage, node.key, [it["image_id"] for it in items], reason="--force")
    ready = items
    # a whole-bank item (bank_index) reads what its images have; an image whose upstream failed is reported there
    whole = STAGES[node.stage].per == "bank"
    for role, up in ({} if whole else node.upstream).items():
        up_done = _available(store, up, coming)
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
    rep.cached += len(ready) - len(todo)
    return todo


def _available(store: Store, node, coming: Mapping[tuple[str, str], set[str]]) -> set[str] | None:
    """``flows.batches.available`` counting the items a chain computes before its reader (``coming``): a node that
    is not persisted can be computed on demand where its per-image inputs will be there (None: every item)."""
    got = available(store, node)
    if not coming or got is None:
        return got
    if node.persist:
        return got | coming.get(node.ident, set())
    out: set[str] | None = None
    for up in node.upstream.values():
        if STAGES[up.stage].per == "image" and (more := _available(store, up, coming)) is not None:
            out = more if out is None else out & more
    return None if out is None else got | out


def _run_node(exp: Experiment, store: Store, ctx: StageContext, items: list[dict[str, Any]], forced: bool,
              rep: StageReport, failed_here: dict[tuple[str, str], set[str]], progress: bool, wait: bool,
              label: str, submit: Submit) -> None:
    _submit_todo(exp, store, ctx, _todo(store, ctx.node, items, forced, rep, failed_here), rep, failed_here, progress,
                 wait, label, submit)


def _submit_todo(exp: Experiment, store: Store, ctx: StageContext, todo: list[dict[str, Any]], rep: StageReport,
                 failed_here: dict[tuple[str, str], set[str]], progress: bool, wait: bool, label: str,
                 submit: Submit) -> None:
    """The node's ``todo`` in batches, waiting for (or reporting) the items another live run holds."""
    if not todo:
        return
    bar = progress_bar(len(todo), label, enabled=progress, interval=exp.runner.progress_seconds, leave=True,
                       dynamic_ncols=True)
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
