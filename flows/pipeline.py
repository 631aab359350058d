"""The overnight flow: ingest, work out what is missing per stage and image, compute only that.

``run_experiment`` is what ``ovseg run`` calls. The flow walks the stage graph in dependency
order; for each stage it asks the store which images are complete, batches the rest (one
Prefect task per batch, never per image), and runs the batches on the configured task runner
(local threads, or Dask). Failed images are recorded and skipped downstream; the run record
says what produced every output.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flows.config import Experiment
from flows.graph import PER_VOCABULARY, DatasetPlan, StageNode, build_plan
from storage.keys import canonical_json
from storage.store import Store
from storage.tables import write_table
from tasks.runtime import ItemResult, StageContext, software_versions

@dataclass
class StageReport:
    """What one stage node did in a run."""

    dataset: str
    stage: str
    key: str
    total: int = 0
    done: int = 0
    cached: int = 0
    skipped: int = 0
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
    metrics: list[dict[str, Any]] = field(default_factory=list)
    plan_only: bool = False
    random_weights: bool = False

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def computed(self) -> int:
        return sum(s.done for s in self.stages)


def _task_for(stage: str):
    from tasks import corrclip, features, reconstruction, scoring

    return {
        "text_embeddings": features.text_embeddings_task,
        "sam_masks": features.sam_masks_task,
        "dino_features": features.dino_features_task,
        "clip_layers": features.clip_layers_task,
        "mask_clustering": corrclip.mask_clustering_task,
        "mask_class_tokens": corrclip.mask_class_tokens_task,
        "reconstruction": reconstruction.reconstruction_task,
        "map_correction": corrclip.map_correction_task,
        "scoring": scoring.scoring_task,
    }[stage]


def ingest_dataset(store: Store, plan: DatasetPlan, progress: bool = True) -> list[dict[str, Any]]:
    """Build and store the manifest of one dataset; returns its rows (dicts)."""
    from pathlib import Path

    from storage.ingest import ManifestRow, ingest, ingest_files
    from storage.tables import read_table

    ds = plan.dataset
    if ds.layout == "folder" and Path(ds.root).is_file():
        rows = ingest_files([ds.root], dataset=ds.name)
    else:
        dataset = ds.name if ds.layout == "folder" else ds.spec
        previous = []
        if ds.name in store.table_names("manifests"):  # unchanged files are not decoded and hashed again
            fields = ManifestRow.__dataclass_fields__
            previous = [ManifestRow(**{k: v for k, v in r.items() if k in fields} | {"dataset": dataset})
                        for r in read_table(store, "manifests", [ds.name]).to_pylist()]
        rows = ingest(ds.root, ds.layout, dataset=dataset, split=ds.split, gt_dir=ds.gt_dir, progress=progress,
                      previous=previous)
    dicts = [dict(r.__dict__) if hasattr(r, "__dict__") else dict(r._asdict()) for r in rows]
    for d in dicts:
        d["dataset"] = ds.name
    if ds.limit is not None:
        dicts = dicts[: ds.limit]
    write_table(store, "manifests", ds.name, dicts)
    return dicts


def _node_items(node: StageNode, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if node.stage in PER_VOCABULARY:
        return [{"image_id": "vocab"}]
    if node.stage == "scoring":  # images without ground truth are predicted, not scored
        return [dict(r) for r in rows if r.get("gt_path")]
    return [dict(r) for r in rows]


def _batches(items: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def descendants(plan: DatasetPlan, stages: Iterable[str]) -> set[tuple[str, str]]:
    """Nodes of the named stages and every node downstream of them."""
    chosen = {(n.stage, n.key) for n in plan.nodes.values() if n.stage in set(stages)}
    changed = True
    while changed:
        changed = False
        for n in plan.nodes.values():
            ident = (n.stage, n.key)
            if ident in chosen:
                continue
            if any((u.stage, u.key) in chosen for u in n.upstream.values()):
                chosen.add(ident)
                changed = True
    return chosen


def make_task_runner(exp: Experiment):
    """The Prefect task runner for the experiment's runner settings."""
    if exp.runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("runner kind 'dask' needs prefect-dask: pip install 'ovseg[dask]'") from e
        if exp.runner.address:
            return DaskTaskRunner(address=exp.runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": exp.runner.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=exp.runner.workers)


def plan_status(store: Store, plans: Sequence[DatasetPlan], manifests: Mapping[str, Sequence[Mapping[str, Any]]],
                force: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Per node: how many items are cached and how many would be computed (the ``--dry-run`` table)."""
    rows = []
    for plan in plans:
        forced = descendants(plan, force)
        users = method_users(plan)
        ok = [r for r in manifests[plan.dataset.name] if r.get("status", "ok") == "ok"]
        for node in plan.ordered():
            items = [i["image_id"] for i in _node_items(node, ok)]
            done = store.complete_items(node.stage, node.key)
            cached = 0 if (node.stage, node.key) in forced else sum(1 for i in items if i in done)
            rows.append({"dataset": plan.dataset.name, "stage": node.stage, "key": node.key,
                         "compute": len(items) - cached, "cached": cached,
                         "methods": ",".join(sorted(users.get((node.stage, node.key), ())))})
    return rows


def method_users(plan: DatasetPlan) -> dict[tuple[str, str], set[str]]:
    """For every node, the names of the methods whose results depend on it."""
    users: dict[tuple[str, str], set[str]] = {}
    for mp in plan.methods:
        stack = [mp.scoring]
        while stack:
            n = stack.pop()
            ident = (n.stage, n.key)
            if mp.method.name in users.setdefault(ident, set()):
                continue
            users[ident].add(mp.method.name)
            stack.extend(plan.nodes[(u.stage, u.key)] for u in n.upstream.values() if (u.stage, u.key) in plan.nodes)
    return users


def run_experiment(exp: Experiment, force: Iterable[str] = (), dry_run: bool = False, progress: bool = True,
                   only_stages: Iterable[str] | None = None) -> RunSummary:
    """Run (or plan, with ``dry_run``) an experiment. ``force`` recomputes the named stages and their dependants.

    ``only_stages`` restricts the run to the named stages (``ovseg stage NAME``); their upstream
    outputs must then already be complete (missing inputs are reported as skipped images).
    """
    from prefect import flow

    force = list(force)
    store = Store(exp.store)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    plans = build_plan(exp)
    manifests = {p.dataset.name: ingest_dataset(store, p, progress=progress) for p in plans}
    summary = RunSummary(run_id, exp.name, store.location)
    summary.random_weights = any(n.stage_key.is_random_weights for p in plans for n in p.nodes.values())
    if dry_run:
        summary.plan_only = True
        for row in plan_status(store, plans, manifests, force):
            summary.stages.append(StageReport(row["dataset"], row["stage"], row["key"], total=row["compute"] + row["cached"],
                                              done=row["compute"], cached=row["cached"], methods=row["methods"]))
        return summary

    @flow(name=f"ovseg-{exp.name}", task_runner=make_task_runner(exp), log_prints=False)
    def experiment_flow() -> None:
        for plan in plans:
            _run_dataset(store, exp, plan, manifests[plan.dataset.name], force, summary, progress, only_stages)

    t0 = time.time()
    experiment_flow()
    _write_run_record(store, exp, plans, summary, t0)
    return summary


def _run_dataset(store: Store, exp: Experiment, plan: DatasetPlan, manifest: Sequence[Mapping[str, Any]],
                 force: Sequence[str], summary: RunSummary, progress: bool, only_stages: Iterable[str] | None) -> None:
    from tqdm.auto import tqdm

    ok_rows = [r for r in manifest if r.get("status", "ok") == "ok"]
    bad_rows = [r for r in manifest if r.get("status", "ok") != "ok"]
    if bad_rows:
        rep = StageReport(plan.dataset.name, "ingest", "-", total=len(manifest), failed=len(bad_rows))
        rep.failures = [(r["image_id"], "ImageError", r["error"]) for r in bad_rows]
        summary.stages.append(rep)
    forced = descendants(plan, force)
    only = set(only_stages) if only_stages is not None else None
    for node in plan.ordered():
        if only is not None and node.stage not in only:
            continue
        rep = StageReport(plan.dataset.name, node.stage, node.key, started=time.time())
        items = _node_items(node, ok_rows)
        rep.total = len(items)
        if (node.stage, node.key) in forced:
            for it in items:
                store.delete_item(node.stage, node.key, it["image_id"])
        # images whose per-image inputs are missing are skipped (their failure was recorded upstream)
        ready = items
        for up in node.upstream.values():
            if up.stage in PER_VOCABULARY:
                if not store.is_complete(up.stage, up.key, "vocab"):
                    ready = []
                continue
            done_up = store.complete_items(up.stage, up.key)
            ready = [it for it in ready if it["image_id"] in done_up]
        ready_ids = {it["image_id"] for it in ready}
        for it in items:
            if it["image_id"] not in ready_ids:
                rep.skipped += 1
                rep.failures.append((it["image_id"], "SkippedUpstream", "an upstream output is missing (failed earlier)"))
        done = store.complete_items(node.stage, node.key)
        todo = [it for it in ready if it["image_id"] not in done]
        rep.cached = len(ready) - len(todo)
        if todo:
            ctx = StageContext.bind(node, store.location)
            task = _task_for(node.stage)
            futures = [task.submit(ctx, batch) for batch in _batches(todo, exp.runner.batch_size)]
            bar = tqdm(total=len(todo), desc=f"{plan.dataset.name}:{node.stage}", unit="img", disable=not progress,
                       leave=True)
            for fut in futures:
                results: list[ItemResult] = fut.result()
                for r in results:
                    if r.status == "done":
                        rep.done += 1
                    elif r.status == "cached":
                        rep.cached += 1
                    elif r.status == "busy":
                        rep.skipped += 1
                        rep.failures.append((r.item, "Busy", r.error))
                    else:
                        rep.failed += 1
                        rep.failures.append((r.item, r.error_type, r.error))
                    rep.seconds += r.seconds
                bar.update(len(results))
            bar.close()
        rep.ended = time.time()
        summary.stages.append(rep)
    if only is None or "scoring" in only:
        summary.metrics.extend(aggregate_scores(store, exp, plan, ok_rows, summary.run_id))


def aggregate_scores(store: Store, exp: Experiment, plan: DatasetPlan, rows: Sequence[Mapping[str, Any]],
                     run_id: str) -> list[dict[str, Any]]:
    """Sum per-image confusion matrices over the dataset and turn them into metric rows."""
    from ovseg_core.metrics import scores_from_confusion

    out = []
    for mp in plan.methods:
        node = mp.scoring
        done = store.complete_items(node.stage, node.key)
        ids = [r["image_id"] for r in rows if r["image_id"] in done]
        if not ids:
            continue
        conf = np.zeros((mp.num_classes, mp.num_classes), dtype=np.int64)
        for iid in ids:
            conf += store.read_item(node.stage, node.key, iid, ["confusion"])["confusion"]
        sc = scores_from_confusion(conf)
        common = {
            "experiment": exp.name, "run_id": run_id, "dataset": plan.dataset.name, "method": mp.method.name,
            "images": len(ids), "prediction_stage": mp.prediction.stage, "prediction_key": mp.prediction.key,
            "random_weights": bool(node.stage_key.is_random_weights or mp.prediction.stage_key.is_random_weights
                                   or _any_random_upstream(plan, mp.prediction)),
            "params_json": canonical_json(mp.prediction.stage_key.payload()),
        }
        for c in range(mp.num_classes):
            out.append({**common, "class_index": c, "class_name": mp.class_names[c] if c < len(mp.class_names) else str(c),
                        "iou": _f(sc["iou"][c]), "acc": _f(sc["acc"][c]), "miou": None, "aacc": None})
        out.append({**common, "class_index": -1, "class_name": "__summary__", "iou": None, "acc": None,
                    "miou": _f(sc["miou"]), "aacc": _f(sc["aacc"])})
    if out:
        write_table(store, "metrics", f"{exp.name}--{plan.dataset.name}", out)
    return out


def _any_random_upstream(plan: DatasetPlan, node: StageNode) -> bool:
    seen = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.stage_key.is_random_weights:
            return True
        for up in n.upstream.values():
            if (up.stage, up.key) not in seen:
                seen.add((up.stage, up.key))
                if up.is_random_weights:
                    return True
                nxt = plan.nodes.get((up.stage, up.key))
                if nxt is not None:
                    stack.append(nxt)
    return False


def _f(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def _write_run_record(store: Store, exp: Experiment, plans: Sequence[DatasetPlan], summary: RunSummary, t0: float) -> None:
    software = json.dumps(software_versions(), sort_keys=True)
    config = exp.model_dump_json()
    index = {(p.dataset.name, n.stage, n.key): n for p in plans for n in p.nodes.values()}
    rows, fails = [], []
    for s in summary.stages:
        node = index.get((s.dataset, s.stage, s.key))
        payload = node.stage_key.payload() if node else {"params": {}, "upstream": {}, "code_version": "", "weights": None}
        rows.append({
            "run_id": summary.run_id, "experiment": exp.name, "dataset": s.dataset, "stage": s.stage, "key": s.key,
            "params_json": canonical_json(payload["params"]), "upstream_json": canonical_json(payload["upstream"]),
            "code_version": payload["code_version"], "weights_json": canonical_json(payload["weights"]),
            "random_weights": bool(node.stage_key.is_random_weights) if node else False,
            "images_total": s.total, "images_done": s.done, "images_cached": s.cached, "images_skipped": s.skipped,
            "images_failed": s.failed, "seconds": s.seconds, "started": _ts(s.started or t0), "ended": _ts(s.ended or time.time()),
            "config_json": config, "software_json": software,
        })
        for iid, etype, err in s.failures:
            fails.append({"run_id": summary.run_id, "dataset": s.dataset, "stage": s.stage, "key": s.key,
                          "image_id": iid, "error_type": etype, "error": err})
    write_table(store, "runs", summary.run_id, rows)
    write_table(store, "failures", summary.run_id, fails)
