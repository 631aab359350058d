"""The Prefect side of a run: flow run name, parameters, tags, final state, artifacts, logs.

One ovseg run is one Prefect flow run of :func:`ovseg_run`, whose parameters are plain data
and are everything it uses: it loads the experiment (``config``, or ``experiment_file`` with
``overrides`` when run by a deployment), validates it, runs it (``flows.execute.execute``)
with the experiment's task runner and ends in a state that says how it went.
``run_experiment`` (``flows.pipeline``) calls it through :func:`run_in_flow`; ``ovseg serve``
serves it as a deployment (``flows.serve``), so a scheduled run is one flow run too:

- name ``<experiment> <run_id>`` (flow ``ovseg``, ``ovseg-scheduled`` when served); parameters
  ``experiment``, ``experiment_file``, ``store``, ``run_id``, ``overrides``, ``force``,
  ``only_stages``, ``max_failed``, ``config`` (the experiment), ``report_dir``, ``wait``,
  ``progress``; tags ``ovseg``, ``experiment:<name>``, ``dataset:<name>`` per dataset,
  ``method:<name>`` per method;
- task runs ``<dataset>:<stage>[<methods>] batch i/n`` (one per batch; the methods whose
  results depend on the stage output), and with ``runner.fuse`` (default) for a dataset's
  per-image stages ``<dataset>:<stage>+<stage>+...[<methods>] batch i/n`` (one fused chain batch per batch of images);
- ovseg's log lines in the run's logs, at the CLI's verbosity (``flows.logs``);
- artifacts (keys end with the experiment name, so the Artifacts page keeps one history per
  experiment): ``ovseg-scores-<experiment>`` (mIoU / aAcc per dataset and method),
  ``ovseg-failures-<experiment>`` (dataset, stage, methods, image, error: every failed or
  skipped image of the run, ``all`` methods for an image that could not be read; empty when
  none) and, when the run wrote a report, ``ovseg-report-<experiment>`` (the scores and the
  report's path, as text: the UI cannot open local files);
- a final state that says how the run went (exit codes unchanged):

  =====================================  =========================================  ====
  outcome                                 flow run state                             exit
  =====================================  =========================================  ====
  every item done                         ``Completed``                              0
  items left for a later run (busy,       ``Completed`` named ``Incomplete``         3
  missing inputs, damaged outputs)
  some images failed, at most             ``Completed`` named ``Partial``            1
  ``max_failed`` of the run's images
  more than ``max_failed`` failed         ``Failed``                                 1
  (e.g. a backbone that cannot load)
  an error stopped the run (e.g. a        ``Failed`` (the exception)                 2
  dataset without images)
  =====================================  =========================================  ====

  The message of the state counts the failed images and names the failures artifact.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TagsContext
from prefect.states import Completed, Failed, State

from flows.config import Experiment, load_experiment
from flows.execute import RunRequest, execute, run_id_at, validate
from flows.logs import forward_to_run_logs
from flows.runners import InlineExecutor, computes_inline, make_task_runner
from flows.summary import DEFAULT_MAX_FAILED, RunSummary
from storage.paths import resolve_location
from tasks.prefect_tasks import chain_batch, stage_batch
from tasks.stages import STAGES

log = logging.getLogger("ovseg.flows")

FLOW_NAME = "ovseg"
NOT_FAILURES = ("Busy",)  # failure kinds that leave an item for a later run instead of failing it


def slug(name: str) -> str:
    """An artifact-key-safe form of a name (lowercase letters, digits, dashes)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", name.lower())).strip("-") or "run"


def run_tags(exp: Experiment) -> list[str]:
    """The flow run's tags: ``ovseg``, ``experiment:<name>``, ``dataset:<name>``..., ``method:<name>``..., and
    ``set:<KEY>=<VALUE>`` for each ``--set`` override."""
    return (["ovseg", f"experiment:{exp.name}"] + [f"dataset:{d.name}" for d in exp.datasets]
            + [f"method:{m.name}" for m in exp.methods] + [f"set:{o}" for o in exp.provenance.overrides])


def _per_image(stage: str) -> bool:
    return stage not in STAGES or STAGES[stage].per == "image"  # "ingest" reports images too


def failed_images(summary) -> set[tuple[str, str]]:
    """``(dataset, image_id)`` of every image that failed (or was skipped after a failure) in the run.

    The item of a per-vocabulary stage (``text_embeddings``) is not an image: see :func:`failed_vocabularies`."""
    return {(s.dataset, iid) for s in summary.stages if _per_image(s.stage)
            for iid, kind, _ in s.failures if kind not in NOT_FAILURES}


def failed_vocabularies(summary) -> set[str]:
    """Datasets whose vocabulary item failed in the run (none of their images can be scored)."""
    return {s.dataset for s in summary.stages if not _per_image(s.stage)
            for _, kind, _ in s.failures if kind not in NOT_FAILURES}


