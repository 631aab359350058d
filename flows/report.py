"""The HTML report (``ovseg report``): scores, per-class IoU, ablations and sample overlays.

``write_report`` reads the store's tables (``metrics``, ``runs``, ``manifests``) and the
prediction stage outputs, and writes ``<out>/index.html`` (one self-contained file: inline
CSS, figures embedded as base64 PNGs) plus the same figures as PNG files in ``<out>/figures``.
The page comes from the Jinja2 template ``flows/templates/report.html.j2`` (autoescaped:
experiment, method and class names are text, never markup).

Sections:

1. Scores: one row per experiment / dataset / method (the newest run of each; run ids start
   with their UTC start time, so they sort by time): mIoU, aAcc (%), images scored (of the
   dataset's total where the metrics table records it, incomplete rows flagged), run id and
   run date.
2. Per-class IoU: one bar chart per dataset, wrapped into rows of at most
   ``CHART_ROW_CLASSES`` classes so that it fits the page (title and legend always in view),
   and a class table (colour, index, name, IoU per method) as HTML text.
3. Ablations: within one experiment and dataset, the boolean component switches of the method
   config (``params.config`` of the prediction stage key) that differ from the first method,
   with the mIoU delta.
4. Samples: the first ``samples`` image ids (sorted) of each dataset: input, ground truth and
   each method's prediction overlaid, with the classes present listed as HTML text (colour
   swatch, index, name) below each figure.

Runs with random-weight backbones are flagged in every section and every figure. Missing
inputs (no metrics yet, a moved image, a missing prediction) become notes on the page.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from flows.overlay import CLASS0_COLOR, IGNORE_COLOR, class_color
from flows.report_figures import (
    CHART_ROW_CLASSES,
    OVERLAY_ALPHA,
    RANDOM_TAG,
    _iou_figure,
    _paint,
    _safe,
    _sample_figure,
    _save,
)

log = logging.getLogger("ovseg.report")

__all__ = ["RANDOM_BANNER", "RANDOM_TAG", "MethodScores", "write_report"]

RANDOM_BANNER = "RANDOM WEIGHTS — scores are meaningless"
_RUN_ID_TIME = re.compile(r"^(\d{8}T\d{6}Z)")  # run ids start with their UTC start time


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


# ----------------------------------------------------------------------------- loading
def _newest_scores(rows: Sequence[Mapping[str, Any]], experiments: Sequence[str] | None) -> list[MethodScores]:
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


def _run_records(store, notes: list[str]) -> tuple[dict[tuple[str, str], str], dict[str, datetime]]:
    """From the run table: ``(experiment, dataset name) -> dataset spec name`` (newest run wins) and run start times."""
    from storage.tables import read_table

    try:
        runs = read_table(store, "runs").select(["run_id", "experiment", "config_json", "started"]).to_pylist()
    except Exception as e:  # a damaged run table only costs the ground-truth conversion and the run dates
        notes.append(f"run records unreadable ({e}); ground truth is shown unconverted where the spec is unknown")
        return {}, {}
    specs: dict[tuple[str, str], str] = {}
    started: dict[str, datetime] = {}
    for r in sorted(runs, key=lambda r: r["run_id"]):
        if r["run_id"] in started:
            started[r["run_id"]] = min(started[r["run_id"]], r["started"])
            continue
        started[r["run_id"]] = r["started"]
        try:
            cfg = json.loads(r["config_json"])
            for d in cfg.get("datasets", []):
                specs[(r["experiment"], d["name"])] = d["spec"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return specs, started


def _run_date(run_id: str, started: Mapping[str, datetime]) -> str:
    """The run's start (UTC) from the run table, else from the run id's time prefix; "–" when neither has it."""
    t = started.get(run_id)
    if t is None:
        m = _RUN_ID_TIME.match(run_id)
        if m is None:
            return "–"
        t = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _spec(specs: Mapping[tuple[str, str], str], experiment: str, dataset: str):
    """The ``DatasetSpec`` an experiment ran a dataset with, or None when unknown."""
    from ovseg_core.datasets import get_dataset

    try:
        return get_dataset(specs[(experiment, dataset)])
    except (KeyError, ValueError):
        return None


def _name_background(scores: Sequence[MethodScores], specs: Mapping[tuple[str, str], str]) -> None:
    """Show class 0 of datasets with a background class as "background" (older stores name VOC21's class 0 by the
    first word of its line of stuff words)."""
    for s in scores:
        spec = _spec(specs, s.experiment, s.dataset)
        if spec is not None and spec.has_background and s.class_names:
            s.class_names[0] = "background"


def _method_config(store, ms: MethodScores) -> dict[str, Any]:
    """The method config of the prediction stage key (followed to ``reconstruction`` for ``map_correction``)."""
    payload = ms.params
    params = payload.get("params", {}) if isinstance(payload, dict) else {}
    if "config" not in params:
        rec_key = (payload.get("upstream") or {}).get("reconstruction") if isinstance(payload, dict) else None
        if rec_key:
            params = store.stage_attrs("reconstruction", rec_key).get("stage_key", {}).get("params", {})
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


# ----------------------------------------------------------------------------- figures
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def _css(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _chip(i: int, names: Sequence[str], ignore: int) -> dict[str, Any]:
    return {"index": i, "name": names[i] if i < len(names) else str(i), "color": _css(class_color(i, ignore))}


def _score_rows(scores: Sequence[MethodScores], started: Mapping[str, datetime]) -> list[dict[str, Any]]:
    exp_order = {e: i for i, e in enumerate(dict.fromkeys(s.experiment for s in scores))}
    ds_order = {d: i for i, d in enumerate(dict.fromkeys(s.dataset for s in scores))}
    rows = []
    for s in sorted(scores, key=lambda s: (exp_order[s.experiment], ds_order[s.dataset])):  # methods keep table order
        incomplete = s.images_total > 0 and (s.images < s.images_total or s.complete is False)
        rows.append({"experiment": s.experiment, "dataset": s.dataset, "method": s.method, "random": s.random_weights,
                     "miou": _pct(s.miou), "aacc": _pct(s.aacc), "images": s.images,
                     "total": s.images_total or None, "incomplete": incomplete, "run_id": s.run_id,
                     "date": _run_date(s.run_id, started)})
    return rows


def _class_table(entries: Sequence[MethodScores], names: Sequence[str], ignore: int) -> list[dict[str, Any]]:
    return [{**_chip(i, names, ignore), "iou": [_pct(e.iou[i]) if i < len(e.iou) else "–" for e in entries]}
            for i in range(len(names))]


def _fmt(v: Any) -> str:
    return "—" if v is None else v if isinstance(v, str) else json.dumps(v)


def _ablations(store, scores: Sequence[MethodScores]) -> list[dict[str, Any]]:
    # An ablation compares parameter sets of one method (corrclip rows with corrclip rows, ...).
    groups: dict[tuple[str, str, str], list[tuple[MethodScores, dict[str, Any]]]] = {}
    for s in scores:
        cfg = _method_config(store, s)
        groups.setdefault((s.experiment, s.dataset, str(cfg["method"])), []).append((s, cfg))
    out = []
    for (exp, ds, method), members in groups.items():
        if len(members) < 2:
            continue
        ref, ref_cfg = members[0]
        rows = []
        for m, cfg in members:
            sw_ref, sw = ref_cfg["switches"], cfg["switches"]
            diff = [f"{k}: {_fmt(sw_ref.get(k))} → {_fmt(sw.get(k))}" for k in sorted(set(sw) | set(sw_ref))
                    if sw.get(k) != sw_ref.get(k)]
            other_ref, other = {**ref_cfg["other"], **ref_cfg["top"]}, {**cfg["other"], **cfg["top"]}
            odiff = [f"{k}: {_fmt(other_ref.get(k))} → {_fmt(other.get(k))}" for k in sorted(set(other) | set(other_ref))
                     if other.get(k) != other_ref.get(k)]
            if cfg["method"] != ref_cfg["method"]:
                odiff.insert(0, f"method: {_fmt(ref_cfg['method'])} → {_fmt(cfg['method'])}")
            d = None if m is ref or m.miou is None or ref.miou is None else 100.0 * (m.miou - ref.miou)
            rows.append({"experiment": m.experiment, "method": m.method, "random": m.random_weights, "miou": _pct(m.miou),
                         "delta": "reference" if m is ref else "–" if d is None else f"{d:+.2f}",
                         "sign": "" if d is None or d == 0 else "pos" if d > 0 else "neg", "switches": diff, "other": odiff})
        out.append({"experiment": exp, "dataset": ds, "method": method, "random": any(m.random_weights for m, _ in members),
                    "rows": rows})
    return out


def _samples(store, scores: Sequence[MethodScores], specs: Mapping[tuple[str, str], str], samples: int, fig_dir: Path,
             figures: list[Path]) -> list[dict[str, Any]]:
    from ovseg_core.metrics import convert_labels
    from storage.images import load_label, load_rgb
    from storage.tables import read_table

    groups: dict[tuple[str, str], list[MethodScores]] = {}
    for s in scores:
        groups.setdefault((s.experiment, s.dataset), []).append(s)
    out = []
    for (exp, ds), members in groups.items():
        rnd = any(m.random_weights for m in members)
        names = max((m.class_names for m in members), key=len)
        group = {"experiment": exp, "dataset": ds, "random": rnd, "notes": [], "images": [],
                 "class0": names[0] if names else "0"}
        out.append(group)
        notes = group["notes"]
        try:
            manifest = read_table(store, "manifests", [ds]).to_pylist()
        except Exception as e:
            notes.append(f"manifest {ds!r} unavailable ({e}); re-run the experiment to ingest it")
            continue
        manifest = sorted((r for r in manifest if r.get("status", "ok") == "ok"), key=lambda r: r["image_id"])[:samples]
        if not manifest:
            notes.append(f"manifest {ds!r} has no readable images")
            continue
        spec = _spec(specs, exp, ds)
        if spec is None:
            notes.append(f"dataset spec of {ds!r} unknown: ground truth shown without label conversion")
        ignore = spec.ignore_index if spec else 255
        for row in manifest:
            iid = row["image_id"]
            gt_present: set[int] = set()
            pred_present: set[int] = set()
            try:
                rgb = load_rgb(row["abs_path"])
            except (ValueError, OSError) as e:
                rgb = None
                notes.append(f"{iid}: input image unavailable ({e})")
            panels = [("input", rgb, "image file missing")]
            gt = None
            if row.get("gt_path"):
                try:
                    raw = load_label(row["gt_path"])
                    gt = convert_labels(raw, spec.label_conversion, spec.ignore_index) if spec else raw.astype(np.int64)
                except (ValueError, OSError) as e:
                    notes.append(f"{iid}: ground truth unavailable ({e})")
            panels.append(("ground truth", _paint(rgb, gt, ignore, gt_present, notes, f"{iid}: ground truth"),
                           "no ground truth"))
            for m in members:
                try:
                    pred = store.read_item(m.prediction_stage, m.prediction_key, iid, ["labels"])["labels"]
                    img = _paint(rgb, pred.astype(np.int64), ignore, pred_present, notes, f"{iid}: prediction of {m.method}")
                    note = ""
                except Exception as e:  # missing, partial or damaged item: a note on the page, never a crash
                    img, note = None, "prediction missing"
                    notes.append(f"{iid}: prediction of {m.method} unavailable ({e.args[0] if e.args else e})")
                panels.append((m.method + (f" {RANDOM_TAG}" if m.random_weights else ""), img, note))
            fig = _sample_figure(f"{exp} — {ds} — {iid}", panels, rnd)
            path, b64 = _save(fig, fig_dir, f"sample_{_safe(exp)}_{_safe(ds)}_{_safe(iid)}.png")
            figures.append(path)
            gt_present.discard(ignore)
            pred_present.discard(ignore)
            group["images"].append({"id": iid, "b64": b64,
                                    "gt": [_chip(i, names, ignore) for i in sorted(gt_present)],
                                    "pred": [_chip(i, names, ignore) for i in sorted(pred_present - gt_present)]})
    return out


def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("flows", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


# ----------------------------------------------------------------------------- entry point
def write_report(store: str | None, out: str | os.PathLike, experiments: list[str] | None = None, samples: int = 4) -> Path:
    """Write the HTML report of the experiments in a store.

    Args:
        store: store location (path or fsspec URL; None = ``$OVSEG_STORE`` or ``./ovseg-store``).
        out: output folder; receives ``index.html`` and ``figures/*.png``.
        experiments: experiment names to include (None = all).
        samples: images per dataset shown as overlays (>= 0).

    Returns:
        Path of ``index.html``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from storage.store import Store
    from storage.tables import read_table

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
    st = Store(store)
    out_dir = Path(out)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    notes: list[str] = []
    try:
        rows = read_table(st, "metrics").to_pylist()
    except Exception as e:
        rows = []
        notes.append(f"metrics table unreadable ({e})")
    scores = _newest_scores(rows, experiments)
    if experiments:
        found = {s.experiment for s in scores}
        notes += [f"experiment {e!r} has no metrics in this store" for e in experiments if e not in found]
    figures: list[Path] = []
    page: dict[str, Any] = {
        "store": st.location, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "random": any(s.random_weights for s in scores), "notes": notes, "scores": [], "datasets": [], "ablations": [],
        "samples": [], "sample_count": samples, "alpha": OVERLAY_ALPHA, "banner": RANDOM_BANNER, "tag": RANDOM_TAG,
        "ignore_color": _css(IGNORE_COLOR), "class0_color": _css(CLASS0_COLOR), "row_classes": CHART_ROW_CLASSES,
    }
    if scores:
        specs, started = _run_records(st, notes)
        _name_background(scores, specs)
        page["scores"] = _score_rows(scores, started)
        for ds in dict.fromkeys(s.dataset for s in scores):
            entries = [s for s in scores if s.dataset == ds]
            names = max((e.class_names for e in entries), key=len)
            spec = _spec(specs, entries[0].experiment, ds)
            item = {"name": ds, "random": any(e.random_weights for e in entries), "methods": [e.label for e in entries],
                    "chart": None, "classes": _class_table(entries, names, spec.ignore_index if spec else 255)}
            if names:
                path, item["chart"] = _save(_iou_figure(ds, entries, names), fig_dir, f"iou_{_safe(ds)}.png")
                figures.append(path)
            page["datasets"].append(item)
        page["ablations"] = _ablations(st, scores)
        page["samples"] = _samples(st, scores, specs, samples, fig_dir, figures)
    html_text = _template().render(page=page)
    index = out_dir / "index.html"
    tmp = out_dir / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(html_text, encoding="utf-8")
    os.replace(tmp, index)
    log.info("report: %s (%d figures)", index, len(figures))
    return index
