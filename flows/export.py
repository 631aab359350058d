"""``ovseg export EXP.yaml --out DIR``: one PNG per image from the stored predictions.

Reads each method's final prediction (the key the experiment resolves to, with ``--set``
applied) from the store and never computes: an image without a complete prediction is listed
as missing (the CLI exits 3). Files go to ``DIR/<dataset>/<method>/<image>.png``, ``<image>``
being the image's path below the folder all images of the dataset share (its base name for
VOC, ``<city>/<name>`` for Cityscapes), with its extension replaced by ``.png``.

Formats:

``labels``
    class ids as MMSegmentation's ``format_only`` writes them: ``uint8``, or ``uint16`` when
    the largest id exceeds 255; datasets scored with ``reduce_zero_label`` (ADE20K, PC59,
    VOC20) get ids ``1..K`` (0 stays free for "other", as in their annotation files), the
    others ``0..K-1``.
``color``
    RGB PNG painted with ``flows.overlay``'s palette, pixel for pixel (class 0 is white only
    when it is a background class; a custom vocabulary's class 0 gets a colour like any
    other); ``DIR/<dataset>/<method>.legend.png`` beside each folder lists every class of
    the vocabulary with its colour (also written for ``overlay``).
``overlay``
    that palette blended over the image (``flows.overlay.overlay``, alpha ``OVERLAY_ALPHA``),
    like MMSegmentation's ``--show-dir``, with a legend of the classes present in that image
    on its right (``flows.overlay.overlay_with_legend``; the file is wider than the image).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from flows.logs import progress_bar
from ovseg_core.names import did_you_mean

if TYPE_CHECKING:
    from flows.config import Experiment

FORMATS = ("labels", "color", "overlay")
OVERLAY_ALPHA = 0.5  # weight of the label colours in the overlay format
UINT8_MAX_ID = 255  # the largest class id a uint8 PNG holds


@dataclass
class ExportResult:
    """What ``export_predictions`` wrote and what it could not."""

    out: Path
    written: int = 0
    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (dataset, method, image rel_path)


def label_image(labels: np.ndarray, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """Class ids as MMSegmentation writes them.

    Args:
        labels: ``(H, W)`` integer class indices in ``0..num_classes-1``.
        num_classes: K, the vocabulary size.
        reduce_zero_label: the dataset's ground truth counts classes from 1 (ids are shifted by one).
    Returns:
        ``(H, W) uint8`` when the largest possible id is <= 255, else ``(H, W) uint16``.
    """
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an (H, W) integer array, got {labels.dtype} {labels.shape}")
    offset = 1 if reduce_zero_label else 0
    top = num_classes - 1 + offset
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"num_classes={num_classes} does not fit a 16-bit PNG")
    dtype = np.uint8 if top <= UINT8_MAX_ID else np.uint16
    return (labels.astype(np.int64) + offset).astype(dtype)


def output_names(rel_paths: Sequence[str]) -> dict[str, str]:
    """``rel_path -> <image>.png``: the path below the images' common folder, extension ``.png``."""
    parents = [str(PurePosixPath(p).parent) for p in rel_paths]
    common = PurePosixPath(os.path.commonpath(parents)) if parents and all(p != "." for p in parents) else None
    out = {}
    for p in rel_paths:
        rel = PurePosixPath(p).relative_to(common) if common is not None else PurePosixPath(p)
        out[p] = str(rel.with_suffix(".png"))
    return out


def _select(names: Sequence[str] | None, have: Sequence[str], what: str) -> list[str]:
    if not names:
        return list(have)
    unknown = [n for n in names if n not in have]
    if unknown:
        hints = "".join(did_you_mean(n, have) for n in unknown)
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}{hints}; the experiment's {what}s: "
                         f"{', '.join(have)}")
    return list(names)


def _save_png(target: Path, array: np.ndarray) -> None:
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, target)


def _write(target: Path, fmt: str, labels: np.ndarray, row: Mapping[str, Any], num_classes: int,
           class_names: Sequence[str], reduce_zero_label: bool) -> None:
    from flows.overlay import colorize, has_background, overlay_with_legend
    from storage.images import load_rgb

    if fmt == "labels":
        img = label_image(labels, num_classes, reduce_zero_label)
    elif fmt == "color":
        img = colorize(labels, ignore_index=None, background=has_background(class_names))
    else:
        img = overlay_with_legend(load_rgb(row["abs_path"], max_pixels=None), labels, class_names, OVERLAY_ALPHA,
                                  ignore_index=None)
    _save_png(target, img)


def write_legend(folder: Path, class_names: Sequence[str]) -> Path:
    """``<folder>.legend.png`` beside the method's folder (never among its images): every class with its colour."""
    from flows.overlay import LEGEND_ROW_PX, legend_panel

    n = len(class_names)
    path = folder.with_name(folder.name + ".legend.png")
    _save_png(path, legend_panel(class_names, range(n), n * LEGEND_ROW_PX + 8, ignore_index=None))
    return path


def export_predictions(exp: "Experiment", out: str | os.PathLike, datasets: Sequence[str] | None = None,
                       methods: Sequence[str] | None = None, fmt: str = "labels", progress: bool = True) -> ExportResult:
    """Write one PNG per image and method from the store (see the module docstring).

    Raises:
        ValueError: unknown format, dataset or method (the message lists the experiment's).
        StoreNotFoundError: the experiment's store does not exist (nothing is created).
        FileNotFoundError: a dataset was never ingested into the store.
    """
    from flows.graph import build_plan
    from storage.store import MissingOutputError, Store
    from storage.tables import read_table

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    store = Store(exp.store, create=False)
    plans = build_plan(exp)
    wanted_ds = _select(datasets, [p.dataset.name for p in plans], "dataset")
    wanted_m = _select(methods, [m.name for m in exp.methods], "method")
    result = ExportResult(Path(out).expanduser().resolve())
    jobs = []
    for plan in plans:
        if plan.dataset.name not in wanted_ds:
            continue
        if plan.dataset.name not in store.table_names("manifests"):
            raise FileNotFoundError(f"dataset {plan.dataset.name!r} was never ingested into {store.location}; "
                                    "run `ovseg run` on the experiment first")
        rows = [r for r in read_table(store, "manifests", [plan.dataset.name]).to_pylist() if r["status"] == "ok"]
        names = output_names([r["rel_path"] for r in rows])
        for mp in plan.methods:
            if mp.entry.name in wanted_m:
                jobs.append((plan, mp, rows, names))
    bar = progress_bar(sum(len(rows) for *_, rows, _ in jobs), f"export {fmt}", enabled=progress)
    try:
        for plan, mp, rows, names in jobs:
            node = mp.prediction
            done = store.complete_items(node.stage, node.key)
            folder = result.out / plan.dataset.name / mp.entry.name
            if fmt != "labels":
                write_legend(folder, mp.class_names)
            for row in rows:
                bar.update(1)
                try:
                    if row["image_id"] not in done:
                        raise MissingOutputError(row["image_id"])
                    labels = store.read_item(node.stage, node.key, row["image_id"], ["labels"])["labels"]
                except MissingOutputError:  # not computed, or damaged (then un-marked for the next run)
                    result.missing.append((plan.dataset.name, mp.entry.name, row["rel_path"]))
                    continue
                _write(folder / names[row["rel_path"]], fmt, labels, row, mp.num_classes, mp.class_names,
                       plan.spec.reduce_zero_label)
                result.written += 1
    finally:
        bar.close()
    return result
