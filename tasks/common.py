"""Helpers shared by the stages' loaders and computations: images, windows, window batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovseg_core import clip_ops
from ovseg_core.features.regions import resize_regions_nearest
from ovseg_core.windows import (
    WindowPlan,
    crop_window_labels,
    crop_windows,
    resize_image,
)
from storage.images import load_rgb
from tasks.params import FEATURE_DTYPES, WindowParams

Tensors = Mapping[str, torch.Tensor]


def row_plan(window: WindowParams, row: Mapping[str, Any]) -> WindowPlan:
    """The window plan of a manifest row (from its recorded size: no decoding)."""
    return window.plan((int(row["height"]), int(row["width"])))


def made(ctx: Any, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, or in a fused chain batch the value its memory holds under ``key`` (made once per batch)."""
    memory = getattr(ctx, "memory", None)
    return make() if memory is None else memory.made(key, make)


def decoded_rgb(ctx: Any, row: Mapping[str, Any]) -> np.ndarray:
    """The row's image as ``(H, W, 3) uint8`` (``storage.images.load_rgb``); once per chain batch. Do not modify it."""
    # the manifest applied the dataset's pixel limit
    return made(ctx, ("rgb", str(row["image_id"])), lambda: load_rgb(row["abs_path"], max_pixels=None))


def image_tensor(row: Mapping[str, Any], ctx: Any = None) -> torch.Tensor:
    """The row's image as ``(3, H, W) float32`` in 0..255 (decoded once, normalised by ``storage.images``)."""
    return made(ctx, ("image", str(row["image_id"])),
                lambda: torch.from_numpy(np.array(decoded_rgb(ctx, row), dtype=np.float32)).permute(2, 0, 1))


def row_windows(ctx: Any, row: Mapping[str, Any], window: WindowParams,
                normalize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, WindowPlan]:
    """``image_windows`` of the row's image; in a fused chain batch once per window geometry and normalisation."""
    return made(ctx, ("windows", str(row["image_id"]), window, normalize),
                lambda: image_windows(image_tensor(row, ctx), window, normalize))


def row_region_windows(ctx: Any, row: Mapping[str, Any], role: str, plan: WindowPlan) -> torch.Tensor:
    """``region_windows`` of the region ids the declared input ``role`` holds for the row (``ids``), on ``plan``;
    in a fused chain batch once per region output and plan."""
    node = ctx.input_node(role)
    return made(ctx, ("regions", str(row["image_id"]), node.ident, plan),
                lambda: region_windows(ctx.read_upstream(role, row, ["ids"])["ids"], plan))


def embedded_windows(ctx: Any, image_id: str, window: WindowParams, start: int, visual: Any,
                     crops: torch.Tensor) -> torch.Tensor:
    """``clip_ops.embed_tokens(visual, crops)`` tokens ``(b, 1 + gh*gw, D)`` of the CLIP-normalised windows
    ``start .. start + b - 1`` of image ``image_id`` on ``window`` (``row_windows(..., normalize_clip)``, cast to the
    forward's dtype and device): in a fused chain batch made once per image, window geometry, model, dtype and window
    batch (``clip_layers`` makes them, ``mask_class_tokens`` takes them), outside a chain each time. Do not modify them.
    """
    key = ("tokens", image_id, window, start, tuple(crops.shape), crops.dtype, str(crops.device), visual)
    return made(ctx, key, lambda: clip_ops.embed_tokens(visual, crops)[0])


def image_windows(img: torch.Tensor, window: WindowParams, normalize: Callable[[torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, WindowPlan]:
    """Resize, normalise and crop+pad every window of a ``(3, H, W)`` 0..255 image.

    Returns ``(n_win, 3, Hp, Wp) float32`` and the plan. Normalisation happens before
    cropping and padding, so padded pixels are exactly 0 in the network's input space, as in
    the reference codes.
    """
    plan = window.plan((img.shape[1], img.shape[2]))
    resized = resize_image(img, plan.resized_hw)
    return crop_windows(normalize(resized[None])[0], plan, pad_value=0.0), plan


def shape_only_crops(plan: WindowPlan) -> torch.Tensor:
    """A ``(n_win, 3, Hp, Wp)`` tensor of zeros without memory, for calls that read only the crops' shape."""
    return torch.zeros(()).expand(len(plan.windows), 3, *plan.padded_hw)


def region_windows(ids: np.ndarray, plan: WindowPlan) -> torch.Tensor:
    """Original-resolution region ids -> nearest-resized to the network input -> per-window crops.

    Returns ``(n_win, Hp, Wp) int64`` with -1 on padding.
    """
    resized = resize_regions_nearest(np.asarray(ids), plan.resized_hw)
    return crop_window_labels(torch.as_tensor(np.asarray(resized), dtype=torch.int64), plan, pad_value=-1)


def run_windows(inputs: Sequence[Tensors], fn: Callable[[dict[str, torch.Tensor]], Any], window_batch: int,
                sink: Callable[[int, int, Any], None], device: str = "cpu") -> None:
    """Run ``fn`` over the windows of several images, at most ``window_batch`` windows of ONE image per call.

    ``inputs[i]`` maps names to per-window tensors of image ``i`` (same leading size). Each image's
    windows are cut into the same calls whatever images come before or after it (windows
    ``0 .. window_batch - 1``, then the next ``window_batch``, ...): a call never mixes images, so
    an image's outputs are a function of that image alone, bit for bit. (BLAS picks its kernels and
    blocking by the batch's shape, and the mask class tokens pad a batch to its largest region
    count: windows of a neighbouring image in the same call would move the last bits.) ``fn``
    receives ``{name: (b, ...)}`` (contiguous, on ``device``) and returns a tensor (or dict of
    tensors) with leading size ``b``; ``sink(i, start, part)`` receives, per image, the outputs
    of its windows ``start .. start + len(part)`` in order.
    """
    run_windows_at(inputs, lambda i, start, batch: fn(batch), window_batch, sink, device)


def run_windows_at(inputs: Sequence[Tensors], fn: Callable[[int, int, dict[str, torch.Tensor]], Any],
                   window_batch: int, sink: Callable[[int, int, Any], None], device: str = "cpu") -> None:
    """``run_windows`` whose ``fn(i, start, batch)`` also learns which image and windows the batch holds."""
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    non_blocking = device.startswith("cuda")
    for i, inp in enumerate(inputs):
        for start in range(0, _count(inp), window_batch):
            batch = {name: t[start : start + window_batch].contiguous().to(device, non_blocking=non_blocking)
                     for name, t in inp.items()}
            sink(i, start, fn(i, start, batch))


def _count(inp: Tensors) -> int:
    sizes = {int(t.shape[0]) for t in inp.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-window inputs disagree on the window count: { {k: tuple(v.shape) for k, v in inp.items()} }")
    return sizes.pop()


def to_store(x: torch.Tensor, feature_dtype: str) -> np.ndarray:
    """A feature tensor as the stored numpy dtype, one of ``tasks.params.FEATURE_DTYPES`` (``float16`` by default)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    return x.float().cpu().numpy().astype(np.dtype(feature_dtype))
