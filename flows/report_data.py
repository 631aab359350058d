"""The report's data: what the store records about each experiment, dataset and method (no figures, no HTML).

Sources, all read-only:

- the ``metrics`` table: the newest scores of each (experiment, dataset, method) (``MethodScores``);
- the run journals (``store.runs()``): each run's whole plan (dataset, stage, key, methods) and
  its ``--set`` overrides. A journal is written when its run starts, so the run that writes the
  report itself (``ovseg run --report``, ``make demo``) is known, although its row of the
  ``runs`` table is written only after the report;
- the ``stage.json`` of the plan's ``scoring`` nodes (the ground-truth conversion, ignore index
  and spec the scores were computed with, and the prediction each method is scored on) and
  ``text_embeddings`` nodes (the vocabulary);
- the ``runs`` table: run start times, and the same facts for runs recorded without a journal.

A dataset's view (``DatasetView``) comes from the newest run of its experiment that planned it;
datasets without scores (no ground truth, or not scored yet) are shown from their predictions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flows.config import DatasetEntry
from flows.dataset_specs import class_names, dataset_spec
from ovseg_core.datasets import CLASS_SEPARATORS, class_lines, get_dataset
from ovseg_core.vocabulary import parse_class_lines
from storage.store import Store
from storage.tables import read_table

RANDOM_TAG = "[random weights]"  # on every row, legend and figure title made with random weights
_RUN_ID_TIME = re.compile(r"^(\d{8}T\d{6}Z)")  # run ids start with their UTC start time
PREDICTION_STAGES = ("map_correction", "reconstruction")  # stages a scoring node reads its prediction from


@dataclass
class MethodScores:
    """The newest metrics of one (experiment, dataset, method)."""

    experiment: str
    dataset: str
    method: str
    run_id: str
    miou: float | None
    aacc: float | None
    images: int  # images scored
    images_total: int  # images in the dataset; 0 = not recorded (metrics tables written before the column existed)
    complete: bool | None  # every image of the dataset scored; None = not recorded
    random_weights: bool
    prediction_stage: str
    prediction_key: str
    params: dict[str, Any]
    class_names: list[str] = field(default_factory=list)
    iou: list[float | None] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.experiment} / {self.method}" + (f" {RANDOM_TAG}" if self.random_weights else "")


@dataclass
class Prediction:
    """One method's predictions of one dataset: the stage output that holds its label maps."""

    method: str
    stage: str
    key: str
    random_weights: bool
    class_names: list[str]


@dataclass
class DatasetView:
    """How one experiment ran one dataset: ground-truth conversion, vocabulary and predictions (newest run)."""

    experiment: str
    dataset: str
    run_id: str
    spec: str | None = None  # dataset spec name; None = unknown
    conversion: str | None = None  # ground-truth label conversion; None = unknown (shown unconverted)
    ignore_index: int = 255
    predictions: list[Prediction] = field(default_factory=list)


@dataclass
class RunInfo:
    """What the report needs of one run."""

    run_id: str
    experiment: str
    started: datetime | None = None
    overrides: tuple[str, ...] = ()
    nodes: list[dict[str, Any]] = field(default_factory=list)  # plan rows: dataset, stage, key, methods
    from_table: bool = False  # nodes carry params / upstream (runs table); else read from stage.json
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # the run's config entries (runs table only)


