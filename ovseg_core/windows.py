"""Window plan: keep-ratio resize and mmsegmentation's sliding-window procedure.

Both reference codes evaluate through MMSegmentation (methods.md section 1):

1. the image is resized with kept aspect ratio so that its short side is ``S`` (mmcv
   ``Resize(scale=(2048, S), keep_ratio=True)``, long side capped at 2048);
2. crops of ``crop x crop`` are taken with stride ``stride``; the last crop of a row/column is
   snapped to the image edge; a side shorter than ``crop`` gives one smaller crop;
3. CorrCLIP additionally zero-pads each crop, centred, to a multiple of 56 (lcm of the CLIP
   and DINO patch sizes) and cuts the padding off the outputs (``pad_multiple``);
4. per-window logits are summed into the resized canvas, divided by the per-pixel window
   count, then bilinearly resized to the original size.

Everything here is pure: shapes in, plans and tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_window_logits",
    "finish_merge",
    "window_counts",
    "Window",
    "WindowPlan",
    "crop_window_labels",
    "crop_windows",
    "merge_window_logits",
    "plan_windows",
    "resize_image",
    "resized_size",
]


def _check_hw(name: str, hw: tuple[int, int]) -> tuple[int, int]:
    """Validate an ``(H, W)`` pair of positive ints."""
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {hw!r}") from e
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {hw!r}")
    return h, w


def resized_size(orig_hw: tuple[int, int], short_side: int, long_max: int = 2048) -> tuple[int, int]:
    """Size after mmcv ``Resize(scale=(long_max, short_side), keep_ratio=True)``.

    ``scale = min(long_max / max(h, w), short_side / min(h, w))`` and each side becomes
    ``int(side * scale + 0.5)`` (mmcv ``rescale_size``).

    Args:
        orig_hw: original ``(H, W)``.
        short_side: target short side ``S`` (> 0).
        long_max: cap on the long side (mmseg configs use 2048).

    Returns:
        ``(h, w)`` of the resized image.
    """
    h, w = _check_hw("orig_hw", orig_hw)
    if short_side <= 0:
        raise ValueError(f"short_side must be > 0, got {short_side}")
    if long_max <= 0:
        raise ValueError(f"long_max must be > 0, got {long_max}")
    scale = min(long_max / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass(frozen=True)
class Window:
    """One crop of the resized image.

    ``[y1:y2, x1:x2]`` in resized-image pixels; ``pad = (top, bottom, left, right)`` is the
    zero padding added around the crop to reach the plan's padded size.
    """

    y1: int
    x1: int
    y2: int
    x2: int
    pad: tuple[int, int, int, int]


@dataclass(frozen=True)
class WindowPlan:
    """All windows of one image; every window has the same crop and padded size."""

    orig_hw: tuple[int, int]  # original image (H, W)
    resized_hw: tuple[int, int]  # (h, w) after the keep-ratio resize
    crop: int  # nominal crop side in resized pixels
    stride: int  # sliding stride in resized pixels
    pad_multiple: int  # crops are padded (centred) to a multiple of this; 1 = no padding
    windows: tuple[Window, ...]  # row-major over the (h_grids, w_grids) grid

    @property
    def window_hw(self) -> tuple[int, int]:
        """Unpadded crop size ``(min(crop, h), min(crop, w))``."""
        w0 = self.windows[0]
        return w0.y2 - w0.y1, w0.x2 - w0.x1

    @property
    def padded_hw(self) -> tuple[int, int]:
        """Crop size after padding: the spatial size fed to the networks."""
        wh, ww = self.window_hw
        top, bottom, left, right = self.windows[0].pad
        return wh + top + bottom, ww + left + right

    @property
    def grid(self) -> tuple[int, int]:
        """``(h_grids, w_grids)``: number of window rows and columns."""
        ys = sorted({w.y1 for w in self.windows})
        xs = sorted({w.x1 for w in self.windows})
        return len(ys), len(xs)


def _starts(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's 1-D window starts/ends along a side of ``size`` pixels."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(grids):
        a = i * stride
        b = min(a + crop, size)
        a = max(b - crop, 0)
        spans.append((a, b))
    return spans


def _centred_pad(size: int, multiple: int) -> tuple[int, int]:
    """``(before, after)`` zero padding bringing ``size`` up to a multiple, centred."""
    total = -size % multiple
    before = total // 2
    return before, total - before


def plan_windows(
    orig_hw: tuple[int, int],
    short_side: int,
    crop: int,
    stride: int,
    pad_multiple: int = 1,
    long_max: int = 2048,
) -> WindowPlan:
    """mmseg slide-inference windows of an image resized to short side ``short_side``.

    ``h_grids = max(h - crop + stride - 1, 0) // stride + 1``; window ``i`` spans
    ``y1 = i * stride``, ``y2 = min(y1 + crop, h)``, ``y1 = max(y2 - crop, 0)`` (the last one
    snapped to the edge); same along x. Each crop is padded, centred, to a multiple of
    ``pad_multiple`` (CorrCLIP: 56; 1 = no padding as in SC-CLIP).

    Args:
        orig_hw: original ``(H, W)``.
        short_side: ``S`` of the keep-ratio resize.
        crop: crop side (> 0).
        stride: stride, ``0 < stride <= crop`` (larger strides would leave pixels uncovered).
        pad_multiple: pad each crop to a multiple of this (>= 1).
        long_max: long-side cap of the resize (2048 in every config).

    Returns:
        The :class:`WindowPlan`.
    """
    orig = _check_hw("orig_hw", orig_hw)
    if crop <= 0:
        raise ValueError(f"crop must be > 0, got {crop}")
    if not 0 < stride <= crop:
        raise ValueError(f"stride must be in 1..crop ({crop}), got {stride}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    h, w = resized_size(orig, short_side, long_max)
    ys, xs = _starts(h, crop, stride), _starts(w, crop, stride)
    pad_y = _centred_pad(min(crop, h), pad_multiple)
    pad_x = _centred_pad(min(crop, w), pad_multiple)
    windows = tuple(Window(y1, x1, y2, x2, (*pad_y, *pad_x)) for (y1, y2) in ys for (x1, x2) in xs)
    return WindowPlan(orig, (h, w), int(crop), int(stride), int(pad_multiple), windows)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, no antialias), as cv2 ``INTER_LINEAR``.

    Args:
        img: ``(3, H, W)`` or ``(B, 3, H, W)``, float or uint8. A uint8 input is resized in
            float32 and rounded back to uint8 (mmcv resizes the uint8 image, then normalises);
            cv2's fixed-point arithmetic may differ from this by 1 grey level.
        size: target ``(h, w)``.

    Returns:
        Same rank and dtype as ``img`` with spatial size ``size``.
    """
    size = _check_hw("size", size)
    if img.ndim not in (3, 4):
        raise ValueError(f"img must be (C, H, W) or (B, C, H, W), got shape {tuple(img.shape)}")
    x = img if img.ndim == 4 else img.unsqueeze(0)
    is_uint8 = x.dtype == torch.uint8
    if not (is_uint8 or x.is_floating_point()):
        raise ValueError(f"img must be float or uint8, got {img.dtype}")
    xf = x.float() if is_uint8 else x
    if tuple(xf.shape[-2:]) != size:
        xf = F.interpolate(xf, size=size, mode="bilinear", align_corners=False)
    if is_uint8:
        xf = xf.round().clamp(0, 255).to(torch.uint8)
    return xf if img.ndim == 4 else xf.squeeze(0)