def final_state(summary: RunSummary, max_failed: float = DEFAULT_MAX_FAILED) -> State:
    """The flow run's final state for a finished run (see the module docstring)."""
    if not 0.0 <= max_failed <= 1.0:
        raise ValueError(f"max_failed must be a fraction in [0, 1], got {max_failed!r}")
    counts = f"{summary.computed} outputs computed"
    if summary.status == "complete":
        return Completed(message=f"{counts}; every item of the experiment is complete")
    if summary.status == "incomplete":
        return Completed(name="Incomplete", message=f"{counts}; {summary.incomplete} item(s) left for a later run "
                                                    "(busy elsewhere, missing inputs or damaged outputs)")
    bad = len(failed_images(summary))
    total = max(1, sum(summary.images.values()))
    vocab = sorted(failed_vocabularies(summary))
    text = (f"{bad} of {total} image(s) failed ({100 * bad / total:.1f} %); {counts}; "
            f"see the ovseg-failures-{slug(summary.experiment)} artifact or `ovseg runs --failures {summary.run_id}`")
    if vocab:
        return Failed(message=f"the vocabulary of {', '.join(vocab)} failed (no image of it can be scored); {text}")
    if bad / total > max_failed:
        return Failed(message=f"{text}; more than max_failed={max_failed:g} of the images")
    return Completed(name="Partial", message=text)


def _pct(v: float | None) -> str:
    return "nan" if v is None else f"{100 * v:.2f}"


def publish_artifacts(summary: RunSummary, manifests: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Scores, failures and report artifacts of the current flow run (see the module docstring)."""
    key = slug(summary.experiment)
    note = " (random-weight backbones: NOT method results)" if summary.random_weights else ""
    scores = [{"dataset": m["dataset"], "method": m["method"], "mIoU": _pct(m["miou"]), "aAcc": _pct(m["aacc"]),
               "images scored": f"{m['images']}/{m['images_total']}", "complete": bool(m["complete"]),
               "random weights": bool(m["random_weights"])}
              for m in summary.metrics if m["class_index"] == -1]
    create_table_artifact(scores, key=f"ovseg-scores-{key}",
                          description=f"Scores of run {summary.run_id} of experiment {summary.experiment}{note}")
    paths = {(name, str(r["image_id"])): str(r.get("rel_path") or r["image_id"])
             for name, rows in manifests.items() for r in rows}
    failures = [{"dataset": s.dataset, "stage": s.stage, "methods": s.methods or "all",
                 "image": paths.get((s.dataset, iid), iid), "error": f"{kind}: {err}"}
                for s in summary.stages for iid, kind, err in s.failures]
    create_table_artifact(failures, key=f"ovseg-failures-{key}",
                          description=f"Failed and skipped images of run {summary.run_id} ({len(failures)})")
    if summary.report:
        create_markdown_artifact(report_markdown(summary, scores), key=f"ovseg-report-{key}",
                                 description=f"HTML report written by run {summary.run_id}")


def report_markdown(summary: RunSummary, scores: Sequence[Mapping[str, Any]]) -> str:
    """The report artifact: the scores as a table and where the report is, as text (the UI opens no local file)."""
    path = Path(summary.report or "").resolve()
    lines = [f"# Report of experiment {summary.experiment}", "",
             f"Run `{summary.run_id}` wrote its HTML report on the machine that ran it, at", "",
             f"    {path}", "", "Open that file in a browser there (or copy its folder: it is self-contained).", ""]
    if summary.random_weights:
        lines += ["**Random-weight backbones: these scores are NOT method results.**", ""]
    if scores:
        lines += ["| dataset | method | mIoU | aAcc | images scored |", "|---|---|---|---|---|"]
        lines += [f"| {s['dataset']} | {s['method']} | {s['mIoU']} | {s['aAcc']} | {s['images scored']} |"
                  for s in scores]
    else:
        lines.append("No scores (no dataset of the run has ground truth).")
    return "\n".join(lines) + "\n"


def flow_run_id_of_this_run() -> str:
    """The run id of a flow run started without one (by a deployment): its start time and its flow run id.

    The flow run's name and its body both derive it, from the same two values, before and after
    the run starts.
    """
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return run_id_at(when, uuid.UUID(str(flow_run.id)).hex)


def _flow_run_name() -> str:
    """``<experiment> <run_id>``."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = params.get("experiment") or Path(str(params.get("experiment_file") or "experiment")).stem
    return f"{name} {params.get('run_id') or flow_run_id_of_this_run()}"


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, log_prints=False, persist_result=False, validate_parameters=False)
def ovseg_run(experiment: str = "", experiment_file: str = "", store: str | None = None, run_id: str = "",
              overrides: list[str] | None = None, force: list[str] | None = None, only_stages: list[str] | None = None,
              max_failed: float = DEFAULT_MAX_FAILED, config: Experiment | None = None, report_dir: str | None = None,
              wait: bool = True, progress: bool = False) -> State:
    """One ovseg run as one flow run; returns its final state, whose data is the ``RunSummary``.

    Args:
        experiment: the experiment's name, for the flow run's name ("": the experiment file's stem).
        experiment_file: the experiment file; read (with ``overrides``) when ``config`` is None.
        store: store location replacing the experiment's (None: the experiment's).
        run_id: the run's id ("" for a new one, derived from this flow run).
        overrides: ``KEY=VALUE`` overrides (applied to the file when it is read here; recorded).
        force: stages recomputed with their dependants.
        only_stages: the stages run (None: all).
        max_failed: fraction of failed images above which the run is ``Failed`` (else ``Partial``).
        config: the validated experiment (None: read ``experiment_file``, as a deployment does).
        report_dir: folder for the HTML report written at the end (None: no report).
        wait: wait for items another live run holds.
        progress: progress bars on the terminal.
    Raises:
        whatever stopped the run (a bad experiment, a dataset without images): the flow run fails with it.
    """
    run_id = run_id or flow_run_id_of_this_run()
    exp = config if config is not None else load_experiment(experiment_file, overrides=overrides or ())
    if store:
        exp = exp.model_copy(update={"store": store})
    request = RunRequest(exp, run_id, tuple(force or ()), tuple(only_stages) if only_stages is not None else None,
                         wait, progress, report_dir, experiment_file)
    plans = validate(exp, request.force, request.only)
    with forward_to_run_logs(), experiment_task_runner(exp):
        log.info("run %s of experiment %s (%s) on store %s", run_id, exp.name, experiment_file or "no file",
                 resolve_location(exp.store))
        inline = computes_inline(exp)
        summary, manifests = execute(request, plans, partial(_submit_task, inline=inline),
                                     partial(_submit_chain_task, inline=inline))
        publish_artifacts(summary, manifests)
        state = final_state(summary, max_failed)
        (log.warning if state.is_failed() or state.name == "Partial" else log.info)(
            "run %s: %s: %s", run_id, state.name, state.message)
    return state.model_copy(update={"data": summary})


