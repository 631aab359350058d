"""What the subcommands share: tables, sizes, experiment loading with ``--set``, read-only stores."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def human(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KB``, ``3.2 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def load_exp(args: argparse.Namespace):
    """The experiment of ``args.experiment`` with the ``--set`` overrides and ``--store`` applied."""
    from flows.config import load_experiment

    exp = load_experiment(args.experiment, overrides=getattr(args, "overrides", None) or ())
    if getattr(args, "store", None):
        exp = exp.model_copy(update={"store": args.store})
    return exp


def read_only_store(location: str | None):
    """An existing store (``StoreNotFoundError``, exit 2, when there is none: nothing is created)."""
    from storage.store import Store

    return Store(location, create=False)


def check_stages(names: Sequence[str]) -> None:
    """Every name is a stage (``ValueError`` with a did-you-mean and the stage list otherwise)."""
    if names:
        from tasks.stages import get_stage

        for name in names:
            get_stage(name)