def _check_resized(name: str, x: torch.Tensor, plan: WindowPlan) -> None:
    if tuple(x.shape[-2:]) != plan.resized_hw:
        raise ValueError(
            f"{name} has spatial size {tuple(x.shape[-2:])} but the plan expects the resized size "
            f"{plan.resized_hw}; resize it first (resize_image / nearest for labels)"
        )


def crop_windows(img: torch.Tensor, plan: WindowPlan, pad_value: float = 0.0) -> torch.Tensor:
    """Cut and pad every window of a resized (already normalised) image.

    Args:
        img: ``(C, h, w)`` with ``(h, w) == plan.resized_hw``.
        plan: the window plan.
        pad_value: value of the padding (CorrCLIP pads the normalised crop with 0).

    Returns:
        ``(n_win, C, Hp, Wp)`` with ``(Hp, Wp) == plan.padded_hw``.
    """
    if img.ndim != 3:
        raise ValueError(f"img must be (C, h, w), got shape {tuple(img.shape)}")
    _check_resized("img", img, plan)
    crops = [img[:, w.y1 : w.y2, w.x1 : w.x2] for w in plan.windows]
    out = torch.stack(crops)
    top, bottom, left, right = plan.windows[0].pad
    if top or bottom or left or right:
        out = F.pad(out, (left, right, top, bottom), value=pad_value)
    return out


