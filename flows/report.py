"""The HTML report (``ovseg report``): scores, per-class IoU, ablations and sample overlays.

``write_report`` reads the store's tables (``metrics``, ``runs``, ``manifests``) and the
prediction stage outputs, and writes ``<out>/index.html`` (one self-contained file: inline
CSS, figures embedded as base64 PNGs) plus the same figures as PNG files in ``<out>/figures``.

Sections:

1. Scores: rows experiment / method, columns mIoU and aAcc (%) per dataset. For every
   (experiment, dataset, method) the newest run's rows are used (run ids start with their UTC
   start time, so they sort by time).
2. Per-class IoU bar charts, one per dataset.
3. Ablations: within one experiment and dataset, the boolean component switches of the method
   config (``params.config`` of the prediction stage key) that differ from the first method,
   with the mIoU delta.
4. Samples: the first ``samples`` image ids (sorted) of each dataset: input, ground truth and
   each method's prediction overlaid, with a legend of the classes present.

Runs with random-weight backbones are flagged in every section and every figure. Missing
inputs (no metrics yet, a moved image, a missing prediction) become notes on the page.
"""

from __future__ import annotations

import base64
import html
import io
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

from flows.overlay import colorize, legend_patches, overlay

log = logging.getLogger("ovseg.report")

__all__ = ["RANDOM_BANNER", "RANDOM_TAG", "MethodScores", "write_report"]

RANDOM_BANNER = "RANDOM WEIGHTS — scores are meaningless"
RANDOM_TAG = "[random weights]"
OVERLAY_ALPHA = 0.55  # label colour weight of the sample overlays
FIGURE_DPI = 90  # resolution of the saved figures
SAMPLE_PANEL_INCHES = 3.2  # width of one sample panel
WIDE_CHART_CLASSES = 40  # above this many classes the IoU chart keeps its natural width (scrolls) to stay legible
BAR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22")  # no red: red = random

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;
  padding:0 16px}