# ----------------------------------------------------------------------------- metrics
def newest_scores(rows: Sequence[Mapping[str, Any]], experiments: Sequence[str] | None) -> list[MethodScores]:
    """Group metric rows into MethodScores, keeping the newest run per (experiment, dataset, method), in table order."""
    newest: dict[tuple[str, str, str], str] = {}
    for r in rows:
        if experiments is not None and r["experiment"] not in experiments:
            continue
        k = (r["experiment"], r["dataset"], r["method"])
        newest[k] = max(newest.get(k, ""), r["run_id"])
    out: dict[tuple[str, str, str], MethodScores] = {}
    per_class: dict[tuple[str, str, str], dict[int, tuple[str, float | None]]] = {}
    for r in rows:
        k = (r["experiment"], r["dataset"], r["method"])
        if k not in newest or r["run_id"] != newest[k]:
            continue
        if k not in out:
            try:
                params = json.loads(r["params_json"]) if r["params_json"] else {}
            except json.JSONDecodeError:
                params = {}
            total = int(r.get("images_total") or 0)
            complete = bool(r["complete"]) if total > 0 and r.get("complete") is not None else None
            out[k] = MethodScores(*k, r["run_id"], None, None, int(r["images"]), total, complete,
                                  bool(r["random_weights"]), r["prediction_stage"], r["prediction_key"], params)
        if r["class_index"] < 0:
            out[k].miou, out[k].aacc = r["miou"], r["aacc"]
        else:
            per_class.setdefault(k, {})[int(r["class_index"])] = (r["class_name"], r["iou"])
    for k, ms in out.items():
        classes = per_class.get(k, {})
        n = max(classes) + 1 if classes else 0
        ms.class_names = [classes.get(i, (str(i), None))[0] for i in range(n)]
        ms.iou = [classes.get(i, ("", None))[1] for i in range(n)]
    return list(out.values())


