"""Logging for the ``ovseg`` command line and for Prefect runs.

One verbosity, set by ``-q`` / ``-v`` on any command, applies everywhere ovseg writes log
lines: the terminal and the logs of the Prefect flow run (the UI's Logs tab).

=========  =============  ==========================================================
flag       ovseg loggers  meaning
=========  =============  ==========================================================
``-q``     WARNING        failures and warnings only; no progress bars
(none)     INFO           one line per stage output set, the run's outcome; bars
``-v``     DEBUG          plus per-batch and per-item detail, tracebacks of failures
=========  =============  ==========================================================

Libraries (httpcore, numcodecs, websockets, prefect, ...) stay at WARNING at
every verbosity. Terminal lines are written through ``tqdm.write`` so they never break a
progress bar. Prefect's "Still processing items" warnings (its event and log services
draining at exit; nothing is lost) are dropped.

Progress (:func:`progress_bar`): a tqdm bar when stderr is a terminal (done / total, rate, elapsed and
remaining time); otherwise (output redirected to a log file, a pipe, a scheduler) no bar and no carriage
returns, but a plain ``INFO ovseg.progress`` line with the same figures and the expected end (UTC) every
``runner.progress_seconds`` (default ``PLAIN_PROGRESS_SECONDS``) while a stage or a fused chain works.

Inside a flow run, :func:`forward_to_run_logs` sends the records of ovseg's loggers
(``OVSEG_LOGGERS``) to Prefect's API log handler, attached to the flow run (and to the task
run when the record comes from a task's thread); records from ovseg's own loader and writer
threads, which carry no Prefect context, are attached to the flow run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from typing import Any

from tasks.progress import PLAIN_PROGRESS_SECONDS, PlainProgress

OVSEG = "ovseg"
# ovseg's loggers: "ovseg.*", and the package names for modules that log under ``__name__``
OVSEG_LOGGERS = (OVSEG, "ovseg_core", "storage", "tasks", "flows")
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # verbosity -> ovseg logger level
LIBRARY_LEVEL = logging.WARNING  # every other logger, at every verbosity
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _QuietLibraryNoise(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning: ovseg builds every CLIP without
    pretrained weights and then loads the checkpoint itself (or deliberately keeps random weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("No pretrained weights loaded for model"):
            return False
        # Prefect's EventsWorker / APILogWorker announce every 4 s while they drain their queue at exit
        return not msg.startswith("Still processing items")


class TqdmLogHandler(logging.StreamHandler):
    """A stderr handler that writes through ``tqdm.write`` (progress bars stay intact).

    Its public class name matters: Prefect's logging set-up keeps a root logger that has a
    handler of a public class, and replaces one whose handlers' classes start with ``_``.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def verbosity(verbose: bool, quiet: bool) -> int:
    """-1 (``-q``), 0 or 1 (``-v``); both flags together are a usage error."""
    if verbose and quiet:
        raise ValueError("-v/--verbose and -q/--quiet exclude each other; pass one of them")
    return 1 if verbose else -1 if quiet else 0


def configure_logging(level: int) -> None:
    """Set up terminal logging for one CLI invocation (idempotent: earlier ovseg handlers are replaced).

    Args:
        level: verbosity, a key of ``LEVELS``.
    """
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {sorted(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, TqdmLogHandler)]:
        root.removeHandler(h)
    handler = TqdmLogHandler()
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handler.addFilter(_QuietLibraryNoise())
    root.addHandler(handler)
    root.setLevel(LIBRARY_LEVEL)
    for name in OVSEG_LOGGERS:
        logging.getLogger(name).setLevel(LEVELS[level])
    for name in ("httpx", "httpcore", "numcodecs", "websockets", "asyncio", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(LIBRARY_LEVEL)


class RunLogForwarder(logging.Handler):
    """Sends ``ovseg`` records to the Prefect API as logs of one flow run.

    Args:
        flow_run_id: the flow run the records of threads without a Prefect context belong to.
    """

    def __init__(self, flow_run_id: str):
        from prefect.logging.handlers import APILogHandler

        super().__init__(logging.NOTSET)
        self.flow_run_id = flow_run_id
        self._api = APILogHandler()
        self._api.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        out = copy.copy(record)  # other handlers keep the record as it was
        task, flow = TaskRunContext.get(), FlowRunContext.get()
        if task is not None:
            out.flow_run_id, out.task_run_id = task.task_run.flow_run_id, task.task_run.id
        elif flow is not None and flow.flow_run is not None:
            out.flow_run_id = flow.flow_run.id
        else:
            out.flow_run_id = self.flow_run_id
        self._api.handle(out)

    def flush(self) -> None:
        self._api.flush()


@contextlib.contextmanager
def forward_to_run_logs() -> Iterator[None]:
    """Inside a flow run: records of ovseg's loggers also go to the flow run's logs (at their level)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        yield
        return
    handler = RunLogForwarder(str(ctx.flow_run.id))
    loggers = [logging.getLogger(name) for name in OVSEG_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.flush()


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img",
                 interval: float = PLAIN_PROGRESS_SECONDS, **tqdm_options: Any):
    """A tqdm bar on a terminal, a :class:`PlainProgress` elsewhere, a disabled bar when not ``enabled``.

    Args:
        total: items to do.
        desc: what is being done (the stage label).
        enabled: False for ``-q`` and library calls with ``progress=False``.
        unit: item unit shown.
        interval: seconds between the plain progress lines (not a terminal; ``runner.progress_seconds``).
        tqdm_options: more tqdm arguments (terminal only).
    """
    from tqdm.auto import tqdm

    if enabled and not _stderr_is_terminal():
        return PlainProgress(total, desc, unit, interval)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, **tqdm_options)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
