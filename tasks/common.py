"""Input helpers shared by the stage tasks: images, window plans, region crops, cached features."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ovseg_core.windows import WindowPlan, crop_window_labels, crop_windows, plan_windows, resize_image
from storage.images import load_rgb
from tasks.runtime import StageContext

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}


def plan_for(window: Mapping[str, Any], orig_hw: tuple[int, int]) -> WindowPlan:
    """The window plan of an image from a stage's ``window`` parameters."""
    return plan_windows(
        orig_hw, int(window["short_side"]), int(window["crop"]), int(window["stride"]), int(window.get("pad_multiple", 1))
    )


def load_image(item: Mapping[str, Any]) -> torch.Tensor:
    """The item's image as ``(3, H, W) float32`` in 0..255 (decoding normalised by ``storage.images``)."""
    rgb = load_rgb(item["abs_path"])
    return torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)


def image_windows(item: Mapping[str, Any], window: Mapping[str, Any], normalize) -> tuple[torch.Tensor, WindowPlan]:
    """Resize, normalise (``normalize`` maps ``(B,3,H,W)`` 0..255 to network input) and crop+pad every window.

    Returns ``(n_win, 3, Hp, Wp) float32`` and the plan. Normalisation happens before
    cropping and padding, so padded pixels are exactly 0 in the network's input space, as in
    the reference codes.
    """
    img = load_image(item)
    plan = plan_for(window, (img.shape[1], img.shape[2]))
    resized = resize_image(img, plan.resized_hw)
    normed = normalize(resized[None])[0]
    return crop_windows(normed, plan, pad_value=0.0), plan


def region_windows(ids: np.ndarray, plan: WindowPlan) -> torch.Tensor:
    """Original-resolution region ids -> nearest-resized to the network input -> per-window crops.

    Returns ``(n_win, Hp, Wp) int64`` with -1 on padding.
    """
    from ovseg_core.features.regions import resize_regions_nearest

    resized = resize_regions_nearest(np.asarray(ids), plan.resized_hw)
    return crop_window_labels(torch.as_tensor(np.asarray(resized), dtype=torch.int64), plan, pad_value=-1)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, n)`` in steps of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def store_dtype(ctx: StageContext) -> np.dtype:
    """Numpy dtype for stored features (``feature_dtype`` parameter, float16 by default)."""
    return np.dtype(FEATURE_DTYPES[str(ctx.params.get("feature_dtype", "float16"))])


def torch_dtype(ctx: StageContext) -> torch.dtype:
    """Compute dtype of the models of a stage."""
    return getattr(torch, ctx.dtype)


def array_name(aggregate: str) -> str:
    """Store-safe array name of a CLIP aggregate (``mean:6-10`` -> ``mean_6-10``)."""
    return aggregate.replace(":", "_")
