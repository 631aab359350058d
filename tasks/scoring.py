"""``scoring``: per-image confusion matrices against the ground truth (summed over the dataset by the flow)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from ovseg_core.metrics import confusion_matrix, convert_labels
from storage.images import load_label
from tasks.runtime import ItemResult, StageContext, run_items


def compute_scoring(ctx: StageContext, item: Mapping[str, Any]):
    """``(K, K) int64`` confusion (rows ground truth, columns prediction) of one image at original resolution."""
    if not item.get("gt_path"):
        raise FileNotFoundError(f"image {item['image_id']} has no ground truth; scoring needs the dataset's GT files")
    pred = ctx.read_upstream("prediction", item["image_id"], ["labels"])["labels"].astype(np.int64)
    gt = convert_labels(load_label(item["gt_path"]), ctx.params["conversion"], int(ctx.params["ignore_index"]))
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {item['gt_path']} is {gt.shape[1]}x{gt.shape[0]} but the image is "
                         f"{pred.shape[1]}x{pred.shape[0]}; the GT must have the image's size")
    conf = confusion_matrix(pred, gt, int(ctx.params["num_classes"]), int(ctx.params["ignore_index"]))
    return {"confusion": conf.astype(np.int64)}, {}


@task(name="scoring", cache_policy=NO_CACHE)
def scoring_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Confusion matrices for a batch of images."""
    return run_items(ctx, items, compute_scoring)
