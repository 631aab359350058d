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

Everything here is pure: shapes in, plans and tensors out. The plans (steps 1-3, no torch) are
``ovseg_core.window_plan``; this module resizes, crops and merges tensors by them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovseg_core.window_plan import Window, WindowPlan, _check_hw, plan_windows, resized_size

__all__ = [
    "accumulate_window_logits",
    "average_windows",
    "finish_merge",
    "to_original_size",
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


def average_windows(canvas: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """A summed canvas divided by the per-pixel window count: ``(Q, h, w)`` at the resized size.

    Computed in the canvas dtype (the count is cast to it, as the reference's half-precision
    ``count_mat``). CorrCLIPv2 fuses its memory-bank logits here, before the resize.
    """
    return canvas / window_counts(plan, canvas.device).to(canvas.dtype)


def to_original_size(logits: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """``(Q, h, w)`` logits at the resized size bilinearly resized to the original size (same dtype)."""
    if plan.resized_hw != plan.orig_hw:
        logits = F.interpolate(logits.unsqueeze(0), size=plan.orig_hw, mode="bilinear", align_corners=False)[0]
    return logits


def finish_merge(canvas: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """Average a summed canvas by the window count and resize it to the original size (bilinear).

    ``to_original_size(average_windows(canvas, plan), plan)``: computed in the canvas dtype; returns that dtype.
    """
    return to_original_size(average_windows(canvas, plan), plan)


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
