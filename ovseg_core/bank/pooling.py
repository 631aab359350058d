"""Region pooling: a dense feature map averaged over each region of a mask (VISR steps 3-4).

The bank's **values** (``CorrCLIPv2/memory_bank_builder/generate_clip_embeddings.py``): the
CorrCLIP output bilinearly resized to the original image size, averaged over every non-zero id
of the mask (ascending), L2-normalised, stored fp16. The bank's **keys**
(``generate_vfm_embeddings.py``): the VFM map bilinearly resized to the original size, L2-normalised
per pixel, averaged over every non-zero id, stored fp16 **without** re-normalising. At inference
the **queries** are the same per-pixel-unit average over every distinct id of the network-input
region map *including* the unsegmented one, then L2-normalised (``corrclip_segmentor.py``
``forward_slide``).

The resized map is never held whole (a 1024-channel map of a 640x480 image is 1.2 GB in
float32): ``ovseg_core.bank.region_sums`` evaluates the same sums band by band, or through
per-token weights when the source grid is coarse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ovseg_core.bank.config import PoolingConfig
from ovseg_core.bank.region_sums import NORM_EPS, region_sums, select_regions

__all__ = ["PooledRegions", "pool_keys", "pool_values", "region_queries"]


@dataclass(frozen=True)
class PooledRegions:
    """One bank row per region, with its registry entry (the image is the caller's)."""

    features: np.ndarray  # (R, C) float16: the values or keys, row r = region r
    mask_ids: np.ndarray  # (R,) int64: the region's id in the mask (2-D) or slice index (3-D)
    areas: np.ndarray  # (R,) int64: pixels per region (0 only for an empty slice of a 3-D mask)


def _check_map(fmap: torch.Tensor, name: str) -> None:
    if not isinstance(fmap, torch.Tensor) or fmap.ndim != 3 or not fmap.is_floating_point():
        got = tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
        raise ValueError(f"{name} must be a (C, h, w) floating tensor, got {got}")


def _means(sums: torch.Tensor, areas: np.ndarray, cfg: PoolingConfig) -> torch.Tensor:
    """(R, C) float32 means; an empty region gives NaN ("nan", the reference) or zeros ("zero")."""
    counts = torch.from_numpy(areas).to(torch.float32)[:, None]
    means = sums / counts  # 0 / 0 = NaN for an empty region, as the reference's mean over nothing
    if cfg.empty_region == "zero":
        means[counts[:, 0] == 0] = 0.0
    return means


def pool_values(
    feature_map: torch.Tensor, regions: np.ndarray | torch.Tensor, cfg: PoolingConfig = PoolingConfig()
) -> PooledRegions:
    """Bank values: the region means of a CLIP feature map, L2-normalised, fp16.

    Args:
        feature_map: ``(C, h, w)`` float, the CorrCLIP output (not normalised per pixel); it is
            bilinearly resized to the mask's size (the reference: the original image size).
        regions: ``(H, W)`` id map or ``(n, H, W)`` bool stack (see :func:`select_regions`).
        cfg: band size and empty-region rule.
    Returns:
        ``(R, C) float16`` unit rows, region ids and areas.
    """
    _check_map(feature_map, "pool_values: feature_map")
    sel = select_regions(regions)
    means = _means(region_sums(feature_map, sel, False, cfg.band_rows), sel.areas, cfg)
    values = F.normalize(means, dim=1, eps=NORM_EPS)
    return PooledRegions(values.to(torch.float16).numpy(), sel.mask_ids, sel.areas)


def pool_keys(
    feature_map: torch.Tensor, regions: np.ndarray | torch.Tensor, cfg: PoolingConfig = PoolingConfig()
) -> PooledRegions:
    """Bank keys: region means of the per-pixel L2-normalised VFM map, fp16, **not** re-normalised.

    Args:
        feature_map: ``(C, h, w)`` float, the VFM's dense map (any grid); bilinearly resized to the
            mask's size, then L2-normalised per pixel (the reference's order).
        regions: ``(H, W)`` id map or ``(n, H, W)`` bool stack (see :func:`select_regions`).
        cfg: band size and empty-region rule.
    Returns:
        ``(R, C) float16`` rows of norm <= 1, region ids and areas.
    """
    _check_map(feature_map, "pool_keys: feature_map")
    sel = select_regions(regions)
    means = _means(region_sums(feature_map, sel, True, cfg.band_rows), sel.areas, cfg)
    return PooledRegions(means.to(torch.float16).numpy(), sel.mask_ids, sel.areas)


def region_queries(
    unit_source: torch.Tensor, region_map: np.ndarray | torch.Tensor, band_rows: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Retrieval queries of a test image: one per distinct id of the network-input region map.

    Args:
        unit_source: ``(C, h, w)`` float VFM map; bilinearly resized to the region map's size and
            L2-normalised per pixel (pass the already resized, normalised map: both steps are then
            identities).
        region_map: ``(H, W)`` integer ids at the network-input size; every distinct id is a region,
            the unsegmented one included (the reference).
        band_rows: output rows per band of the upsampling.
    Returns:
        ``ids (R,) int64`` ascending, ``labels (H, W) int64`` (region index of each pixel) and
        ``queries (R, C) float32`` L2-normalised.
    """
    _check_map(unit_source, "region_queries: unit_source")
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1, got {band_rows}")
    sel = select_regions(region_map, include_zero=True)
    sums = region_sums(unit_source, sel, True, band_rows)
    means = sums / torch.from_numpy(sel.areas).to(torch.float32)[:, None]
    queries = F.normalize(means, dim=1, eps=NORM_EPS)
    return sel.mask_ids, sel.labels, queries.numpy()
