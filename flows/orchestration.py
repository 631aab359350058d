"""The Prefect side of a run: flow run name, parameters, tags, final state, artifacts, logs.

``run_experiment`` (``flows.pipeline``) runs its work inside :func:`run_in_flow`, which makes
one Prefect flow run per ovseg run:

- name ``<experiment> <run_id>`` (flow ``ovseg``); parameters ``experiment``,
  ``experiment_file``, ``store``, ``run_id``, ``overrides``, ``force``, ``only_stages``,
  ``max_failed``; tags ``ovseg``, ``experiment:<name>``, ``dataset:<name>`` per dataset,
  ``method:<name>`` per method (task runs inherit them);
- task runs ``<stage>[<dataset>] batch i/n`` (one per batch);
- ovseg's log lines in the run's logs, at the CLI's verbosity (``flows.logs``);
- artifacts (keys end with the experiment name, so the Artifacts page keeps one history per
  experiment): ``ovseg-scores-<experiment>`` (mIoU / aAcc per dataset and method),
  ``ovseg-failures-<experiment>`` (dataset, stage, methods, image, error: every failed or
  skipped image of the run, ``all`` methods for an image that could not be read; empty when
  none) and ``ovseg-report-<experiment>`` (the report's
  path, when the run wrote one);
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

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.config import Experiment

log = logging.getLogger("ovseg.flows")

DEFAULT_MAX_FAILED = 0.1  # fraction of a run's images that may fail while its flow run stays Completed ("Partial")
FLOW_NAME = "ovseg"
NOT_FAILURES = ("Busy",)  # failure kinds that leave an item for a later run instead of failing it


def prefect_configured() -> bool:
    """True when a Prefect API is configured (``PREFECT_API_URL`` in the environment or the profile)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


def slug(name: str) -> str:
    """An artifact-key-safe form of a name (lowercase letters, digits, dashes)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", name.lower())).strip("-") or "run"


def run_tags(exp: Experiment) -> list[str]:
    """The flow run's tags: ``ovseg``, ``experiment:<name>``, ``dataset:<name>``..., ``method:<name>``..., and
    ``set:<KEY>=<VALUE>`` for each ``--set`` override."""
    return (["ovseg", f"experiment:{exp.name}"] + [f"dataset:{d.name}" for d in exp.datasets]
            + [f"method:{m.name}" for m in exp.methods] + [f"set:{o}" for o in exp.provenance.overrides])


def failed_images(summary) -> set[tuple[str, str]]:
    """``(dataset, image_id)`` of every image that failed (or was skipped after a failure) in the run."""
    return {(s.dataset, iid) for s in summary.stages for iid, kind, _ in s.failures if kind not in NOT_FAILURES}


def final_state(summary, max_failed: float = DEFAULT_MAX_FAILED):
    """The flow run's final state for a finished run (see the module docstring)."""
    from prefect.states import Completed, Failed

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
    text = (f"{bad} of {total} image(s) failed ({100 * bad / total:.1f} %); {counts}; "
            f"see the ovseg-failures-{slug(summary.experiment)} artifact or `ovseg runs --failures {summary.run_id}`")
    if bad / total > max_failed:
        return Failed(message=f"{text}; more than max_failed={max_failed:g} of the images")
    return Completed(name="Partial", message=text)


def _pct(v: float | None) -> str:
    return "nan" if v is None else f"{100 * v:.2f}"


def publish_artifacts(summary, manifests: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Scores, failures and report artifacts of the current flow run (see the module docstring)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

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
        path = Path(summary.report).resolve()
        create_markdown_artifact(f"Report of experiment **{summary.experiment}**, run `{summary.run_id}`:\n\n"
                                 f"[{path}]({path.as_uri()})\n", key=f"ovseg-report-{key}",
                                 description=f"HTML report written by run {summary.run_id}")


_RUNS: dict[str, tuple[Callable[[Callable], dict], Any, float, dict[str, Any]]] = {}  # run id -> body, summary, ...


def _flow_body(run_id: str, experiment: str, experiment_file: str, store: str):
    """The work of the flow run of ``run_id`` (looked up here: the flow object itself holds nothing that cannot be
    pickled, since Dask ships it with every task)."""
    from flows.logs import forward_to_run_logs

    body, summary, max_failed, done = _RUNS[run_id]
    with forward_to_run_logs():
        log.info("run %s of experiment %s (%s) on store %s", run_id, experiment, experiment_file or "no file", store)
        manifests = body(_submit_task)
        publish_artifacts(summary, manifests)
        state = final_state(summary, max_failed)
        done["state"] = state
        (log.warning if state.is_failed() or state.name == "Partial" else log.info)(
            "run %s: %s: %s", run_id, state.name, state.message)
    return state


def _ovseg(experiment: str, experiment_file: str, store: str, run_id: str, overrides: list[str],
           force: list[str], only_stages: list[str] | None, max_failed: float):
    return _flow_body(run_id, experiment, experiment_file, store)


def run_in_flow(exp: Experiment, summary, body: Callable[[Callable], dict], experiment_file: str,
                force: Sequence[str], only: Sequence[str] | None, max_failed: float):
    """Run ``body(submit)`` as the flow run of ``summary.run_id``; returns the final Prefect state.

    ``body`` receives the ``submit(ctx, rows, name)`` function that runs one batch as a Prefect
    task and returns the manifests it ingested. An exception raised by ``body`` is re-raised
    here (the flow run is ``Failed`` with it).
    """
    from prefect import flow, tags

    from flows.runners import make_task_runner

    done: dict[str, Any] = {}
    _RUNS[summary.run_id] = (body, summary, max_failed, done)
    ovseg = flow(_ovseg, name=FLOW_NAME, flow_run_name=f"{exp.name} {summary.run_id}",
                 task_runner=make_task_runner(exp), log_prints=False, persist_result=False)
    try:
        with tags(*run_tags(exp)):
            state = ovseg(exp.name, experiment_file, summary.store, summary.run_id, list(exp.provenance.overrides),
                          list(force), list(only) if only is not None else None, max_failed, return_state=True)
    finally:
        _RUNS.pop(summary.run_id, None)
    if "state" not in done:  # the body raised: re-raise its exception
        state.result(raise_on_failure=True)
        raise RuntimeError(f"the flow run of run {summary.run_id} ended in state {state.name}: {state.message}")
    summary.state = state.name
    return state


def _submit_task(ctx, rows, name: str):
    """One batch as a Prefect task run named ``name``; returns its future.

    The task run carries no tags: the flow run's tags would be inherited, and Prefect then asks
    the server for tag concurrency slots at the start of every task run (one more round trip per
    batch, measured stalling a stage by 2-3 s while the server was busy).
    """
    from prefect.context import TagsContext

    from tasks.prefect_tasks import stage_batch

    with TagsContext(current_tags=set()):
        return stage_batch.with_options(task_run_name=name).submit(ctx, rows)
