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

Steps 2-4 are ``flows.execute.execute``, run inside one Prefect flow run
(``flows.orchestration``: the flow receives the request as plain parameters; name, tags,
logs, artifacts, final state); with ``orchestrate=False`` they run without Prefect, each batch
through the same executor (``tasks.executor.run_batch``) in a local thread pool, which costs
no Prefect start-up (``ovseg segment`` without a configured Prefect server). With one worker
(``runner.workers: 1``) there is no pool: the calling thread runs each batch itself
(``flows.runners.InlineExecutor``; a Prefect flow calls its task runs in the flow's thread
likewise), so that a program that ran torch in that thread before (a notebook) does not pay GNU OpenMP's
throttling of a second thread pool (docs/design.md, "OpenMP on a shared machine": a 300-image
bank build took 1.7x as long).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flows.config import Experiment
from flows.emptiness import EmptyDatasetError
from flows.execute import RunRequest, execute, new_run_id, validate
from flows.ingest import plan_status
from flows.runners import InlineExecutor, computes_inline
from flows.summary import (
    DEFAULT_MAX_FAILED,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    RunSummary,
    StageReport,
)
from tasks.chain import run_chain
from tasks.executor import run_batch
from tasks.stages import STAGE_ORDER


def run_experiment(exp: Experiment, force: Iterable[str] = (), dry_run: bool = False, progress: bool = True,
                   only_stages: Iterable[str] | None = None, wait: bool = True,
                   experiment_file: str | None = None, orchestrate: bool = True, report_dir: str | None = None,
                   max_failed: float | None = None) -> RunSummary:
    """Run (or plan, with ``dry_run``) an experiment. ``force`` recomputes the named stages and their dependants.

    ``only_stages`` restricts the run to the named stages (``ovseg stage NAME``); their inputs
    must then already be complete (items without them are reported, and the run is incomplete).
    ``orchestrate`` runs the work as a Prefect flow run (False: local threads, no Prefect);
    ``report_dir`` writes the HTML report of the experiment there at the end; ``max_failed``
    (default ``flows.summary.DEFAULT_MAX_FAILED``) is the fraction of failed images above
    which the flow run is ``Failed`` rather than ``Completed`` named ``Partial``.
    """
    force = tuple(force)
    only = tuple(only_stages) if only_stages is not None else None
    max_failed = DEFAULT_MAX_FAILED if max_failed is None else float(max_failed)
    if not 0.0 <= max_failed <= 1.0:
        raise ValueError(f"max_failed must be a fraction in [0, 1], got {max_failed}")
    if not dry_run and not orchestrate and exp.runner.kind != "local":
        raise ValueError(f"runner.kind {exp.runner.kind!r} needs Prefect; run with orchestration "
                         "(without --no-prefect) or use runner.kind: local")
    missing: list[str] | None = [] if dry_run else None
    plans = validate(exp, force, only, missing)
    request = RunRequest(exp, new_run_id(), force, only, wait, progress, report_dir, experiment_file or "")
    if dry_run:
        summary = RunSummary(request.run_id, exp.name, "")
        summary.random_weights = any(n.random_weights for p in plans for n in p.nodes.values())
        summary.notes += [f"missing: {m}; a run needs it (the plan shows what it would compute)"
                          for m in dict.fromkeys(missing or [])]
        return plan_status(exp, plans, force, summary)
    if orchestrate:
        from flows.orchestration import run_in_flow  # Prefect is imported only by runs that are flow runs

        return run_in_flow(request, max_failed)
    with (InlineExecutor() if computes_inline(exp) else
          ThreadPoolExecutor(exp.runner.workers, thread_name_prefix="ovseg-batch")) as pool:
        summary, _ = execute(request, plans, lambda ctx, rows, name: pool.submit(run_batch, ctx, rows),
                             lambda ctxs, rows, name: pool.submit(run_chain, ctxs, rows))
    return summary


__all__ = ["EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_OK", "EXIT_USAGE", "STAGE_ORDER", "EmptyDatasetError", "RunSummary",
           "StageReport", "run_experiment", "validate"]
