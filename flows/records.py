"""The run record: one Parquet row per stage output set of a run, and the failures table."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from flows.config import Experiment
from flows.graph import DatasetPlan, method_users
from storage.keys import canonical_json
from storage.store import Store
from storage.tables import write_table
from tasks.runtime import software_versions


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def write_run_record(store: Store, exp: Experiment, plans: Sequence[DatasetPlan], summary, status: str) -> None:
    """``tables/runs/<run_id>`` (what produced every output) and ``tables/failures/<run_id>``."""
    software = json.dumps(software_versions(), sort_keys=True)
    config = exp.model_dump_json()
    index = {(p.dataset.name, n.stage, n.key): n for p in plans for n in p.nodes.values()}
    users = {(p.dataset.name, *ident): ",".join(sorted(m)) for p in plans for ident, m in method_users(p).items()}
    rows, fails = [], []
    for s in summary.stages:
        node = index.get((s.dataset, s.stage, s.key))
        payload = node.stage_key.payload() if node else {"params": {}, "upstream": {}, "code_version": "", "weights": None}
        methods = users.get((s.dataset, s.stage, s.key), "")
        rows.append({
            "run_id": summary.run_id, "experiment": exp.name, "dataset": s.dataset, "stage": s.stage, "key": s.key,
            "params_json": canonical_json(payload["params"]), "upstream_json": canonical_json(payload["upstream"]),
            "code_version": payload["code_version"], "weights_json": canonical_json(payload["weights"]),
            "random_weights": bool(node.random_weights) if node else False,
            "images_total": s.total, "images_done": s.done, "images_cached": s.cached,
            "images_skipped": s.skipped + s.busy, "images_failed": s.failed, "seconds": s.seconds,
            "started": _ts(s.started or summary.started), "ended": _ts(s.ended or time.time()),
            "config_json": config, "software_json": software, "status": status, "methods": methods,
        })
        for iid, etype, err in s.failures:
            fails.append({"run_id": summary.run_id, "dataset": s.dataset, "stage": s.stage, "key": s.key,
                          "image_id": iid, "error_type": etype, "error": err, "methods": methods})
    write_table(store, "runs", summary.run_id, rows)
    write_table(store, "failures", summary.run_id, fails)