h1{font-size:26px;margin-bottom:4px}
h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin:18px 0 6px}
.meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 9px;text-align:right}
th{background:#f0f0f0}
td.l,th.l{text-align:left}
tr.rnd td{background:#fff1f1}
.banner{background:#c62828;color:#fff;font-weight:bold;padding:8px 12px;margin:10px 0;border-radius:4px}
.tag{color:#c62828;font-weight:bold;font-size:12px}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px;margin:8px 0;font-size:13px}
.pos{color:#2e7d32}
.neg{color:#c62828}
img.fig{max-width:100%;border:1px solid #eee;margin:6px 0}
.scroll{overflow-x:auto}
img.wide{max-width:none}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


@dataclass
class MethodScores:
    """The newest metrics of one (experiment, dataset, method)."""

    experiment: str
    dataset: str
    method: str
    run_id: str
    miou: float | None
    aacc: float | None
    images: int
    random_weights: bool
    prediction_stage: str
    prediction_key: str
    params: dict[str, Any]
    class_names: list[str] = field(default_factory=list)
    iou: list[float | None] = field(default_factory=list)


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
            out[k] = MethodScores(*k, r["run_id"], None, None, int(r["images"]), bool(r["random_weights"]),
                                  r["prediction_stage"], r["prediction_key"], params)
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


def _dataset_specs(store, notes: list[str]) -> dict[tuple[str, str], str]:
    """``(experiment, dataset name) -> dataset spec name`` from the run records' experiment dumps (newest wins)."""
    from storage.tables import read_table

    try:
        runs = read_table(store, "runs").select(["run_id", "experiment", "config_json"]).to_pylist()
    except Exception as e:  # a damaged run table only costs the ground-truth conversion
        notes.append(f"run records unreadable ({e}); ground truth is shown unconverted where the spec is unknown")
        return {}
    specs: dict[tuple[str, str], str] = {}
    seen: set[str] = set()
    for r in sorted(runs, key=lambda r: r["run_id"]):
        if r["run_id"] in seen:
            continue
        seen.add(r["run_id"])
        try:
            cfg = json.loads(r["config_json"])
            for d in cfg.get("datasets", []):
                specs[(r["experiment"], d["name"])] = d["spec"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return specs


def _name_background(scores: Sequence[MethodScores], specs: Mapping[tuple[str, str], str]) -> None:
    """Show class 0 of datasets with a background class as "background" (VOC21's class line 0 is a list of stuff words)."""
    from ovseg_core.datasets import get_dataset

    for s in scores:
        try:
            spec = get_dataset(specs[(s.experiment, s.dataset)])
        except (KeyError, ValueError):
            continue
        if spec.has_background and s.class_names:
            s.class_names[0] = "background"


def _method_config(store, ms: MethodScores) -> dict[str, Any]:
    """The method config of the prediction stage key (followed to ``reconstruction`` for ``map_correction``)."""
    payload = ms.params
    params = payload.get("params", {}) if isinstance(payload, dict) else {}
    if "config" not in params:
        rec_key = (payload.get("upstream") or {}).get("reconstruction") if isinstance(payload, dict) else None
        if rec_key:
            params = store.stage_attrs("reconstruction", rec_key).get("stage_key", {}).get("params", {})
    cfg = params.get("config")
    out: dict[str, Any] = {}
    _flatten(cfg, "", out)
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
def _save(fig, folder: Path, name: str) -> tuple[Path, str]:
    """Save a figure as PNG in ``folder``; returns its path and base64 text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    data = buf.getvalue()
    path = folder / name
    path.write_bytes(data)
    return path, base64.b64encode(data).decode("ascii")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _iou_figure(dataset: str, entries: Sequence[MethodScores]):
    from matplotlib.figure import Figure

    names = max((e.class_names for e in entries), key=len)
    n, m = len(names), len(entries)
    width = min(max(10.0, 2.0 + n * (0.12 + 0.06 * m)), 40.0)
    fig = Figure(figsize=(width, 4.2))
    ax = fig.add_subplot()
    bar_w = 0.8 / max(m, 1)
    x = np.arange(n)
    for j, e in enumerate(entries):
        vals = np.array([np.nan if v is None else 100.0 * v for v in e.iou] + [np.nan] * (n - len(e.iou)))
        label = f"{e.experiment} / {e.method}" + (f" {RANDOM_TAG}" if e.random_weights else "")
        ax.bar(x - 0.4 + bar_w * (j + 0.5), np.nan_to_num(vals), bar_w, label=label, color=BAR_COLORS[j % len(BAR_COLORS)],
               hatch="//" if e.random_weights else None, edgecolor="white", linewidth=0.3)
    ax.set_xticks(x, names, rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.grid(axis="y", alpha=0.3)
    rnd = any(e.random_weights for e in entries)
    ax.set_title(f"{dataset}: per-class IoU" + (f"  {RANDOM_TAG}" if rnd else ""), color="#c62828" if rnd else "black")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    return fig


def _sample_figure(title: str, panels: Sequence[tuple[str, np.ndarray | None, str]], class_names: Sequence[str],
                   present: set[int], random_weights: bool, ignore_index: int):
    """One row of panels (label, RGB image or None, note) and a legend of the classes present."""
    from matplotlib.figure import Figure

    k = len(panels)
    handles = legend_patches(class_names, present, ignore_index=ignore_index)
    legend_rows = (len(handles) + 5) // 6
    height = SAMPLE_PANEL_INCHES + 0.7 + 0.25 * legend_rows  # panels + titles + legend, in inches
    fig = Figure(figsize=(SAMPLE_PANEL_INCHES * k, height))
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, (label, img, note) in zip(axes, panels):
        ax.set_axis_off()
        ax.set_title(label, fontsize=9)
        if img is not None:
            ax.imshow(img, interpolation="nearest")
        else:
            ax.text(0.5, 0.5, note or "not available", ha="center", va="center", wrap=True, fontsize=8, color="#a00",
                    transform=ax.transAxes)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title + (f"  {RANDOM_TAG}" if random_weights else ""), fontsize=10,
                 color="#c62828" if random_weights else "black")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=(0.1 + 0.25 * legend_rows) / height, top=1.0 - 0.6 / height,
                        wspace=0.03)
    return fig


# ----------------------------------------------------------------------------- html pieces
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def _banner(random_weights: bool) -> str:
    return f'<div class="banner">{html.escape(RANDOM_BANNER)}</div>' if random_weights else ""


def _tag(random_weights: bool) -> str:
    return f' <span class="tag">{RANDOM_TAG}</span>' if random_weights else ""


def _note(text: str) -> str:
    return f'<div class="note">{html.escape(text)}</div>'


def _img(b64: str, alt: str, wide: bool = False) -> str:
    """An embedded PNG; ``wide`` keeps its natural width inside a horizontally scrolling box (many classes)."""
    return f'<img class="fig{" wide" if wide else ""}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _row_label(ms: MethodScores) -> str:
    return f"{html.escape(ms.experiment)} / {html.escape(ms.method)}{_tag(ms.random_weights)}"


def _scores_section(scores: Sequence[MethodScores], datasets: Sequence[str]) -> str:
    rnd = any(s.random_weights for s in scores)
    head = "".join(f'<th colspan="2">{html.escape(d)}</th>' for d in datasets)
    sub = "".join("<th>mIoU</th><th>aAcc</th>" for _ in datasets)
    rows = []
    by_row: dict[tuple[str, str], dict[str, MethodScores]] = {}
    for s in scores:
        by_row.setdefault((s.experiment, s.method), {})[s.dataset] = s
    for (exp, meth), per_ds in by_row.items():
        any_rnd = any(s.random_weights for s in per_ds.values())
        label = f"{html.escape(exp)} / {html.escape(meth)}{_tag(any_rnd)}"
        cells = "".join(
            (f"<td>{_pct(per_ds[d].miou)}</td><td>{_pct(per_ds[d].aacc)}</td>" if d in per_ds else "<td>–</td><td>–</td>")
            for d in datasets
        )
        rows.append(f'<tr class="{"rnd" if any_rnd else ""}"><td class="l">{label}</td>{cells}</tr>')
    return (f"<h2>1. Scores (%)</h2>{_banner(rnd)}"
            f'<table><tr><th class="l" rowspan="2">experiment / method</th>{head}</tr><tr>{sub}</tr>{"".join(rows)}</table>'
            '<p class="meta">mIoU and aAcc in %, newest run of each experiment / dataset / method; '
            "– = not scored.</p>")


def _fmt(v: Any) -> str:
    return "—" if v is None else html.escape(json.dumps(v) if not isinstance(v, str) else v)


def _ablation_section(store, scores: Sequence[MethodScores]) -> str:
    # An ablation compares parameter sets of one method (corrclip rows with corrclip rows, ...).
    groups: dict[tuple[str, str, str], list[tuple[MethodScores, dict[str, Any]]]] = {}
    for s in scores:
        cfg = _method_config(store, s)
        groups.setdefault((s.experiment, s.dataset, str(cfg["method"])), []).append((s, cfg))
    parts, rnd = [], False
    for (exp, ds, method), pairs in groups.items():
        if len(pairs) < 2:
            continue
        members = [m for m, _ in pairs]
        cfgs = [c for _, c in pairs]
        rnd |= any(m.random_weights for m in members)
        ref, ref_cfg = members[0], cfgs[0]
        rows = []
        for m, cfg in zip(members, cfgs):
            keys = sorted(set(cfg["switches"]) | set(ref_cfg["switches"]))
            diff = [f"{html.escape(k)}: {_fmt(ref_cfg['switches'].get(k))} → <b>{_fmt(cfg['switches'].get(k))}</b>"
                    for k in keys if cfg["switches"].get(k) != ref_cfg["switches"].get(k)]
            other_ref = {**ref_cfg["other"], **ref_cfg["top"]}
            other = {**cfg["other"], **cfg["top"]}
            odiff = [f"{html.escape(k)}: {_fmt(other_ref.get(k))} → {_fmt(other.get(k))}"
                     for k in sorted(set(other) | set(other_ref)) if other.get(k) != other_ref.get(k)]
            if cfg["method"] != ref_cfg["method"]:
                odiff.insert(0, f"method: {_fmt(ref_cfg['method'])} → {_fmt(cfg['method'])}")
            if m is ref:
                delta = "reference"
            elif m.miou is None or ref.miou is None:
                delta = "–"
            else:
                d = 100.0 * (m.miou - ref.miou)
                delta = f'<span class="{"pos" if d > 0 else "neg" if d < 0 else ""}">{d:+.2f}</span>'
            rows.append(f'<tr class="{"rnd" if m.random_weights else ""}"><td class="l">{_row_label(m)}</td>'
                        f"<td>{_pct(m.miou)}</td><td>{delta}</td><td class='l'>{'<br>'.join(diff) or '—'}</td>"
                        f"<td class='l'>{'<br>'.join(odiff) or '—'}</td></tr>")
        parts.append(f"<h3>{html.escape(exp)} — {html.escape(ds)} — {html.escape(method)}"
                     f"{_tag(any(m.random_weights for m in members))}</h3>"
                     '<table><tr><th class="l">method</th><th>mIoU</th><th>Δ mIoU (pp)</th>'
                     '<th class="l">component switches vs. reference</th><th class="l">other parameters vs. reference</th></tr>'
                     f"{''.join(rows)}</table>")
    body = "".join(parts) or _note("no experiment has two or more parameter sets of one method on the same dataset: "
                                   "nothing to compare (see configs/voc21-corrclip-ablation.yaml)")
    return (f"<h2>3. Ablations</h2>{_banner(rnd)}<p class='meta'>Parameter sets of the same method, compared with the "
            f"first one listed in the experiment (the reference).</p>{body}")


# ----------------------------------------------------------------------------- samples
def _sample_section(store, scores: Sequence[MethodScores], specs: Mapping[tuple[str, str], str], samples: int,
                    fig_dir: Path, figures: list[Path]) -> str:
    from ovseg_core.datasets import get_dataset
    from ovseg_core.metrics import convert_labels
    from storage.images import load_label, load_rgb
    from storage.tables import read_table

    groups: dict[tuple[str, str], list[MethodScores]] = {}
    for s in scores:
        groups.setdefault((s.experiment, s.dataset), []).append(s)
    parts, rnd_any = [], False
    for (exp, ds), members in groups.items():
        rnd = any(m.random_weights for m in members)
        rnd_any |= rnd
        head = f"<h3>{html.escape(exp)} — {html.escape(ds)}{_tag(rnd)}</h3>"
        try:
            manifest = read_table(store, "manifests", [ds]).to_pylist()
        except Exception as e:
            parts.append(head + _note(f"manifest {ds!r} unavailable ({e}); re-run the experiment to ingest it"))
            continue
        manifest = sorted((r for r in manifest if r.get("status", "ok") == "ok"), key=lambda r: r["image_id"])[:samples]
        if not manifest:
            parts.append(head + _note(f"manifest {ds!r} has no readable images"))
            continue
        spec_name = specs.get((exp, ds))
        spec = None
        if spec_name is not None:
            try:
                spec = get_dataset(spec_name)
            except ValueError:
                spec = None
        notes = [] if spec else [f"dataset spec of {ds!r} unknown: ground truth shown without label conversion"]
        ignore = spec.ignore_index if spec else 255
        names = max((m.class_names for m in members), key=len)
        imgs = []
        for row in manifest:
            iid = row["image_id"]
            panels, present = [], set()
            try:
                rgb = load_rgb(row["abs_path"])
            except (ValueError, OSError) as e:
                rgb = None
                notes.append(f"{iid}: input image unavailable ({e})")
            panels.append(("input", rgb, "image file missing"))
            gt = None
            if row.get("gt_path"):
                try:
                    raw = load_label(row["gt_path"])
                    gt = convert_labels(raw, spec.label_conversion, spec.ignore_index) if spec else raw.astype(np.int64)
                except (ValueError, OSError) as e:
                    notes.append(f"{iid}: ground truth unavailable ({e})")
            panels.append(("ground truth", _paint(rgb, gt, ignore, present, notes, f"{iid}: ground truth"), "no ground truth"))
            for m in members:
                try:
                    pred = store.read_item(m.prediction_stage, m.prediction_key, iid, ["labels"])["labels"]
                    img = _paint(rgb, pred.astype(np.int64), ignore, present, notes, f"{iid}: prediction of {m.method}")
                    note = ""
                except Exception as e:  # missing, partial or damaged item: a note on the page, never a crash
                    img, note = None, "prediction missing"
                    notes.append(f"{iid}: prediction of {m.method} unavailable ({e.args[0] if e.args else e})")
                panels.append((m.method + (f" {RANDOM_TAG}" if m.random_weights else ""), img, note))
            fig = _sample_figure(f"{exp} — {ds} — {iid}", panels, names, present, rnd, ignore)
            path, b64 = _save(fig, fig_dir, f"sample_{_safe(exp)}_{_safe(ds)}_{_safe(iid)}.png")
            figures.append(path)
            imgs.append(_img(b64, f"{ds} {iid}"))
        parts.append(head + "".join(_note(n) for n in notes) + "".join(imgs))
    body = "".join(parts) or _note("no scored predictions to show")
    return f"<h2>4. Samples</h2>{_banner(rnd_any)}<p class='meta'>First {samples} image ids (sorted) per dataset; " \
           f"overlays at alpha {OVERLAY_ALPHA}; black = ignore.</p>{body}"


def _paint(rgb: np.ndarray | None, labels: np.ndarray | None, ignore: int, present: set[int], notes: list[str],
           what: str) -> np.ndarray | None:
    """Overlay labels on the image (or colourise them when the image is missing or of another size)."""
    if labels is None:
        return None
    present.update(int(v) for v in np.unique(labels))
    if rgb is None:
        return colorize(labels, ignore_index=ignore)
    if rgb.shape[:2] != labels.shape:
        notes.append(f"{what} is {labels.shape[1]}x{labels.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]} "
                     "(the image file changed?): shown without the image")
        return colorize(labels, ignore_index=ignore)
    return overlay(rgb, labels, OVERLAY_ALPHA, ignore_index=ignore)


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
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rnd = any(s.random_weights for s in scores)
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ovseg report</title><style>{_CSS}</style>"
            f"</head><body><h1>ovseg report</h1><p class='meta'>store <code>{html.escape(st.location)}</code> · "
            f"generated {stamp}</p>{_banner(rnd)}")
    if not scores:
        body = _note("no metrics in this store yet: run an experiment first (ovseg run EXPERIMENT.yaml), "
                     "then ovseg report") + "".join(_note(n) for n in notes)
        html_text = f"{head}{body}</body></html>"
    else:
        specs = _dataset_specs(st, notes)
        _name_background(scores, specs)
        datasets = list(dict.fromkeys(s.dataset for s in scores))
        sec_iou = [f"<h2>2. Per-class IoU</h2>{_banner(rnd)}"]
        for ds in datasets:
            entries = [s for s in scores if s.dataset == ds]
            if not any(e.iou for e in entries):
                sec_iou.append(_note(f"{ds}: no per-class rows"))
                continue
            path, b64 = _save(_iou_figure(ds, entries), fig_dir, f"iou_{_safe(ds)}.png")
            figures.append(path)
            wide = max(len(e.class_names) for e in entries) > WIDE_CHART_CLASSES
            sec_iou.append(f'<div class="scroll">{_img(b64, f"per-class IoU {ds}", wide=wide)}</div>')
        html_text = "".join([
            head, "".join(_note(n) for n in notes),
            _scores_section(scores, datasets), "".join(sec_iou), _ablation_section(st, scores),
            _sample_section(st, scores, specs, samples, fig_dir, figures), "</body></html>",
        ])
    index = out_dir / "index.html"
    tmp = out_dir / f".index.html.tmp-{os.getpid()}"
    tmp.write_text(html_text, encoding="utf-8")
    os.replace(tmp, index)
    log.info("report: %s (%d figures)", index, len(figures))
    return index
