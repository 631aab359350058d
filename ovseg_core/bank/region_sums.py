"""Sums of a bilinearly resized (optionally per-pixel L2-normalised) feature map over regions.

What the reference computes with the whole map: ``F.interpolate(fmap, size=(H, W),
mode="bilinear", align_corners=False)``, optionally ``F.normalize(dim=channels)``, then a sum
over each region's pixels. Two exact evaluations that never hold the (C, H, W) map:

- **banded**: the resized map is built ``band_rows`` output rows at a time with the same
  two-tap arithmetic as ``F.interpolate``, normalised and summed band by band; O(C H W).
- **token weights**: every resized pixel is a combination of 4 source pixels with weights
  w_00, w_01, w_10, w_11, so its norm follows from their norms and the dot products of the
  adjacent source pairs (precomputed once per source grid), and a region's sum is
  ``sum_tokens (sum over its pixels of w_t / ||pixel||) * token``: one (R, tokens) weight matrix
  times the (tokens, C) source map; O(H W + R h w C) instead of O(C H W). Used when the source
  grid is coarse (a VFM token grid resized to the image: about 50x faster for 1024 channels).

Both equal the reference up to float rounding (tests compare them with ``F.interpolate``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RegionSelection", "axis_taps", "region_sums", "select_regions"]

# Id maps whose values span fewer than this many integers are counted with bincount, not sorted.
_DENSE_ID_RANGE = 1 << 20
# F.normalize's eps (the reference's per-pixel normalisation: v / max(||v||, eps)).
NORM_EPS = 1e-12


@dataclass(frozen=True)
class RegionSelection:
    """Which pixels belong to which region, in the reference's region order."""

    mask_ids: np.ndarray  # (R,) int64: the id value of each region (2-D map) or its slice index (3-D masks)
    areas: np.ndarray  # (R,) int64: pixels per region
    labels: np.ndarray | None  # (H, W) int64 in -1..R-1: region index of each pixel (-1 = none); 2-D maps only
    masks: np.ndarray | None  # (R, H, W) bool: one mask per region (may overlap); 3-D masks only

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the mask."""
        src = self.labels if self.labels is not None else self.masks
        return int(src.shape[-2]), int(src.shape[-1])

    @property
    def num_regions(self) -> int:
        return int(self.mask_ids.shape[0])


def select_regions(regions: np.ndarray | torch.Tensor, include_zero: bool = False) -> RegionSelection:
    """Regions of a mask in the reference's order.

    Args:
        regions: an ``(H, W)`` integer id map (0 = unsegmented; every other value, negative ones
            included, is a region, as in the reference's ``unique != 0``) or an ``(n, H, W)`` bool
            stack (one region per slice, in slice order; the reference loaders accept both).
        include_zero: also make id 0 a region (the inference queries: every distinct id). Only
            for 2-D maps.
    Returns:
        the selection; 2-D: distinct ids in ascending order.
    Raises:
        ValueError: not 2-D integer / 3-D bool, or ``include_zero`` with a 3-D stack.
    """
    arr = regions.detach().cpu().numpy() if isinstance(regions, torch.Tensor) else np.asarray(regions)
    if arr.ndim == 3:
        if arr.dtype != np.bool_:
            raise ValueError(f"a 3-D region mask must be an (n, H, W) bool stack, got dtype {arr.dtype}")
        if include_zero:
            raise ValueError("include_zero needs an (H, W) id map; a bool stack has no unsegmented id")
        areas = arr.reshape(arr.shape[0], -1).sum(axis=1).astype(np.int64)
        return RegionSelection(np.arange(arr.shape[0], dtype=np.int64), areas, None, arr)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"a region mask must be an (H, W) integer map or an (n, H, W) bool stack, got {arr.shape} {arr.dtype}")
    ids = arr.astype(np.int64)
    low = int(ids.min()) if ids.size else 0
    if ids.size and int(ids.max()) - low < _DENSE_ID_RANGE:  # small id range: counting, no sort
        shifted = ids - low
        all_counts = np.bincount(shifted.ravel())
        present = np.flatnonzero(all_counts)
        values, counts, inverse = present + low, all_counts[present], None
    else:
        values, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(arr.shape)
    keep = np.ones(values.shape[0], dtype=bool) if include_zero else values != 0
    position = np.full(values.shape[0], -1, dtype=np.int64)
    position[keep] = np.arange(int(keep.sum()))
    if inverse is None:  # position of each id value, looked up by value
        lookup = np.full(int(all_counts.shape[0]), -1, dtype=np.int64)
        lookup[present] = position
        labels = lookup[shifted]
    else:
        labels = position[inverse]
    return RegionSelection(values[keep], counts[keep].astype(np.int64), labels, None)


def axis_taps(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of ``F.interpolate(bilinear, align_corners=False)`` along one axis.

    Returns ``(i0, i1, w0, w1)``, each ``(out_size,)``: output i = w0[i] * x[i0[i]] + w1[i] * x[i1[i]]
    (float32 weights, computed as ATen computes them; i1 = i0 at the last source index).
    """
    scale = in_size / out_size
    src = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5
    src = src.clamp_min(0.0)
    i0 = src.to(torch.int64).clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0.to(torch.float32)
    return i0, i1, 1.0 - w1, w1


def _bands(fmap: torch.Tensor, size: tuple[int, int], band_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(y0, band)``: output rows y0.. of ``fmap`` resized to ``size``, ``(C, b, W)``."""
    _, h, w = fmap.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        for y0 in range(0, out_h, band_rows):
            yield y0, fmap[:, y0 : y0 + band_rows]
        return
    yi0, yi1, yw0, yw1 = axis_taps(out_h, h)
    xi0, xi1, xw0, xw1 = axis_taps(out_w, w)
    for y0 in range(0, out_h, band_rows):
        y1 = min(y0 + band_rows, out_h)
        lo, hi = int(yi0[y0]), int(yi1[y1 - 1]) + 1
        rows = fmap[:, lo:hi]
        horiz = rows[:, :, xi0] * xw0 + rows[:, :, xi1] * xw1  # (C, hi-lo, W), horizontal pass first as ATen
        top, bottom = horiz[:, yi0[y0:y1] - lo], horiz[:, yi1[y0:y1] - lo]
        yield y0, top * yw0[y0:y1, None] + bottom * yw1[y0:y1, None]


def _banded_sums(fmap: torch.Tensor, sel: RegionSelection, normalize: bool, band_rows: int) -> torch.Tensor:
    c, r = fmap.shape[0], sel.num_regions
    sums = torch.zeros(r + 1, c, dtype=torch.float32)  # row r collects pixels of no region
    labels = torch.from_numpy(sel.labels) if sel.labels is not None else None
    masks = torch.from_numpy(sel.masks) if sel.masks is not None else None
    for y0, band in _bands(fmap, sel.size, band_rows):
        if normalize:
            band = F.normalize(band, dim=0, eps=NORM_EPS)
        b = band.shape[1]
        pixels = band.reshape(c, -1).T  # (b*W, C)
        if labels is not None:
            idx = labels[y0 : y0 + b].reshape(-1)
            sums.index_add_(0, torch.where(idx < 0, r, idx), pixels)
        else:
            sums[:r] += masks[:, y0 : y0 + b].reshape(r, -1).to(torch.float32) @ pixels
    return sums[:r]


def _token_weight_sums(fmap: torch.Tensor, sel: RegionSelection, normalize: bool) -> torch.Tensor:
    """Region sums as (R, tokens) weights @ tokens; see the module docstring."""
    c, h, w = fmap.shape
    out_h, out_w = sel.size
    # Source grid padded by one replicated row and column, so the second tap is always i0 + 1
    # (where ATen's second tap equals the first, both read the same values).
    grid = F.pad(fmap[None].to(torch.float64), (0, 1, 0, 1), mode="replicate")[0]  # (C, h+1, w+1)
    yi0, _, yw0, yw1 = (t.double().numpy() if t.is_floating_point() else t.numpy() for t in axis_taps(out_h, h))
    xi0, _, xw0, xw1 = (t.double().numpy() if t.is_floating_point() else t.numpy() for t in axis_taps(out_w, w))
    a, b = yi0[:, None], xi0[None, :]  # the top-left source pixel of each output pixel, broadcast to (H, W)
    # taps 00, 01, 10, 11: (H, W) weights and the (row, col) offsets of their source pixels
    w00, w01, w10, w11 = yw0[:, None] * xw0, yw0[:, None] * xw1, yw1[:, None] * xw0, yw1[:, None] * xw1
    taps = [(w00, 0, 0), (w01, 0, 1), (w10, 1, 0), (w11, 1, 1)]
    scale = np.ones((out_h, out_w), dtype=np.float64)
    if normalize:
        g = grid.numpy()
        sq = (g * g).sum(axis=0)  # (h+1, w+1)
        horizontal = (g[:, :, :-1] * g[:, :, 1:]).sum(axis=0)  # <t[y, x], t[y, x+1]>
        vertical = (g[:, :-1, :] * g[:, 1:, :]).sum(axis=0)  # <t[y, x], t[y+1, x]>
        diagonal = (g[:, :-1, :-1] * g[:, 1:, 1:]).sum(axis=0)  # <t[y, x], t[y+1, x+1]>
        anti = (g[:, :-1, 1:] * g[:, 1:, :-1]).sum(axis=0)  # <t[y, x+1], t[y+1, x]>
        norm2 = sum(wt**2 * sq[a + dy, b + dx] for wt, dy, dx in taps)
        norm2 = norm2 + 2 * (
            w00 * w01 * horizontal[a, b]
            + w10 * w11 * horizontal[a + 1, b]
            + w00 * w10 * vertical[a, b]
            + w01 * w11 * vertical[a, b + 1]
            + w00 * w11 * diagonal[a, b]
            + w01 * w10 * anti[a, b]
        )
        scale = 1.0 / np.maximum(np.sqrt(np.maximum(norm2, 0.0)), NORM_EPS)
    n_tok, r = (h + 1) * (w + 1), sel.num_regions
    if sel.labels is not None:
        label_maps = iter([sel.labels])
    else:  # overlapping slices: one pass per slice
        label_maps = (np.where(sel.masks[i], i, -1) for i in range(r))
    weight = np.zeros(r * n_tok, dtype=np.float64)
    for labels in label_maps:
        inside = labels >= 0
        base = labels[inside] * n_tok
        for wt, dy, dx in taps:
            token = np.broadcast_to((a + dy) * (w + 1) + (b + dx), labels.shape)[inside]
            weight += np.bincount(base + token, (wt * scale)[inside], r * n_tok)
    sums = torch.from_numpy(weight.reshape(r, n_tok)) @ grid.reshape(c, n_tok).T
    return sums.to(torch.float32)


def region_sums(fmap: torch.Tensor, sel: RegionSelection, normalize: bool, band_rows: int) -> torch.Tensor:
    """``(R, C) float32``: per-region sums of ``fmap`` ``(C, h, w)`` resized to ``sel.size``.

    Args:
        fmap: the source map (any float dtype; computed in float32/float64).
        sel: regions at the output size.
        normalize: L2-normalise every resized pixel before summing (keys, queries).
        band_rows: output rows per band of the banded evaluation.
    """
    _, h, w = fmap.shape
    out_h, out_w = sel.size
    if (h, w) != (out_h, out_w) and sel.num_regions * (h + 1) * (w + 1) <= out_h * out_w:
        return _token_weight_sums(fmap, sel, normalize)
    return _banded_sums(fmap.to(torch.float32), sel, normalize, band_rows)
