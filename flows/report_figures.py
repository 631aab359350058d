"""The report's figures (matplotlib): per-class IoU charts and sample overlays, saved as PNG and base64."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flows.overlay import colorize, overlay
from flows.report_data import RANDOM_TAG, MethodScores

OVERLAY_ALPHA = 0.55  # label colour weight of the sample overlays
FIGURE_DPI = 100  # resolution of the saved figures (pixels per inch)
CHART_WIDTH_INCHES = 12.4  # IoU chart width: 1240 px, inside the page's 1268 px text column
CHART_ROW_CLASSES = 50  # at most this many classes per chart row (150 classes: 3 rows of 50)
CHART_ROW_INCHES = 3.6  # height of one chart row (bars and rotated class names)
CHART_LABEL_CHARS = 18  # class names longer than this are shortened on the chart (the class table has them in full)
SAMPLE_PANEL_INCHES = 3.0  # width of one sample panel
BAR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22")  # no red: red = random


def save(fig, folder: Path, name: str) -> tuple[Path, str]:
    """Save a figure as PNG in ``folder``; returns its path and base64 text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    data = buf.getvalue()
    path = folder / name
    path.write_bytes(data)
    return path, base64.b64encode(data).decode("ascii")


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _short(name: str) -> str:
    return name if len(name) <= CHART_LABEL_CHARS else name[: CHART_LABEL_CHARS - 1] + "…"


def iou_figure(dataset: str, entries: Sequence[MethodScores], names: Sequence[str]):
    """Grouped bars (one per method) per class, wrapped into rows of at most ``CHART_ROW_CLASSES`` classes; the title
    and the legend sit at the top left, above the first row, inside the figure's width."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n, m = len(names), len(entries)
    rows = max(1, math.ceil(n / CHART_ROW_CLASSES))
    per_row = math.ceil(n / rows)
    fig = Figure(figsize=(CHART_WIDTH_INCHES, 0.9 + rows * CHART_ROW_INCHES), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    vals = np.array([[np.nan if v is None else 100.0 * v for v in e.iou] + [np.nan] * (n - len(e.iou)) for e in entries])
    bar_w = 0.8 / max(m, 1)
    styles = [{"color": BAR_COLORS[j % len(BAR_COLORS)], "hatch": "//" if e.random_weights else None}
              for j, e in enumerate(entries)]
    for r, ax in enumerate(axes):
        lo, hi = r * per_row, min(n, (r + 1) * per_row)
        x = np.arange(hi - lo)
        for j in range(m):
            ax.bar(x - 0.4 + bar_w * (j + 0.5), np.nan_to_num(vals[j, lo:hi]), bar_w, edgecolor="white", linewidth=0.3,
                   **styles[j])
        ax.set_xticks(x, [f"{i} {_short(names[i])}" for i in range(lo, hi)], rotation=60 if per_row > 8 else 0,
                      ha="right" if per_row > 8 else "center", rotation_mode="anchor", fontsize=9)
        ax.set_xlim(-0.6, per_row - 0.4)  # the same class width on every row
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)", fontsize=9)
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    rnd = any(e.random_weights for e in entries)
    handles = [Patch(facecolor=st["color"], hatch=st["hatch"], edgecolor="white", label=e.label)
               for e, st in zip(entries, styles)]
    # the title is the legend's title: both at the top left, never overlapping, whatever the number of methods
    legend = fig.legend(handles=handles, loc="outside upper left", ncol=min(m, 3), fontsize=9, frameon=False,
                        title=f"{dataset}: per-class IoU" + (f"  {RANDOM_TAG}" if rnd else ""), alignment="left",
                        title_fontproperties={"size": 12, "weight": "bold"})
    legend.get_title().set_color("#c62828" if rnd else "black")
    return fig


def sample_figure(title: str, panels: Sequence[tuple[str, np.ndarray | None, str]], random_weights: bool):
    """One row of panels (label, RGB image or None, note); the classes present are listed by the page, not the figure."""
    from matplotlib.figure import Figure

    k = len(panels)
    shapes = [img.shape for _, img, _ in panels if img is not None]
    aspect = shapes[0][0] / shapes[0][1] if shapes else 1.0  # panel height / width
    fig = Figure(figsize=(SAMPLE_PANEL_INCHES * k, SAMPLE_PANEL_INCHES * aspect + 0.7), layout="constrained")
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, (label, img, note) in zip(axes, panels):
        ax.set_axis_off()
        ax.set_title(label, fontsize=10)
        if img is not None:
            ax.imshow(img, interpolation="nearest")
        else:
            ax.text(0.5, 0.5, note or "not available", ha="center", va="center", wrap=True, fontsize=9, color="#a00",
                    transform=ax.transAxes)
    fig.suptitle(title + (f"  {RANDOM_TAG}" if random_weights else ""), fontsize=11,
                 color="#c62828" if random_weights else "black")
    return fig


def paint(rgb: np.ndarray | None, labels: np.ndarray | None, ignore: int, background: bool, present: set[int],
          notes: list[str], what: str) -> np.ndarray | None:
    """Overlay labels on the image (or colourise them when the image is missing or of another size).

    Args:
        rgb: ``(H, W, 3) uint8`` image, or None when it is unavailable.
        labels: ``(H, W)`` integer class indices, or None (nothing to draw).
        ignore: the ignore index (black); background: class 0 is a background class (white).
        present: receives the label values drawn; notes: receives a note when the sizes differ.
    Returns:
        ``(H, W, 3) uint8`` RGB, or None without labels.
    """
    if labels is None:
        return None
    present.update(int(v) for v in np.unique(labels))
    if rgb is None:
        return colorize(labels, ignore_index=ignore, background=background)
    if rgb.shape[:2] != labels.shape:
        notes.append(f"{what} is {labels.shape[1]}x{labels.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]} "
                     "(the image file changed?): shown without the image")
        return colorize(labels, ignore_index=ignore, background=background)
    return overlay(rgb, labels, OVERLAY_ALPHA, ignore_index=ignore, background=background)
