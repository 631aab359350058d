"""What the subcommands share: tables, sizes, experiment loading with ``--set``, read-only stores."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from storage.store import Store

if TYPE_CHECKING:
    from flows.config import Experiment


def human(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KB``, ``3.2 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def load_exp(args: argparse.Namespace) -> "Experiment":
    """The experiment of ``args.experiment`` with the ``--set`` overrides and ``--store`` applied."""
    from flows.config import load_experiment  # pydantic models: 0.35 s that runs / cache ls / --help do not need

    exp = load_experiment(args.experiment, overrides=getattr(args, "overrides", None) or ())
    if getattr(args, "store", None):
        exp = exp.model_copy(update={"store": args.store})
    return exp


def read_only_store(location: str | None) -> Store:
    """An existing store (``StoreNotFoundError``, exit 2, when there is none: nothing is created)."""
    return Store(location, create=False)