@contextlib.contextmanager
def experiment_task_runner(exp: Experiment) -> Iterator[Any]:
    """The experiment's task runner (``flows.runners``), started and made the current flow run's runner.

    The flow object itself names none: a deployment's flow is imported before its experiment is
    read, and the flow object (shipped with every Dask task) holds nothing but plain settings.
    """
    with make_task_runner(exp) as runner:
        ctx = FlowRunContext.get()
        if ctx is None:
            yield runner
            return
        with ctx.model_copy(update={"task_runner": runner}):
            yield runner


def run_in_flow(request: RunRequest, max_failed: float = DEFAULT_MAX_FAILED) -> RunSummary:
    """Run ``request`` as one flow run of the ovseg flow (``ovseg_run``).

    Returns the run's summary, its ``state`` set to the flow run's final state. An exception that stopped the run is re-raised here (the flow run is ``Failed`` with it).
    """
    exp = request.experiment
    with tags(*run_tags(exp)):
        state = ovseg_run(exp.name, request.experiment_file, resolve_location(exp.store), request.run_id,
                          list(exp.provenance.overrides), list(request.force),
                          list(request.only) if request.only is not None else None, max_failed, config=exp,
                          report_dir=request.report_dir, wait=request.wait, progress=request.progress,
                          return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, RunSummary):
        raise RuntimeError(f"the flow run of run {request.run_id} ended in state {state.name}: {state.message}")
    result.state = state.name
    return result


def _submit_task(ctx, rows, name: str, inline: bool = False):
    """One batch as a Prefect task run named ``name``; returns its future.

    The task run carries no tags: the flow run's tags would be inherited, and Prefect then asks
    the server for tag concurrency slots at the start of every task run (one more round trip per
    batch, measured stalling a stage by 2-3 s while the server was busy).

    ``inline`` (a local runner with one worker): the task run runs now, in the flow's thread, and
    the future returned is done: no task-runner thread computes beside the flow's (one GNU OpenMP
    pool; docs/design.md, "OpenMP on a shared machine").
    """
    return _run_task(stage_batch.with_options(task_run_name=name), inline, ctx, rows)


def _submit_chain_task(ctxs, rows, name: str, inline: bool = False):
    """One fused chain batch (``flows.fused``) as a Prefect task run named ``name``; returns its future (no tags,
    ``inline`` as ``_submit_task``)."""
    return _run_task(chain_batch.with_options(task_run_name=name), inline, ctxs, rows)


def _run_task(task, inline: bool, *args):
    with TagsContext(current_tags=set()):
        return InlineExecutor().submit(task, *args) if inline else task.submit(*args)
