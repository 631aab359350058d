"""What a run did, in one place below the pipeline: per-stage reports, the run summary, exit codes,
and the tables ``ovseg run`` / ``ovseg demo`` print."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.stages import STAGE_ORDER, STAGES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_STORAGE = 0, 1, 2, 3, 4
DEFAULT_MAX_FAILED = 0.1  # fraction of a run's images that may fail while its flow run stays Completed ("Partial")


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
    # inputs not persisted (``persist: false``) that fused chains computed in memory for their readers: what was
    # computed and its seconds, never stored (not in ``stages``: they count neither as computed nor in the status)
    in_memory: list[StageReport] = field(default_factory=list)
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


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Print left-aligned columns as wide as their widest cell (cells are never cut)."""
    cols = [list(map(str, c)) for c in zip(header, *rows)] if rows else [[h] for h in header]
    widths = [max(len(x) for x in c) for c in cols]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def print_summary(summary: RunSummary) -> None:
    """The per-stage table of a run: dataset, stage, key, images, computed, cached, not done, failed, seconds; then
    the inputs that fused chains computed in memory and did not store."""
    rows = [(s.dataset, s.stage, s.key, s.total, s.done, s.cached, s.skipped + s.busy, s.failed, f"{s.seconds:.1f}")
            for s in summary.stages]
    rows += [(s.dataset, f"{s.stage} (in memory, not stored)", s.key, s.total, s.done, "-", s.skipped + s.busy,
              s.failed, f"{s.seconds:.1f}") for s in summary.in_memory]
    print_table(rows, ["dataset", "stage", "key", "images", "computed", "cached", "not done", "failed", "seconds"])


def stage_legend(stages: Iterable[str]) -> list[str]:
    """One line per stage named (table order, once each): its name and what it computes (``Stage.description``)."""
    named = set(stages)
    width = max((len(s) for s in named if s in STAGES), default=0)
    return [f"  {s.ljust(width)}  {STAGES[s].description}" for s in STAGE_ORDER if s in named]


def print_plan(summary: RunSummary, experiment: str) -> None:
    """The ``--dry-run`` table: per stage output set, images to compute and cached, the methods using it."""
    print(f"plan for experiment {experiment} (store {summary.store}; nothing was written):")
    rows = [(s.dataset, s.stage, s.key, s.done, s.cached, s.methods) for s in summary.stages]
    print_table(rows, ["dataset", "stage", "key", "to compute", "cached", "used by"])
    for note in summary.notes:
        print(f"note: {note}")


def print_run(summary: RunSummary) -> None:
    """What ``ovseg run`` prints at the end: the stage table, the scores, notes, the outcome and the failures."""
    print_summary(summary)
    if summary.metrics:
        print()
        rows = [(m["dataset"], m["method"], f"{100 * m['miou']:.2f}" if m["miou"] is not None else "nan",
                 f"{100 * m['aacc']:.2f}" if m["aacc"] is not None else "nan",
                 f"{m['images']}/{m['images_total']}" + ("" if m["complete"] else " (partial)"))
                for m in summary.metrics if m["class_index"] == -1]
        print_table(rows, ["dataset", "method", "mIoU", "aAcc", "images scored"])
    for note in summary.notes:
        print(f"note: {note}")
    if summary.random_weights:
        print("\nNOTE: random-weight backbones were used: scores are at chance level and are NOT method results.")
    failures = [(s.stage, f[0], f[1], f[2]) for s in summary.stages for f in s.failures]
    state = f" (Prefect state {summary.state})" if summary.state else ""
    print(f"\nrun {summary.run_id}: {summary.status}{state}: {summary.computed} outputs computed, {summary.failed} failed, "
          f"{summary.incomplete} left for a later run")
    for stage, iid, etype, err in failures[:20]:
        print(f"  {stage} {iid}: {etype}: {err}")
    if len(failures) > 20:
        print(f"  ... {len(failures) - 20} more (see `ovseg runs --failures {summary.run_id}`)")
    if summary.report:
        print(f"report: {summary.report}")
