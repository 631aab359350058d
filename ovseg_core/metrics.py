"""Scoring protocol of MMSegmentation's ``IoUMetric`` (methods.md section 1).

Per image, a ``(K + 1, K)`` confusion matrix (rows ground truth, columns prediction) over pixels
whose converted ground truth is not ``ignore_index``; matrices are **summed over the whole
dataset** before :func:`scores_from_confusion`, so IoU is intersection / union of dataset
totals, and mIoU is the nan-mean over classes (nan where a class is absent from both ground
truth and prediction).

Ground truth outside ``0..K-1`` (and not ``ignore_index``) is scored as mmseg's
``IoUMetric.intersect_and_union`` scores it (``torch.histc(..., bins=K, min=0, max=K-1)``
drops out-of-range values): such a pixel is in no class's label area and in no intersection,
but its *prediction* still counts in the predicted area, hence in that class's union. Row ``K``
of the matrix holds these pixels by predicted class; ``strict=True`` raises instead.
:func:`out_of_range_count` gives their number (to record and warn once per dataset).

Label conversions (:func:`convert_labels`), applied to raw ground truth as read from disk:

- ``"none"``: unchanged (VOC21 0..20, PC60 0..59, COCO-Stuff ``_labelTrainIds`` 0..170,
  Cityscapes ``_labelTrainIds`` 0..18; 255 ignore).
- ``"reduce_zero_label"`` (VOC20, PC59, ADE20K): 0 -> ignore, ignore stays, others -1.
- ``"coco_object"``: input = the mmsegmentation COCO-Stuff164k ``*_labelTrainIds.png`` (things
  0..79 in COCO category order, stuff 80..170, 255 unlabelled). Thing ``t`` -> ``t + 1``
  (1..80); stuff and unlabelled -> 0 (background; nothing is ignored), the rule methods.md
  states for COCO-Object. The reference codes read a pre-converted ``*_instanceTrainIds.png``
  made by their conversion script; that file is not assumed here (not verified byte-equal).
- ``"camvid"``: 11 (unlabelled) -> ignore; 0..10 unchanged.

Which ground-truth value is ignored (:func:`scoring_ignore_index`, modes :data:`IGNORE_MODES`):
the authors' evaluators (CorrCLIP v1/v2 ``IoUMetric`` / ``BoundaryIoUMetric(iou_metrics=['mIoU'])``)
are built without ``ignore_index``, so mmseg's default 255 is ignored on every dataset; the
dataset's own ``ignore_index`` (``ADE20K847Dataset(ignore_index=65535)``) never reaches the
metric. On CAT-Seg's 16-bit labels (ADE-847: classes 0..846, PC-459: 0..458, unlabelled 65535)
mode ``"reference"`` (default) therefore drops real class 255 entirely and scores an unlabelled
pixel as above: outside ``0..K-1``, so only its prediction counts, in that class's union. Mode
``"unlabelled"`` ignores the dataset's unlabelled value instead and scores class 255.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COCO_NUM_THINGS",
    "IGNORE_MODES",
    "REFERENCE_IGNORE_INDEX",
    "convert_labels",
    "confusion_matrix",
    "out_of_range_count",
    "scores_from_confusion",
    "scoring_ignore_index",
]

COCO_NUM_THINGS = 80  # thing classes come first in COCO-Stuff train ids (0..79)
# What the authors' evaluators ignore: mmseg IoUMetric's default (they never pass ignore_index).
REFERENCE_IGNORE_INDEX = 255
# Ground-truth ignore rules: "reference" = the evaluator's 255 for every dataset (default);
# "unlabelled" = the dataset's own unlabelled value where it differs (ADE-847, PC-459: 65535).
IGNORE_MODES: tuple[str, ...] = ("reference", "unlabelled")
_CAMVID_UNLABELLED = 11


def _check_int_map(name: str, a: np.ndarray) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        shape = getattr(a, "shape", None)
        raise ValueError(f"{name} must be an (H, W) integer numpy array, got {type(a).__name__} {shape}")


def scoring_ignore_index(ignore_index: int, unlabelled_index: int | None, mode: str = "reference") -> int:
    """The ground-truth value scoring ignores under an ignore rule (see the module docstring).

    Args:
        ignore_index: the dataset's reference ignore value (``DatasetSpec.ignore_index``, 255).
        unlabelled_index: the dataset's own unlabelled value when the reference does not ignore it
            (``DatasetSpec.unlabelled_index``; 65535 for ADE-847 / PC-459), else None.
        mode: ``"reference"`` -> ``ignore_index``; ``"unlabelled"`` -> ``unlabelled_index`` when set.
    Returns:
        the value to pass as ``ignore_index`` to :func:`confusion_matrix`.
    """
    if mode not in IGNORE_MODES:
        raise ValueError(f"ignore mode must be one of {IGNORE_MODES}, got {mode!r}")
    if mode == "unlabelled" and unlabelled_index is not None:
        return int(unlabelled_index)
    return int(ignore_index)


def convert_labels(gt: np.ndarray, conversion: str, ignore_index: int = 255) -> np.ndarray:
    """Raw ground truth -> scored labels (see the module docstring).

    Args:
        gt: ``(H, W)`` integer label map as read from disk.
        conversion: ``"none" | "reduce_zero_label" | "coco_object" | "camvid"``.
        ignore_index: label never scored.

    Returns:
        ``(H, W) int64`` labels; ``gt`` is not modified.
    """
    _check_int_map("gt", gt)
    out = gt.astype(np.int64, copy=True)
    if conversion == "none":
        return out
    if conversion == "reduce_zero_label":
        ignored = (out == 0) | (out == ignore_index)
        out -= 1
        out[ignored] = ignore_index
        return out
    if conversion == "coco_object":
        thing = (out >= 0) & (out < COCO_NUM_THINGS)
        return np.where(thing, out + 1, 0)
    if conversion == "camvid":
        out[out == _CAMVID_UNLABELLED] = ignore_index
        return out
    raise ValueError(
        f"conversion must be one of 'none', 'reduce_zero_label', 'coco_object', 'camvid', got {conversion!r}"
    )


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255, strict: bool = False
) -> np.ndarray:
    """Pixel confusion matrix of one image (or any set of pixels), mmseg's scoring rule.

    Args:
        pred: ``(H, W)`` integer predicted labels in ``0..K-1``.
        gt: ``(H, W)`` integer converted ground truth; ``ignore_index`` pixels are not scored.
        num_classes: ``K``.
        ignore_index: ground-truth value excluded from scoring.
        strict: raise ``ValueError`` naming the ground-truth values outside ``0..K-1`` instead of
            scoring them as mmseg does (default False = mmseg).
    Returns:
        ``(K + 1, K) int64``: entry ``[g, p]`` (``g < K``) counts labelled pixels of class ``g``
        predicted ``p``; row ``K`` counts, per predicted class, the pixels whose ground truth is
        outside ``0..K-1`` (mmseg: in the prediction area and union, in no label area).
        Matrices of disjoint pixel sets add up.
    """
    _check_int_map("pred", pred)
    _check_int_map("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ; predictions must be at ground-truth size")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        bad = np.unique(p[(p < 0) | (p >= num_classes)])[:10].tolist()
        raise ValueError(f"pred labels {bad} are outside 0..{num_classes - 1}")
    outside = (g < 0) | (g >= num_classes)
    if strict and outside.any():
        bad = np.unique(g[outside])[:10].tolist()
        raise ValueError(
            f"gt labels {bad} are outside 0..{num_classes - 1} and not ignore_index={ignore_index}; "
            "apply the dataset's label conversion (convert_labels) first, or score with strict=False "
            "(mmseg's rule: such pixels count only in the predicted area)"
        )
    g = np.where(outside, num_classes, g)
    counts = np.bincount(g * num_classes + p, minlength=(num_classes + 1) * num_classes)
    return counts.reshape(num_classes + 1, num_classes).astype(np.int64)


def _split_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, K)`` labelled part and ``(K,)`` out-of-range row of a ``(K, K)`` or ``(K + 1, K)`` matrix."""
    if not isinstance(conf, np.ndarray) or conf.ndim != 2 or conf.shape[0] not in (conf.shape[1], conf.shape[1] + 1):
        raise ValueError(f"conf must be a (K + 1, K) (or square (K, K)) numpy array, got {getattr(conf, 'shape', None)}")
    if not np.issubdtype(conf.dtype, np.integer) or (conf < 0).any():
        raise ValueError("conf must hold non-negative integer counts")
    conf = conf.astype(np.int64)
    k = conf.shape[1]
    outside = conf[k] if conf.shape[0] == k + 1 else np.zeros(k, dtype=np.int64)
    return conf[:k], outside


