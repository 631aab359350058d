"""VFM correlation (CorrCLIPv2): per-window features whose Gram matrix is the patch correlation S.

CorrCLIPv2 replaces v1's DINO q+k by a vision foundation model's dense map
(``CorrCLIPv2/corrclip_segmentor.py`` ``forward_slide`` / ``forward_feature``; facts section 1,
change 2). From the map at the VFM's token grid:

1. bilinear resize (``align_corners=False``, no antialias) to the network-input (resized) image
   ``(H, W)``, L2-normalised per pixel over the channels;
2. each window crops it like the image; a window padded to a multiple of 56 is padded with
   ``mode='replicate'`` (the image with zeros, the region map with 10000);
3. inside the window, bilinear resize to the correlation grid ``(2 * Hp // p, 2 * Wp // p)``
   (twice the CLIP token grid of the padded crop, ``p`` = CLIP patch), flattened and
   L2-normalised again; ``S = F F^T`` over those tokens (``scope_reconstruction.similarity``).

Exact and light: the full-resolution map of step 1 is never materialised (a 448 x 597 image with
1024 channels would take 1.1 GB in float32). Bilinear resizing is linear and separable, and
step 3 reads at most two full-resolution rows per output row and two columns per output column,
so each window evaluates step 1 only on those rows and columns, normalises them, and applies
step 3 as two small interpolation matrices. The values are those of the dense computation up to
float rounding (the tests compare with the dense formula). Replicate padding is an index clamp
into the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovseg_core.windows import WindowPlan

__all__ = ["bilinear_matrix", "correlation_grid", "vfm_window_features"]

# Norm floor of F.normalize (its default eps).
_EPS = 1e-12


def correlation_grid(padded_hw: tuple[int, int], clip_patch: int) -> tuple[int, int]:
    """Correlation grid of a padded window: twice the CLIP token grid, ``(2 * (Hp // p), 2 * (Wp // p))``.

    ViT-B/16 on a 336 crop: 42 x 42 (v1's DINO /8 grid); ViT-L/14 on 336: 48 x 48; ViT-B/16 on 224: 28 x 28.
    """
    hp, wp = (int(v) for v in padded_hw)
    if clip_patch < 1 or hp < clip_patch or wp < clip_patch:
        raise ValueError(f"padded window {hp}x{wp} must hold at least one {clip_patch}x{clip_patch} CLIP patch")
    return 2 * (hp // clip_patch), 2 * (wp // clip_patch)


def bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Matrix ``M`` (``(out_size, in_size) float64``) with ``M @ x`` = 1-D bilinear resize of ``x``.

    PyTorch's rule for ``F.interpolate(mode="bilinear", align_corners=False)`` with an output size:
    ``scale = in / out``, source ``s = max(scale * (i + 0.5) - 0.5, 0)``, taps ``floor(s)`` and
    ``min(floor(s) + 1, in - 1)`` with weights ``1 - l`` and ``l``, ``l = s - floor(s)``. A 2-D resize
    is ``M_h @ X @ M_w^T``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    lam = src - i0.to(torch.float64)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m


def _window_taps(full: torch.Tensor, start: int, length: int, pad_before: int, padded: int,
                 out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of a window: the full-resolution lines it reads and its resize weights on them.

    Args:
        full: ``(size, n)`` interpolation matrix from the map's axis to the resized image's axis.
        start, length: the window's crop along this axis (image coordinates).
        pad_before: padding before the crop; the padded axis has ``padded`` pixels.
        out: correlation-grid size along this axis.
    Returns:
        ``(k, n)`` rows of ``full`` for the ``k`` distinct image lines read, and ``(out, k)`` weights.
    """
    w = bilinear_matrix(padded, out)
    used = (w != 0).any(dim=0).nonzero().flatten()  # padded positions with a nonzero tap
    lines = start + (used - pad_before).clamp(0, length - 1)  # replicate padding = clamp into the crop
    uniq, inverse = torch.unique(lines, sorted=True, return_inverse=True)
    weights = torch.zeros(out, uniq.numel(), dtype=torch.float64).index_add_(1, inverse, w[:, used])
    return full[uniq], weights


def vfm_window_features(
    vfm_map: torch.Tensor,
    plan: WindowPlan,
    clip_patch: int,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """CorrCLIPv2's correlation features of windows ``start .. stop - 1`` of a plan.

    Args:
        vfm_map: ``(C, h, w)`` the VFM's dense map of the image at its token grid
            (:func:`ovseg_core.features.vfm.vfm_dense_features`), any float dtype.
        plan: the image's window plan (``plan.resized_hw`` is the network-input size the map is
            resized to; windows padded to ``plan.padded_hw``).
        clip_patch: the CLIP patch size (the correlation grid is twice the CLIP token grid).
        start, stop: window range (default: every window).
        dtype: computation dtype (float32 default; float16 follows the reference's half precision). The
            computation runs on ``vfm_map``'s device.
    Returns:
        ``(n, hc, wc, C)`` in ``dtype``, every vector of unit L2 norm (the ``qk`` input of
        ``corrclip_window_features``), ``(hc, wc) = correlation_grid(plan.padded_hw, clip_patch)``.
    """
    if vfm_map.ndim != 3 or not vfm_map.is_floating_point():
        raise ValueError(f"vfm_map must be a float (C, h, w) map, got {vfm_map.dtype} {tuple(vfm_map.shape)}")
    stop = len(plan.windows) if stop is None else stop
    if not 0 <= start <= stop <= len(plan.windows):
        raise ValueError(f"window range {start}..{stop} is outside 0..{len(plan.windows)}")
    c, h, w = vfm_map.shape
    hp, wp = plan.padded_hw
    hc, wc = correlation_grid((hp, wp), clip_patch)
    big_h, big_w = plan.resized_hw
    full_h, full_w = bilinear_matrix(h, big_h), bilinear_matrix(w, big_w)
    x = vfm_map.to(dtype)
    out = []
    for win in plan.windows[start:stop]:
        top, _, left, _ = win.pad
        rows_h, wgt_h = _window_taps(full_h, win.y1, win.y2 - win.y1, top, hp, hc)
        rows_w, wgt_w = _window_taps(full_w, win.x1, win.x2 - win.x1, left, wp, wc)
        # step 1 on the lines read: (C, kh, kw) pixels of the resized map, normalised per pixel
        pixels = rows_h.to(x.device, dtype) @ x @ rows_w.to(x.device, dtype).T
        pixels = F.normalize(pixels, dim=0, eps=_EPS)
        # step 3: resize inside the padded window, normalise per token
        tokens = wgt_h.to(x.device, dtype) @ pixels @ wgt_w.to(x.device, dtype).T  # (C, hc, wc)
        out.append(F.normalize(tokens, dim=0, eps=_EPS).permute(1, 2, 0))
    if not out:
        return x.new_zeros((0, hc, wc, c))
    return torch.stack(out)