# ----------------------------------------------------------------------------- runs
def _json(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except (json.JSONDecodeError, TypeError):
        return default


def load_runs(store: Store, notes: list[str]) -> dict[str, RunInfo]:
    """Every run the store records (journals and the runs table), by run id."""
    runs: dict[str, RunInfo] = {}
    damaged: list = []
    try:  # a damaged file of the runs table costs that run's rows, nothing more
        rows = read_table(store, "runs", on_damaged=damaged.append).to_pylist()
    except Exception as e:  # noqa: BLE001 - the folder itself cannot be read: runs are shown from their journals
        notes.append(f"run records unreadable ({e}); runs without a journal are shown without their date")
        rows = []
    notes += [f"{e}; that run is shown from its journal" for e in damaged]
    for r in sorted(rows, key=lambda r: r["run_id"]):
        info = runs.setdefault(r["run_id"], RunInfo(r["run_id"], r["experiment"], from_table=True))
        info.started = r["started"] if info.started is None else min(info.started, r["started"])
        info.nodes.append({"dataset": r["dataset"], "stage": r["stage"], "key": r["key"],
                           "methods": [m for m in (r.get("methods") or "").split(",") if m],
                           "params": _json(r["params_json"], {}), "upstream": _json(r["upstream_json"], {}),
                           "random_weights": bool(r["random_weights"])})
        if not info.datasets:
            cfg = _json(r["config_json"], {})
            entries = cfg.get("datasets", []) if isinstance(cfg, dict) else []
            info.datasets = {d["name"]: d for d in entries if isinstance(d, dict) and "name" in d}
    try:
        journals, damaged = store.runs()
    except Exception as e:  # noqa: BLE001 - an unreadable journal folder costs the overrides column
        journals, damaged = [], [("journal/", str(e))]
    notes += [f"run journal {path} unreadable ({err}): that run's overrides are not shown" for path, err in damaged]
    for j in journals:
        info = runs.get(j.run_id)
        if info is None or not j.data.get("plan"):
            info = runs[j.run_id] = RunInfo(j.run_id, j.experiment, nodes=list(j.data.get("plan") or []))
            if j.started:
                info.started = datetime.fromtimestamp(j.started, tz=timezone.utc)
        elif info.from_table:  # the journal's plan lists every node (the table: the nodes the run executed)
            info.nodes, info.from_table = list(j.data["plan"]), False
        info.overrides = tuple(str(o) for o in j.data.get("overrides") or ())
    return runs


def run_date(run_id: str, runs: Mapping[str, RunInfo]) -> str:
    """The run's start (UTC) from its records, else from the run id's time prefix; "–" when neither has it."""
    info = runs.get(run_id)
    t = info.started if info is not None else None
    if t is None:
        m = _RUN_ID_TIME.match(run_id)
        if m is None:
            return "–"
        t = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- dataset views
def stage_attrs_or_empty(store: Store, stage: str, key: str) -> dict[str, Any]:
    """A stage output set's ``stage.json`` payload; ``{}`` when it cannot be read (the report shows what it can)."""
    try:
        return store.stage_attrs(stage, key)
    except Exception:  # noqa: BLE001 - a damaged stage folder leaves that fact unknown
        return {}


def stage_key_of(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stage_key`` dict (params, upstream keys, ...) of a ``stage.json`` payload; ``{}`` when absent."""
    sk = attrs.get("stage_key")
    return sk if isinstance(sk, dict) else {}


def reconstruction_key(store: Store, stage: str, key: str, stage_key: Mapping[str, Any] | None = None) -> str | None:
    """The ``reconstruction`` key a prediction stage output was made from (itself for ``reconstruction``; for
    ``map_correction`` its upstream); None when it has none. ``stage_key``: the prediction's stage key when the
    caller holds it (the metrics table's ``params_json``), else read from its ``stage.json``."""
    if stage == "reconstruction":
        return key
    sk = stage_key_of(stage_attrs_or_empty(store, stage, key)) if stage_key is None else stage_key
    rec = (sk.get("upstream") or {}).get("reconstruction")
    return rec if isinstance(rec, str) else None


class _Attrs:
    """``stage.json`` payloads read once each."""

    def __init__(self, store: Store):
        self.store, self.cache = store, {}

    def __call__(self, stage: str, key: str) -> dict[str, Any]:
        if (stage, key) not in self.cache:
            self.cache[(stage, key)] = stage_attrs_or_empty(self.store, stage, key)
        return self.cache[(stage, key)]


def _node_params(node: Mapping[str, Any], attrs: _Attrs) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``(params, upstream, random_weights)`` of a plan node."""
    if "params" in node:
        return node["params"], node["upstream"], node["random_weights"]
    a = attrs(node["stage"], node["key"])
    sk = stage_key_of(a)
    return sk.get("params") or {}, sk.get("upstream") or {}, bool(a.get("random_weights"))


def _vocabulary(params: Mapping[str, Any], spec: str | None) -> list[str]:
    """Class names of a ``text_embeddings`` node; a benchmark vocabulary's background class is "background"."""
    lines, sep = [str(ln) for ln in params.get("classes") or []], str(params.get("separator") or ", ")
    if not lines:
        return []
    try:
        ds = get_dataset(spec or "")
        benchmark = any(lines == class_lines(ds.name, v) for v in CLASS_SEPARATORS)
    except (KeyError, ValueError):  # a custom vocabulary ("custom" spec): no class is renamed
        return [n.strip() for n in parse_class_lines(lines, sep).class_names]
    return list(class_names(lines, sep, ds, custom=not benchmark))


def _view(info: RunInfo, dataset: str, attrs: _Attrs) -> DatasetView:
    nodes = [n for n in info.nodes if n.get("dataset") == dataset]
    view = DatasetView(info.experiment, dataset, info.run_id)
    stage_of = {n["key"]: n["stage"] for n in nodes if n["stage"] in PREDICTION_STAGES}
    text = {}
    for n in nodes:
        if n["stage"] == "text_embeddings":
            for m in n.get("methods") or []:
                text[m] = n
    for n in nodes:
        if n["stage"] != "scoring":
            continue
        params, upstream, _ = _node_params(n, attrs)
        if "conversion" in params:
            view.spec, view.conversion = params.get("spec"), params["conversion"]
            view.ignore_index = int(params.get("ignore_index", 255))
        pred_key = upstream.get("prediction")
        if pred_key not in stage_of:
            continue
        pred = next(p for p in nodes if p["key"] == pred_key and p["stage"] == stage_of[pred_key])
        random_weights = _node_params(pred, attrs)[2]
        for m in n.get("methods") or []:
            names = _vocabulary(_node_params(text[m], attrs)[0], view.spec) if m in text else []
            view.predictions.append(Prediction(m, stage_of[pred_key], pred_key, random_weights, names))
    if view.conversion is None and dataset in info.datasets:  # runs recorded without scoring parameters
        try:
            spec = dataset_spec(DatasetEntry.model_validate(info.datasets[dataset]))
            view.spec, view.conversion, view.ignore_index = spec.name, spec.label_conversion, spec.ignore_index
        except (ValueError, KeyError, TypeError):
            pass
    return view


def dataset_views(store: Store, runs: Mapping[str, RunInfo], scores: Sequence[MethodScores],
                  experiments: Iterable[str] | None) -> dict[tuple[str, str], DatasetView]:
    """``(experiment, dataset) -> DatasetView`` for the datasets of each experiment's newest run and every scored one.

    Each view comes from the newest run of the experiment that planned the dataset; runs are
    read newest first, only until every dataset is covered.
    """
    wanted = set(experiments) if experiments is not None else None
    by_exp: dict[str, list[RunInfo]] = {}
    for info in sorted(runs.values(), key=lambda r: r.run_id, reverse=True):
        if wanted is None or info.experiment in wanted:
            by_exp.setdefault(info.experiment, []).append(info)
    needed: dict[str, set[str]] = {}
    for s in scores:
        needed.setdefault(s.experiment, set()).add(s.dataset)
    for exp, infos in by_exp.items():
        needed.setdefault(exp, set()).update(n["dataset"] for n in infos[0].nodes)
    attrs = _Attrs(store)
    views: dict[tuple[str, str], DatasetView] = {}
    for exp, datasets in needed.items():
        for info in by_exp.get(exp, []):
            for ds in sorted(datasets - {d for e, d in views if e == exp}):
                if any(n.get("dataset") == ds for n in info.nodes):
                    views[(exp, ds)] = _view(info, ds, attrs)
    return views


def name_background(scores: Sequence[MethodScores], views: Mapping[tuple[str, str], DatasetView]) -> None:
    """Show class 0 of datasets with a background class as "background" (older stores name VOC21's class 0 by the
    first word of its line of stuff words)."""
    for s in scores:
        view = views.get((s.experiment, s.dataset))
        try:
            spec = get_dataset(view.spec or "") if view is not None else None
        except (KeyError, ValueError):
            spec = None
        if spec is not None and spec.has_background and len(s.class_names) == spec.num_classes:
            s.class_names[0] = "background"


# ----------------------------------------------------------------------------- ablations
def method_config(store: Store, ms: MethodScores) -> dict[str, Any]:
    """The method config of the prediction stage key (followed to ``reconstruction`` for ``map_correction``)."""
    payload = ms.params if isinstance(ms.params, dict) else {}
    params = payload.get("params", {})
    if "config" not in params:
        rec_key = reconstruction_key(store, ms.prediction_stage, ms.prediction_key, payload)
        if rec_key is not None and ms.prediction_stage != "reconstruction":
            params = stage_key_of(stage_attrs_or_empty(store, "reconstruction", rec_key)).get("params", {})
    out: dict[str, Any] = {}
    _flatten(params.get("config"), "", out)
    return {"method": params.get("method"), "switches": {k: v for k, v in out.items() if isinstance(v, bool)},
            "other": {k: v for k, v in out.items() if not isinstance(v, bool)},
            "top": {k: v for k, v in params.items() if k not in ("config", "method")}}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):  # corrclip+scclip: [CorrCLIPConfig, CombinedConfig]
            _flatten(v, f"{prefix}{i}.", out)
    elif prefix:
        out[prefix[:-1]] = value
