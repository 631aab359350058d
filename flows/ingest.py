"""Ingestion inside a run, and the ``--dry-run`` plan table."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flows.emptiness import empty_dataset_error, root_error
from flows.graph import DatasetPlan, descendants, method_users
from flows.summary import StageReport
from storage.ingest import ManifestRow, ingest, ingest_files
from storage.store import Store, StoreNotFoundError
from storage.tables import read_table, write_table
from tasks.stages import STAGES

log = logging.getLogger("ovseg.flows")


def ingest_dataset(store: Store | None, plan: DatasetPlan, progress: bool = True, write: bool = True
                   ) -> list[dict[str, Any]]:
    """Build (and with ``write``, store) the manifest of one dataset; returns its rows (dicts).

    The stored manifest of an earlier run lets unchanged files (same size and mtime) skip
    decoding and hashing; an unreadable stored manifest is only a warning (it is rebuilt).
    """
    ds = plan.dataset
    if ds.layout == "folder" and Path(ds.root).is_file():
        rows = ingest_files([ds.root], dataset=ds.name, max_pixels=ds.max_pixels)
    else:
        dataset = ds.name if ds.layout == "folder" else ds.spec
        previous = []
        if store is not None and ds.name in store.table_names("manifests"):
            fields = ManifestRow.__dataclass_fields__
            damaged: list = []
            previous = [ManifestRow(**{k: v for k, v in r.items() if k in fields} | {"dataset": dataset})
                        for r in read_table(store, "manifests", [ds.name], on_damaged=damaged.append).to_pylist()]
            for e in damaged:  # rebuilt by this ingest
                log.warning("%s; it is rebuilt now by re-ingesting %s", e, ds.root)
        try:
            rows = ingest(ds.root, ds.layout, dataset=dataset, split=ds.split, gt_dir=ds.gt_dir, progress=progress,
                          previous=previous, max_pixels=ds.max_pixels, follow_symlinks=ds.follow_symlinks)
        except FileNotFoundError as e:
            raise root_error(ds.name, ds.root, plan.index, e) from e
    dicts = [dict(r.__dict__) for r in rows]
    for d in dicts:
        d["dataset"] = ds.name
    if ds.limit is not None:
        dicts = dicts[: ds.limit]
    if write and store is not None:
        write_table(store, "manifests", ds.name, dicts)
    return dicts


def plan_status(exp, plans: list[DatasetPlan], force: Iterable[str], summary):
    """The ``--dry-run`` table: per node, images cached and to compute. Writes nothing."""
    try:
        store: Store | None = Store(exp.store, create=False)
        summary.store = store.location
    except StoreNotFoundError:
        store = None
        summary.store = exp.store or "(new store)"
    summary.plan_only = True
    for plan in plans:
        forced = descendants(plan, set(force))
        users = method_users(plan)
        manifest = ingest_dataset(store, plan, progress=False, write=False)
        if not manifest:  # the run would stop here: so does its dry run (exit 2, same message)
            raise empty_dataset_error(plan.dataset.name, plan.dataset.root, plan.dataset.layout)
        ok = [r for r in manifest if r.get("status", "ok") == "ok"]
        for node in plan.ordered():
            items = [i["image_id"] for i in STAGES[node.stage].items(ok)]
            done = store.complete_items(node.stage, node.key) if store is not None else set()
            cached = 0 if node.ident in forced else sum(1 for i in items if i in done)
            summary.stages.append(StageReport(plan.dataset.name, node.stage, node.key, total=len(items),
                                              done=len(items) - cached, cached=cached,
                                              methods=",".join(sorted(users.get(node.ident, ())))))
    return summary
