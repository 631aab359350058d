"""``ovseg serve EXP.yaml --cron "0 1 * * *"``: the experiment as a Prefect deployment served by this process.

The deployment ``ovseg-scheduled/<name>`` runs the ovseg flow (``flows.orchestration.ovseg_run``)
on its schedule (or when triggered: ``prefect deployment run 'ovseg-scheduled/<name>'``). Each
run is one flow run ``<experiment> <run_id>`` with the usual parameters, tags, task runs, logs,
artifacts and final state: it reads the experiment file again (with the same ``--set``
overrides), re-ingests its datasets (unchanged files keep their manifest rows without being
read) and computes only the items that are not complete in the store: the images added or
changed since the last run, and anything a new parameter value needs.

Flow runs execute in a child process that imports ``flows.serve`` by module path: run
``ovseg serve`` where ``flows`` is importable (an installed ovseg, or the repository root).
For a work pool and ``prefect deploy`` instead of a serving process see docs/prefect.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron, Interval

from flows.config import load_experiment
from flows.orchestration import ovseg_run, run_tags
from flows.summary import DEFAULT_MAX_FAILED

log = logging.getLogger("ovseg.flows")

SERVE_FLOW = "ovseg-scheduled"

# The served flow: the ovseg flow under the deployment's flow name. A serving process imports it by the module
# path of the flow object (``flows.serve.scheduled_run``), which these names give.
scheduled_run = ovseg_run.with_options(name=SERVE_FLOW)
scheduled_run.__module__, scheduled_run.__name__, scheduled_run.__qualname__ = __name__, "scheduled_run", "scheduled_run"


def serve_experiment(experiment_file: str, cron: str | None = None, interval: float | None = None,
                     overrides: list[str] | None = None, store: str | None = None, name: str | None = None,
                     report_dir: str | None = None, max_failed: float | None = None, timezone: str | None = None) -> None:
    """Create (or update) the deployment ``ovseg-scheduled/<name>`` and serve it until interrupted.

    Args:
        experiment_file: the experiment YAML (made absolute).
        cron: cron schedule (e.g. ``"0 1 * * *"``) in ``timezone``; exclusive with ``interval``.
        interval: seconds between runs; exclusive with ``cron``.
        overrides: ``--set`` overrides passed to every run.
        store: store location for every run (None: the file's).
        name: deployment name (None: the experiment's name).
        report_dir: report folder written by every run (None: no report).
        max_failed: fraction of failed images above which a run is ``Failed`` (else ``Partial``).
        timezone: IANA time zone of the cron schedule (None: UTC).
    """
    if (cron is None) == (interval is None):
        raise ValueError("serve needs exactly one schedule: --cron \"0 1 * * *\" or --interval SECONDS")
    if interval is not None and interval <= 0:
        raise ValueError(f"--interval must be > 0 seconds, got {interval}")
    path = str(Path(experiment_file).expanduser().resolve())
    exp = load_experiment(path, overrides=overrides or ())
    schedule = Cron(cron, timezone=timezone) if cron is not None else Interval(interval, timezone=timezone)
    params = {"experiment": exp.name, "experiment_file": path, "overrides": list(overrides or []),
              "store": str(Path(store).expanduser().resolve()) if store and "://" not in store else store,
              "report_dir": str(Path(report_dir).expanduser().resolve()) if report_dir else None,
              "max_failed": DEFAULT_MAX_FAILED if max_failed is None else max_failed}
    log.info("serving %s as deployment %s/%s (%s)", path, SERVE_FLOW, name or exp.name,
             f"cron {cron!r}" if cron else f"every {interval:g} s")
    scheduled_run.serve(name=name or exp.name, schedules=[schedule], parameters=params, tags=run_tags(exp),
                        description=f"ovseg experiment {exp.name} from {path}: each run ingests again and computes "
                                    "only new or changed images", entrypoint_type=EntrypointType.MODULE_PATH)