def crop_window_labels(ids: torch.Tensor, plan: WindowPlan, pad_value: int = -1) -> torch.Tensor:
    """Cut and pad every window of an integer map already nearest-resized to ``plan.resized_hw``.

    Args:
        ids: ``(h, w)`` integer map (region ids).
        plan: the window plan.
        pad_value: sentinel id of padded pixels.

    Returns:
        ``(n_win, Hp, Wp)``, same dtype as ``ids``.
    """
    if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an (h, w) integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    _check_resized("ids", ids, plan)
    out = torch.stack([ids[w.y1 : w.y2, w.x1 : w.x2] for w in plan.windows])
    top, bottom, left, right = plan.windows[0].pad
    if top or bottom or left or right:
        out = F.pad(out, (left, right, top, bottom), value=pad_value)
    return out


def window_counts(plan: WindowPlan, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(h, w) float32``: how many windows cover each pixel of the resized image."""
    count = torch.zeros(plan.resized_hw, device=device)
    for win in plan.windows:
        count[win.y1 : win.y2, win.x1 : win.x2] += 1
    assert bool((count > 0).all()), "window plan leaves pixels uncovered"
    return count


def accumulate_window_logits(canvas: torch.Tensor, logits: torch.Tensor, plan: WindowPlan, start: int = 0) -> None:
    """Add windows ``start .. start + len(logits) - 1`` of the plan into a ``(Q, h, w)`` canvas, in place.

    Lets callers merge windows chunk by chunk, so only one chunk of window logits is alive at
    a time (memory bounded on large images): ``canvas = zeros(Q, *plan.resized_hw)``, then this
    per chunk, then :func:`finish_merge`.

    The canvas dtype is the accumulation dtype: each window's logits are cast to it before the
    sum (a ``float16`` canvas accumulates as CorrCLIPv2's reference does, ``preds`` and window
    logits in half precision; ``float32``, the default elsewhere, changes nothing).

    Args:
        canvas: ``(Q, h, w)`` float sum canvas at the resized size.
        logits: ``(n, Q, Hp, Wp)`` float logits of consecutive windows at the padded size.
        plan: the window plan.
        start: index in ``plan.windows`` of ``logits[0]``.
    """
    n = logits.shape[0]
    if logits.ndim != 4 or tuple(logits.shape[-2:]) != plan.padded_hw or not 0 <= start <= len(plan.windows) - n:
        raise ValueError(
            f"logits must be (n, Q, {plan.padded_hw[0]}, {plan.padded_hw[1]}) for windows {start}..{start + n - 1} "
            f"of {len(plan.windows)}, got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if canvas.shape != (logits.shape[1], *plan.resized_hw):
        raise ValueError(f"canvas must be (Q, h, w) = {(logits.shape[1], *plan.resized_hw)}, got {tuple(canvas.shape)}")
    hp, wp = plan.padded_hw
    for i in range(n):
        win = plan.windows[start + i]
        top, bottom, left, right = win.pad
        window = logits[i, :, top : hp - bottom, left : wp - right]
        canvas[:, win.y1 : win.y2, win.x1 : win.x2] += window.to(canvas.dtype)


def finish_merge(canvas: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """Average a summed canvas by the window count and resize it to the original size (bilinear).

    Computed in the canvas dtype (the count is cast to it, as the reference's half-precision
    ``count_mat``); returns that dtype.
    """
    canvas = canvas / window_counts(plan, canvas.device).to(canvas.dtype)
    if plan.resized_hw != plan.orig_hw:
        canvas = F.interpolate(canvas.unsqueeze(0), size=plan.orig_hw, mode="bilinear", align_corners=False)[0]
    return canvas


def merge_window_logits(logits: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """Sum per-window logits into the resized canvas, average by window count, resize back.

    Allocates one ``(Q, h, w)`` canvas and one ``(h, w)`` count; loops over windows.

    Args:
        logits: ``(n_win, Q, Hp, Wp)`` float, windows in ``plan.windows`` order, padded size.
        plan: the window plan.

    Returns:
        ``(Q, H, W)`` at the original size (bilinear, ``align_corners=False``).
    """
    n_win = len(plan.windows)
    if logits.ndim != 4 or logits.shape[0] != n_win or tuple(logits.shape[-2:]) != plan.padded_hw:
        raise ValueError(
            f"logits must be (n_win={n_win}, Q, {plan.padded_hw[0]}, {plan.padded_hw[1]}), "
            f"got {tuple(logits.shape)}"
        )
    canvas = logits.new_zeros((logits.shape[1], *plan.resized_hw))
    accumulate_window_logits(canvas, logits, plan)
    return finish_merge(canvas, plan)
