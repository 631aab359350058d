"""Window plans: the keep-ratio resize and mmsegmentation's sliding windows as geometry (no torch).

Both reference codes evaluate through MMSegmentation (methods.md section 1):

1. the image is resized with kept aspect ratio so that its short side is ``S`` (mmcv
   ``Resize(scale=(2048, S), keep_ratio=True)``, long side capped at 2048);
2. crops of ``crop x crop`` are taken with stride ``stride``; the last crop of a row/column is
   snapped to the image edge; a side shorter than ``crop`` gives one smaller crop;
3. CorrCLIP additionally zero-pads each crop, centred, to a multiple of 56 (lcm of the CLIP
   and DINO patch sizes) and cuts the padding off the outputs (``pad_multiple``).

The tensors are resized, cropped and merged by these plans in ``ovseg_core.windows``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "WindowPlan", "plan_windows", "resized_size"]


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