def out_of_range_count(conf: np.ndarray) -> int:
    """Pixels whose ground truth was outside ``0..K-1`` (row ``K``; 0 for a square matrix)."""
    return int(_split_confusion(conf)[1].sum())


def scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray | float | int]:
    """IoU / accuracy from a (dataset-summed) confusion matrix, as mmseg ``IoUMetric``.

    With ``labelled = conf[:K]`` and ``conf[K]`` the out-of-range row:
    ``intersect = diag(labelled)``, ``area_label = labelled.sum(1)``, ``area_pred = conf.sum(0)``
    (out-of-range pixels included), ``union = area_label + area_pred - intersect``; ``iou =
    intersect / union``, ``acc = intersect / area_label``, ``aacc = intersect.sum() /
    area_label.sum()``. A square ``(K, K)`` matrix (no out-of-range row) is accepted too.

    Args:
        conf: ``(K + 1, K)`` (or ``(K, K)``) non-negative integer confusion matrix (rows gt, cols pred).
    Returns:
        dict with ``"iou"`` ``(K,) float64`` (nan where union == 0), ``"acc"`` ``(K,) float64``
        (nan where the class has no gt pixel), ``"miou"`` and ``"macc"`` (nan-means; nan when
        every entry is nan), ``"aacc"`` (nan when nothing is labelled) and ``"out_of_range"``
        (int, pixels whose ground truth was outside ``0..K-1``).
    """
    labelled, outside = _split_confusion(conf)
    intersect = np.diag(labelled).astype(np.float64)
    area_gt = labelled.sum(axis=1).astype(np.float64)
    area_pred = (labelled.sum(axis=0) + outside).astype(np.float64)
    union = area_gt + area_pred - intersect
    iou = np.full(labelled.shape[0], np.nan)
    np.divide(intersect, union, out=iou, where=union > 0)
    acc = np.full(labelled.shape[0], np.nan)
    np.divide(intersect, area_gt, out=acc, where=area_gt > 0)
    total = area_gt.sum()
    return {
        "iou": iou,
        "acc": acc,
        "miou": _nanmean(iou),
        "macc": _nanmean(acc),
        "aacc": float(intersect.sum() / total) if total > 0 else float("nan"),
        "out_of_range": int(outside.sum()),
    }


def _nanmean(x: np.ndarray) -> float:
    """Mean over non-nan entries; nan (without a warning) when there are none."""
    finite = ~np.isnan(x)
    return float(x[finite].mean()) if finite.any() else float("nan")
