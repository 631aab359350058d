"""The HTML report (``ovseg report``): scores, per-class IoU, ablations and sample overlays.

``write_report`` reads the store's tables (``metrics``, ``runs``, ``manifests``), the run
journals and the prediction stage outputs (``flows.report_data``), and writes ``<out>/index.html`` (one self-contained file: inline
CSS, figures embedded as base64 PNGs) plus the same figures as PNG files in ``<out>/figures``.
The page comes from the Jinja2 template ``flows/templates/report.html.j2`` (autoescaped:
experiment, method and class names are text, never markup).

Sections:

1. Scores: one row per experiment / dataset / method (the newest run of each; run ids start
   with their UTC start time, so they sort by time): mIoU, aAcc (%), images scored (of the
   dataset's total where the metrics table records it, incomplete rows flagged), run id, run
   date, the run's ``--set`` overrides and the memory bank the predictions used (``flows.report_banks``); then
   the datasets without scores (no ground truth).
2. Per-class IoU: one bar chart per dataset, wrapped into rows of at most
   ``CHART_ROW_CLASSES`` classes so that it fits the page (title and legend always in view),
   and a class table (colour, index, name, IoU per method) as HTML text.
3. Ablations: within one experiment and dataset, the boolean component switches of the method
   config (``params.config`` of the prediction stage key) that differ from the first method,
   with the mIoU delta.
4. Samples: the first ``samples`` image ids (sorted) of each dataset: input, ground truth
   (converted as the scores were: ``reduce_zero_label`` for ADE20K, ...) and each method's
   prediction overlaid, with the classes present listed as HTML text (colour swatch, index,
   name) below each figure, and a line per method recording per-window choices or its bank's support.
   Datasets without ground truth show their predictions and a note.

Runs with random-weight backbones are flagged in every section and every figure. Missing
inputs (no metrics yet, a moved image, a missing prediction) become notes on the page.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from flows.overlay import CLASS0_COLOR, IGNORE_COLOR, class_color, has_background
from flows.report_banks import bank_used, sample_record
from flows.report_data import (
    RANDOM_TAG,
    DatasetView,
    MethodScores,
    Prediction,
    RunInfo,
    dataset_views,
    load_runs,
    method_config,
    name_background,
    newest_scores,
    run_date,
)
from flows.report_figures import CHART_ROW_CLASSES, OVERLAY_ALPHA, iou_figure, paint, safe, sample_figure, save
from ovseg_core.metrics import convert_labels
from storage.images import load_label, load_rgb
from storage.store import Store
from storage.tables import read_table

log = logging.getLogger("ovseg.report")

__all__ = ["RANDOM_BANNER", "RANDOM_TAG", "MethodScores", "write_report"]

RANDOM_BANNER = "RANDOM WEIGHTS — scores are meaningless"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def _css(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _chip(i: int, names: Sequence[str], ignore: int) -> dict[str, Any]:
    color = class_color(i, ignore, has_background(names))
    return {"index": i, "name": names[i] if i < len(names) else str(i), "color": _css(color)}


def _score_rows(store: Store, scores: Sequence[MethodScores], runs: Mapping[str, RunInfo]) -> list[dict[str, Any]]:
    exp_order = {e: i for i, e in enumerate(dict.fromkeys(s.experiment for s in scores))}
    ds_order = {d: i for i, d in enumerate(dict.fromkeys(s.dataset for s in scores))}
    rows = []
    for s in sorted(scores, key=lambda s: (exp_order[s.experiment], ds_order[s.dataset])):  # methods keep table order
        incomplete = s.images_total > 0 and (s.images < s.images_total or s.complete is False)
        info = runs.get(s.run_id)
        bank = bank_used(store, s.prediction_stage, s.prediction_key)
        rows.append({"experiment": s.experiment, "dataset": s.dataset, "method": s.method, "random": s.random_weights,
                     "miou": _pct(s.miou), "aacc": _pct(s.aacc), "images": s.images,
                     "total": s.images_total or None, "incomplete": incomplete, "run_id": s.run_id,
                     "date": run_date(s.run_id, runs), "overrides": list(info.overrides) if info else [],
                     "bank": bank.summary() if bank is not None else "–"})
    return rows


def _class_table(entries: Sequence[MethodScores], names: Sequence[str], ignore: int) -> list[dict[str, Any]]:
    return [{**_chip(i, names, ignore), "iou": [_pct(e.iou[i]) if i < len(e.iou) else "–" for e in entries]}
            for i in range(len(names))]


def _fmt(v: Any) -> str:
    return "—" if v is None else v if isinstance(v, str) else json.dumps(v)


def _diff(ref: Mapping[str, Any], cur: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {_fmt(ref.get(k))} → {_fmt(cur.get(k))}" for k in sorted(set(cur) | set(ref)) if cur.get(k) != ref.get(k)]


def _ablations(store: Store, scores: Sequence[MethodScores]) -> list[dict[str, Any]]:
    # An ablation compares parameter sets of one method (corrclip rows with corrclip rows, ...).
    groups: dict[tuple[str, str, str], list[tuple[MethodScores, dict[str, Any]]]] = {}
    for s in scores:
        cfg = method_config(store, s)
        groups.setdefault((s.experiment, s.dataset, str(cfg["method"])), []).append((s, cfg))
    out = []
    for (exp, ds, method), members in groups.items():
        if len(members) < 2:
            continue
        ref, ref_cfg = members[0]
        rows = []
        for m, cfg in members:
            odiff = _diff({**ref_cfg["other"], **ref_cfg["top"]}, {**cfg["other"], **cfg["top"]})
            if cfg["method"] != ref_cfg["method"]:
                odiff.insert(0, f"method: {_fmt(ref_cfg['method'])} → {_fmt(cfg['method'])}")
            d = None if m is ref or m.miou is None or ref.miou is None else 100.0 * (m.miou - ref.miou)
            rows.append({"experiment": m.experiment, "method": m.method, "random": m.random_weights, "miou": _pct(m.miou),
                         "delta": "reference" if m is ref else "–" if d is None else f"{d:+.2f}",
                         "sign": "" if d is None or d == 0 else "pos" if d > 0 else "neg",
                         "switches": _diff(ref_cfg["switches"], cfg["switches"]), "other": odiff})
        out.append({"experiment": exp, "dataset": ds, "method": method, "random": any(m.random_weights for m, _ in members),
                    "rows": rows})
    return out


def _sample_groups(scores: Sequence[MethodScores], views: Mapping[tuple[str, str], DatasetView]
                   ) -> list[tuple[str, str, list[Prediction], bool]]:
    """``(experiment, dataset, predictions, scored)``: scored datasets in table order, then those without scores."""
    groups: dict[tuple[str, str], list[Prediction]] = {}
    for s in scores:
        groups.setdefault((s.experiment, s.dataset), []).append(
            Prediction(s.method, s.prediction_stage, s.prediction_key, s.random_weights, s.class_names))
    out = [(e, d, preds, True) for (e, d), preds in groups.items()]
    return out + [(e, d, v.predictions, False) for (e, d), v in views.items() if (e, d) not in groups and v.predictions]


def _samples(store: Store, groups: Sequence[tuple[str, str, list[Prediction], bool]],
             views: Mapping[tuple[str, str], DatasetView], samples: int, fig_dir: Path, figures: list[Path],
             unscored: list[dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    for exp, ds, members, scored in groups:
        rnd = any(m.random_weights for m in members)
        names = max((m.class_names for m in members), key=len)
        background = has_background(names)
        group = {"experiment": exp, "dataset": ds, "random": rnd, "notes": [], "images": [], "background": background,
                 "class0": names[0] if names else "0"}
        out.append(group)
        notes = group["notes"]
        try:
            manifest = read_table(store, "manifests", [ds]).to_pylist()
        except Exception as e:
            notes.append(f"manifest {ds!r} unavailable ({e}); re-run the experiment to ingest it")
            continue
        if not scored:
            why = ("has no ground truth: its predictions are shown, nothing is scored"
                   if not any(r.get("gt_path") for r in manifest) else "has no scores yet (run `ovseg run` to score it)")
            unscored.append({"experiment": exp, "dataset": ds, "why": why})
            notes.append(f"{ds!r} {why}")
        manifest = sorted((r for r in manifest if r.get("status", "ok") == "ok"), key=lambda r: r["image_id"])[:samples]
        if not manifest:
            notes.append(f"manifest {ds!r} has no readable images")
            continue
        view = views.get((exp, ds))
        conversion = view.conversion if view is not None else None
        ignore = view.ignore_index if view is not None else 255
        if conversion is None and any(r.get("gt_path") for r in manifest):
            notes.append(f"dataset spec of {ds!r} unknown: ground truth shown without label conversion")
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
                    gt = convert_labels(raw, conversion, ignore) if conversion else raw.astype(np.int64)
                except (ValueError, OSError) as e:
                    notes.append(f"{iid}: ground truth unavailable ({e})")
            panels.append(("ground truth", paint(rgb, gt, ignore, background, gt_present, notes, f"{iid}: ground truth"),
                           "no ground truth"))
            records = []
            for m in members:
                for text in (_window_record(store, m, iid), sample_record(store, m.stage, m.key, iid)):
                    if text:
                        records.append({"method": m.method, "text": text})
                try:
                    pred = store.read_item(m.stage, m.key, iid, ["labels"])["labels"]
                    img = paint(rgb, pred.astype(np.int64), ignore, background, pred_present, notes,
                                f"{iid}: prediction of {m.method}")
                    note = ""
                except Exception as e:  # missing, partial or damaged item: a note on the page, never a crash
                    img, note = None, "prediction missing"
                    notes.append(f"{iid}: prediction of {m.method} unavailable ({e.args[0] if e.args else e})")
                panels.append((m.method + (f" {RANDOM_TAG}" if m.random_weights else ""), img, note))
            fig = sample_figure(f"{exp} — {ds} — {iid}", panels, rnd)
            path, b64 = save(fig, fig_dir, f"sample_{safe(exp)}_{safe(ds)}_{safe(iid)}.png")
            figures.append(path)
            gt_present.discard(ignore)
            pred_present.discard(ignore)
            group["images"].append({"id": iid, "b64": b64, "has_gt": gt is not None, "records": records,
                                    "gt": [_chip(i, names, ignore) for i in sorted(gt_present)],
                                    "pred": [_chip(i, names, ignore) for i in sorted(pred_present - gt_present)]})
    return out


def _window_record(store: Store, m: Prediction, iid: str) -> str:
    """What a method's options chose in this image's windows (SC-CLIP's design-document options store it as the
    ``window_record`` attrs of its reconstruction items: ``{name: windows}``), as one line; "" when none."""
    try:
        attrs = store.item_attrs(m.stage, m.key, iid)
    except Exception:  # noqa: BLE001 - a missing or damaged item is noted by the prediction panel
        return ""
    record, windows = attrs.get("window_record"), attrs.get("windows")
    if not isinstance(record, dict) or not record:
        return ""
    of = f"/{windows}" if isinstance(windows, int) else ""
    kept = [f"{k[5:]} {v}{of}" for k, v in sorted(record.items()) if k.startswith("kept:")]
    paths = [f"{k[5:]} {v}" for k, v in record.items() if k.startswith("path:") and v]
    other = [f"{k} {v}" for k, v in sorted(record.items()) if not k.startswith(("kept:", "path:"))]
    parts = ([f"steps kept in windows: {', '.join(kept)}"] if kept else []) + \
        ([f"paths: {', '.join(paths)}"] if paths else []) + other
    return "; ".join(parts)


def _template():
    env = Environment(loader=PackageLoader("flows", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


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
    matplotlib.use("Agg")
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
    scores = newest_scores(rows, experiments)
    runs = load_runs(st, notes)
    views = dataset_views(st, runs, scores, experiments)
    if experiments:
        found = {s.experiment for s in scores} | {e for e, _ in views}
        notes += [f"experiment {e!r} has no metrics and no recorded run in this store" for e in experiments
                  if e not in found]
    name_background(scores, views)
    figures: list[Path] = []
    groups = _sample_groups(scores, views)
    page: dict[str, Any] = {
        "store": st.location, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "random": any(m.random_weights for *_, preds, _ in groups for m in preds), "notes": notes,
        "scores": _score_rows(st, scores, runs), "datasets": [], "ablations": _ablations(st, scores), "unscored": [],
        "sample_count": samples, "alpha": OVERLAY_ALPHA, "banner": RANDOM_BANNER, "tag": RANDOM_TAG,
        "ignore_color": _css(IGNORE_COLOR), "class0_color": _css(CLASS0_COLOR), "row_classes": CHART_ROW_CLASSES,
    }
    for ds in dict.fromkeys(s.dataset for s in scores):
        entries = [s for s in scores if s.dataset == ds]
        names = max((e.class_names for e in entries), key=len)
        view = views.get((entries[0].experiment, ds))
        item = {"name": ds, "random": any(e.random_weights for e in entries), "methods": [e.label for e in entries],
                "chart": None, "classes": _class_table(entries, names, view.ignore_index if view else 255)}
        if names:
            path, item["chart"] = save(iou_figure(ds, entries, names), fig_dir, f"iou_{safe(ds)}.png")
            figures.append(path)
        page["datasets"].append(item)
    page["samples"] = _samples(st, groups, views, samples, fig_dir, figures, page["unscored"])
    html_text = _template().render(page=page)
    index = out_dir / "index.html"
    tmp = out_dir / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(html_text, encoding="utf-8")
    os.replace(tmp, index)
    log.info("report: %s (%d figures)", index, len(figures))
    return index
