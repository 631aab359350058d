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
from collections.abc import Iterable
from typing import Any

from flows.config import Experiment
from flows.emptiness import EmptyDatasetError
from flows.execute import _ingest_all, _run_dataset, new_run_id, validate
from flows.graph import method_users
from flows.summary import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, RunSummary, StageReport
from storage.store import Store
from tasks.runtime import RunSettings, open_store
from tasks.stages import STAGE_ORDER

log = logging.getLogger("ovseg.flows")


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


__all__ = ["EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_OK", "EXIT_USAGE", "STAGE_ORDER", "EmptyDatasetError", "RunSummary",
           "StageReport", "run_experiment", "validate"]
