"""Mask clustering: region maps on the DINO grid, the m0 rule, and DBSCAN region merging.

Region-id conventions used throughout ``ovseg_core.corrclip``:

* input maps: ``int64`` ids, ``0`` = unsegmented, ``1..Z`` = regions, ``-1`` = padding
  (pixels added to pad a window);
* merged maps (output of :func:`cluster_masks`): ``0`` = m0 (the patches treated as
  unsegmented), ``1..K`` = merged regions, ``-1`` = padding removed from the method.

``CorrCLIPConfig.padding`` is decided here. ``"reference"`` (CorrCLIPv1: the mask crop is padded
with id 10000): padding becomes one more region, with an id above every real id
(:func:`padding_as_region`), so it enters DBSCAN (and may merge with a real region), gets its own
block in E and its own mask class token; merged maps then hold no ``-1``. ``"ignore"``: padding
stays ``-1`` and the later steps drop it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ovseg_core.corrclip.config import CorrCLIPConfig

__all__ = ["PADDING_ID", "REFERENCE_PADDING_ID", "cluster_masks", "padding_as_region", "resize_regions"]

# Region id of padded pixels/patches in the input maps (the task layer pads region crops with it).
PADDING_ID = -1

# Id the CorrCLIP reference pads window mask crops with (F.pad(..., value=10000)): larger than
# every real id, so padding sorts last and is never m0.
REFERENCE_PADDING_ID = 10000


def padding_as_region(regions: torch.Tensor) -> torch.Tensor:
    """Padding (``-1``) turned into an ordinary region id, as the CorrCLIP reference pads mask crops.

    The id is :data:`REFERENCE_PADDING_ID` (10000), or ``max id + 1`` when real ids reach it
    (where the reference's padding would collide with a real region). Only its rank matters:
    it is above every real id, so padding is never m0 and comes last in the DBSCAN order.

    Args:
        regions: ``(B, H, W)`` integer ids, ``-1`` = padding.
    Returns:
        ``(B, H, W) int64`` ids without ``-1``.
    """
    if regions.is_floating_point():
        raise ValueError(f"regions must hold integer ids, got dtype {regions.dtype}")
    regions = regions.long()
    pad = regions == PADDING_ID
    if not bool(pad.any()):
        return regions
    pad_id = max(REFERENCE_PADDING_ID, int(regions.max()) + 1)
    return regions.masked_fill(pad, pad_id)


def resize_regions(regions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of region maps, exactly as ``F.interpolate(mode="nearest")``.

    Args:
        regions: ``(B, H, W)`` integer region ids (any values, ``-1`` included).
        size: output ``(h, w)``.
    Returns:
        ``(B, h, w) int64`` ids.
    """
    if regions.ndim != 3:
        raise ValueError(f"regions must be (B, H, W), got {tuple(regions.shape)}")
    if regions.is_floating_point():
        raise ValueError(f"regions must hold integer ids, got dtype {regions.dtype}")
    if tuple(regions.shape[-2:]) == tuple(size):
        return regions.long()
    # float64 holds every realistic id exactly; nearest sampling does not mix values.
    out = F.interpolate(regions[:, None].double(), size=size, mode="nearest")
    return out[:, 0].round().long()


def _m0_id(ids: torch.Tensor, cfg: CorrCLIPConfig) -> int | None:
    """The id treated as unsegmented among the sorted non-padding ``ids`` of one window."""
    if ids.numel() == 0:
        return None
    if cfg.m0_quirk:
        return int(ids[0])
    return 0 if bool((ids == 0).any()) else None


def _dbscan_labels(qk: torch.Tensor, inverse: torch.Tensor, num_regions: int, cfg: CorrCLIPConfig) -> np.ndarray:
    """DBSCAN cluster label of each region from its mean, L2-normalised q+k feature.

    Args:
        qk: ``(P, C)`` features of the window's region patches.
        inverse: ``(P,) int64`` region index ``0..num_regions-1`` of each patch.
    Returns:
        ``(num_regions,)`` labels; ``-1`` = noise (only possible with ``dbscan_min_samples > 1``).
    """
    sums = qk.new_zeros(num_regions, qk.shape[-1]).index_add_(0, inverse, qk)
    counts = torch.bincount(inverse, minlength=num_regions).to(qk.dtype)
    feats = F.normalize(sums / counts[:, None], dim=-1)
    sim = feats @ feats.T
    distance = (sim.max() - sim).clamp_min(0).double().cpu().numpy()
    from sklearn.cluster import DBSCAN  # scikit-learn + SciPy take ~1 s to import: only where clustering runs

    return DBSCAN(eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples, metric="precomputed").fit_predict(distance)


def cluster_masks(qk: torch.Tensor | None, regions: torch.Tensor, cfg: CorrCLIPConfig) -> torch.Tensor:
    """Mask merging with the m0 rule, per window.

    With ``cfg.padding == "reference"`` padding is first made a region (:func:`padding_as_region`).
    For each window: the non-padding ids present are sorted; m0 is the smallest of them when
    ``cfg.m0_quirk`` (reference: a real region when the window has no id-0 patch), otherwise id
    0 if present. When ``cfg.mask_clustering`` and there are at least two non-m0 regions (the
    reference's "more than 2 distinct ids"), each non-m0 region gets the mean of its patches'
    q+k features, L2-normalised; regions are clustered by
    ``DBSCAN(eps, min_samples, metric="precomputed")`` on ``max(sim) - sim`` and the regions of
    one cluster become one (possibly disconnected) region. DBSCAN noise regions stay alone.

    Args:
        qk: ``(B, hd, wd, C) float`` L2-normalised correlation features of the windows (DINO q+k,
            or CorrCLIPv2's VFM features); may be None with ``cfg.mask_clustering=False`` (only
            the m0 rule and the renumbering run, no feature is read).
        regions: ``(B, hd, wd) int64`` region ids on the correlation grid (``-1`` = padding).
        cfg: CorrCLIP configuration.
    Returns:
        ``(B, hd, wd) int64`` merged ids: ``0`` = m0, ``1..K`` = merged regions (numbered in
        order of first cluster label, then the ascending original id of each unclustered
        region), ``-1`` = padding (only with ``cfg.padding == "ignore"``). With ``cfg.mask_clustering=False`` the regions are only
        renumbered (m0 -> 0, others -> 1..K in ascending id order).
    """
    if qk is None:
        if cfg.mask_clustering:
            raise ValueError("cluster_masks needs the correlation features (qk) when cfg.mask_clustering is True")
        if regions.ndim != 3:
            raise ValueError(f"regions must be (B, hd, wd), got {tuple(regions.shape)}")
    elif qk.ndim != 4:
        raise ValueError(f"qk must be (B, hd, wd, C), got {tuple(qk.shape)}")
    elif regions.shape != qk.shape[:3]:
        raise ValueError(f"regions {tuple(regions.shape)} must be on the DINO grid of qk {tuple(qk.shape[:3])}")
    if regions.is_floating_point():
        raise ValueError(f"regions must hold integer ids, got dtype {regions.dtype}")
    if bool((regions < PADDING_ID).any()):
        raise ValueError(f"region ids must be >= {PADDING_ID} (-1 = padding), got min {int(regions.min())}")
    if cfg.padding == "reference":
        regions = padding_as_region(regions)
    b = regions.shape[0]
    flat_regions = regions.reshape(b, -1).long()
    flat_qk = qk.reshape(b, -1, qk.shape[-1]).float() if qk is not None else None
    merged = torch.full_like(flat_regions, PADDING_ID)
    for w in range(b):  # windows: each has its own region set and DBSCAN run
        valid = flat_regions[w] != PADDING_ID
        ids, inverse = torch.unique(flat_regions[w][valid], sorted=True, return_inverse=True)
        m0 = _m0_id(ids, cfg)
        is_region = ids != m0 if m0 is not None else torch.ones_like(ids, dtype=torch.bool)
        num_regions = int(is_region.sum())
        # new_label[j]: merged id of the j-th distinct original id (m0 -> 0, regions -> 1..K)
        new_label = torch.zeros_like(ids)
        if cfg.mask_clustering and num_regions >= 2 and flat_qk is not None:
            region_index = torch.cumsum(is_region.long(), 0) - 1  # index among the non-m0 regions
            patch_is_region = is_region[inverse]
            labels = _dbscan_labels(
                flat_qk[w][valid][patch_is_region], region_index[inverse[patch_is_region]], num_regions, cfg
            )
            labels = torch.as_tensor(labels, dtype=torch.long, device=ids.device)
            num_clusters = int(labels.max()) + 1 if bool((labels >= 0).any()) else 0
            noise = labels < 0
            labels[noise] = num_clusters + torch.arange(int(noise.sum()), device=ids.device)
            new_label[is_region] = labels + 1
        else:
            new_label[is_region] = torch.arange(1, num_regions + 1, device=ids.device)
        merged[w][valid] = new_label[inverse]
    return merged.reshape(regions.shape)
