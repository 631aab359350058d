"""Dataset scores from the stored per-image confusion matrices, with their coverage.

Each metrics row says how many images it covers (``images``) out of the images of the dataset
that have ground truth (``images_total``) and whether that is all of them (``complete``). A
partial result never silently replaces a complete one: when the stored table holds complete
rows of the same prediction output, those are kept and the partial rows are only reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flows.graph import DatasetPlan
from ovseg_core.metrics import scores_from_confusion
from storage.keys import canonical_json
from storage.store import DamagedOutputError, Store
from storage.tables import read_table, write_table

log = logging.getLogger("ovseg.flows")


def _f(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def aggregate_scores(store: Store, experiment: str, plan: DatasetPlan, manifest: Sequence[Mapping[str, Any]],
                     run_id: str) -> tuple[list[dict[str, Any]], list[str], int]:
    """Sum per-image confusion matrices over the dataset into metric rows; write them.

    Returns the rows of this run, notes (damaged matrices, partial results not stored) and the
    number of damaged matrices found (un-marked: the next run recomputes them).
    """
    notes: list[str] = []
    damaged = 0
    with_gt = [r for r in manifest if r.get("gt_path")]
    scoreable = [r["image_id"] for r in with_gt if r.get("status", "ok") == "ok"]
    out = []
    stored = _stored_summaries(store, f"{experiment}--{plan.dataset.name}")
    for mp in plan.methods:
        node = mp.scoring
        done = store.complete_items(node.stage, node.key)
        old = stored.get(mp.entry.name)
        if (old is not None and old[0]["complete"] and old[0]["prediction_key"] == mp.prediction.key
                and old[0]["images_total"] == len(with_gt) and all(i in done for i in scoreable)):
            out.extend(old[1])  # every image scored, as when these rows were computed: the sums are the same
            continue
        conf = np.zeros((mp.num_classes + 1, mp.num_classes), dtype=np.int64)  # row K: ground truth out of range
        ids = []
        got = store.read_items(node.stage, node.key, [i for i in scoreable if i in done], ["confusion"])
        for iid, arrays in got.items():
            if isinstance(arrays, Exception):
                notes.append(str(arrays))
                damaged += isinstance(arrays, DamagedOutputError)
                continue
            conf += arrays["confusion"]
            ids.append(iid)
        if not ids:
            continue
        sc = scores_from_confusion(conf)
        if sc["out_of_range"] and not any(n.startswith(f"{plan.dataset.name}: ") for n in notes):  # once per dataset
            notes.append(f"{plan.dataset.name}: {sc['out_of_range']} ground-truth pixels have labels "
                         f"outside 0..{mp.num_classes - 1}; they count in the predicted area only, as MMSegmentation "
                         "scores them (datasets[].strict_labels: true makes them an error)")
        common = {
            "experiment": experiment, "run_id": run_id, "dataset": plan.dataset.name, "method": mp.entry.name,
            "images": len(ids), "images_total": len(with_gt), "complete": len(ids) == len(with_gt),
            "gt_out_of_range": int(sc["out_of_range"]),
            "prediction_stage": mp.prediction.stage, "prediction_key": mp.prediction.key,
            "random_weights": bool(mp.scoring.random_weights),
            "params_json": canonical_json(mp.prediction.stage_key.payload()),
        }
        for c in range(mp.num_classes):
            out.append({**common, "class_index": c, "class_name": mp.class_names[c] if c < len(mp.class_names) else str(c),
                        "iou": _f(sc["iou"][c]), "acc": _f(sc["acc"][c]), "miou": None, "aacc": None})
        out.append({**common, "class_index": -1, "class_name": "__summary__", "iou": None, "acc": None,
                    "miou": _f(sc["miou"]), "aacc": _f(sc["aacc"])})
    if out:
        notes += _store_rows(store, f"{experiment}--{plan.dataset.name}", out)
    return out, notes, damaged


def _stored_summaries(store: Store, name: str) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Per method: the stored summary row and all its rows (empty when the table is absent or damaged)."""
    if name not in store.table_names("metrics"):
        return {}
    rows = read_table(store, "metrics", [name], on_damaged=lambda e: None).to_pylist()
    out: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for r in rows:
        if r["class_index"] == -1:
            out[r["method"]] = (r, [x for x in rows if x["method"] == r["method"]])
    return out


def _store_rows(store: Store, name: str, rows: list[dict[str, Any]]) -> list[str]:
    """Write the metrics table, keeping stored complete rows that partial new rows would replace."""
    notes = []
    previous: list[dict[str, Any]] = []
    if name in store.table_names("metrics"):
        damaged: list = []
        previous = read_table(store, "metrics", [name], on_damaged=damaged.append).to_pylist()
        notes += [f"{e}; rebuilt now from the stored per-image confusion matrices" for e in damaged]
    keep_methods = set()
    for method in {r["method"] for r in rows}:
        new = next(r for r in rows if r["method"] == method and r["class_index"] == -1)
        old = next((r for r in previous if r["method"] == method and r["class_index"] == -1), None)
        if (not new["complete"] and old is not None and old.get("complete")
                and old["prediction_key"] == new["prediction_key"]):
            keep_methods.add(method)
            notes.append(f"{name} [{method}]: scores over {new['images']}/{new['images_total']} images were not stored "
                         f"over the complete scores of run {old['run_id']} ({old['images']} images)")
    merged = [r for r in previous if r["method"] in keep_methods or r["method"] not in {x["method"] for x in rows}]
    merged += [r for r in rows if r["method"] not in keep_methods]
    write_table(store, "metrics", name, merged)
    return notes
