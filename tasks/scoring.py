"""``scoring``: per-image confusion matrices against the ground truth (summed over the dataset by the flow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ovseg_core.metrics import confusion_matrix, convert_labels
from storage.images import load_label
from tasks.common import made
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]


def scoring_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    if not row.get("gt_path"):
        raise FileNotFoundError(f"image {row['image_id']} has no ground truth; scoring needs the dataset's GT files")
    gt = made(ctx, ("gt", str(row["image_id"])), lambda: load_label(row["gt_path"], max_pixels=None))  # once per chain
    return {"pred": ctx.read_upstream("prediction", row, ["labels"])["labels"], "gt": gt, "gt_path": row["gt_path"]}


def scoring_compute(ctx: StageContext, _: None, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """``(K + 1, K) int64`` confusion of each image at original resolution (rows ground truth, columns prediction;
    row K: pixels whose ground truth is outside the class range, scored as MMSegmentation does)."""
    p = ctx.params
    out = []
    for inp in inputs:
        pred = inp["pred"].astype(np.int64)
        gt = convert_labels(inp["gt"], p.conversion, p.ignore_index)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {inp['gt_path']} is {gt.shape[1]}x{gt.shape[0]} but the image is "
                             f"{pred.shape[1]}x{pred.shape[0]}; the GT must have the image's size")
        conf = confusion_matrix(pred, gt, p.num_classes, p.ignore_index, strict=p.strict)
        out.append(({"confusion": conf.astype(np.int64)}, {"out_of_range": int(conf[p.num_classes].sum())}))
    return out
