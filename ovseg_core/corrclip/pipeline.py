"""CorrCLIP per-window entry point: the reference forward of one batch of windows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.corrclip.config import CorrCLIPConfig, required_blocks, spatial_block_range
from ovseg_core.corrclip.feature_refinement import feature_refinement
from ovseg_core.corrclip.mask_class_tokens import mask_class_tokens, mask_class_tokens_with_blocks
from ovseg_core.corrclip.mask_clustering import cluster_masks, resize_regions
from ovseg_core.corrclip.scope_reconstruction import scope_reconstruction, similarity
from ovseg_core.corrclip.value_reconstruction import value_reconstruction

__all__ = ["corrclip_window_features"]

TokenTransform = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def _clip_blocks(
    visual: nn.Module,
    crops: torch.Tensor,
    cfg: CorrCLIPConfig,
    region_grid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run CLIP once: penultimate output, spatial-branch mean and (if ``region_grid``) MCT tokens."""
    num_l = clip_ops.num_blocks(visual)
    tokens_in, _ = clip_ops.embed_tokens(visual, crops)
    spatial = range(0)
    if cfg.spatial_branch:
        first, last = spatial_block_range(cfg, num_l)
        spatial = range(first, last + 1)
    keep = (num_l - 1, *spatial)
    if region_grid is not None:
        semantic, kept = mask_class_tokens_with_blocks(visual, tokens_in, region_grid, keep=keep)
    else:
        semantic = None
        _, kept = clip_ops.run_blocks(visual, tokens_in, 1, num_l - 1, keep=keep)
    spatial_in = torch.stack([kept[i] for i in spatial]).mean(0) if cfg.spatial_branch else None
    return kept[num_l - 1], spatial_in, semantic


def corrclip_window_features(
    visual: nn.Module,
    crops: torch.Tensor,
    qk: torch.Tensor,
    regions: torch.Tensor,
    cfg: CorrCLIPConfig,
    blocks: Mapping[str, torch.Tensor] | None = None,
    semantic: torch.Tensor | None = None,
    token_transform: TokenTransform | None = None,
    merged: torch.Tensor | None = None,
) -> torch.Tensor:
    """CorrCLIP dense features of a batch of windows (the reference forward).

    Steps: region map nearest-resized to the correlation grid (v1: the DINO grid, CorrCLIPv2:
    twice the CLIP grid); mask clustering (m0 rule, DBSCAN unless ``cfg.mask_clustering`` is
    off); S = F F^T of the correlation features (DINO q+k, or the VFM features of
    ``vfm_correlation.vfm_window_features``); scope reconstruction (E); value reconstruction (A);
    CLIP block outputs (computed, or taken from ``blocks``); MCT tokens on the merged regions
    nearest-resized to the CLIP grid (computed, or taken from ``semantic``); feature refinement
    and fusion on the correlation grid.

    Args:
        visual: open_clip ``VisionTransformer`` (eval mode; wrap in ``torch.no_grad()``).
        crops: ``(B, 3, H, W)`` CLIP-normalised windows, already padded by the caller so that H
            and W are multiples of the DINO patch size (CorrCLIP: of 56). As in the reference, a
            side that is not a multiple of the CLIP patch size gives the floor grid (the patch
            convolution drops the remainder: 280 with ViT-B/16 -> 17 tokens, DINO /8 -> 35).
        qk: ``(B, hd, wd, C)`` L2-normalised correlation features of the same windows: the
            last-block DINO q+k (v1) or the VFM features (CorrCLIPv2); their grid is the
            correlation grid ("DINO grid" below).
        regions: ``(B, H, W) int64`` region ids of the windows at crop resolution (``0`` =
            unsegmented, ``-1`` = padding; ``cfg.padding`` decides whether padding is a region
            of its own, as in the reference, or is dropped).
        cfg: CorrCLIP configuration.
        blocks: optional precomputed aggregates named by ``required_blocks(cfg, L)``, each
            ``(B, 1 + N, D)``; used instead of running CLIP (same result).
        semantic: optional precomputed ``(B, gh, gw, D)`` MCT tokens (``mask_class_tokens`` on
            the merged regions of this window); only with ``cfg.semantic_branch``.
        token_transform: optional map of the ``(B, 1 + N, D)`` penultimate tokens (and the
            ``(gh, gw)`` grid) applied before the main branch only; identity when None.
        merged: optional precomputed ``(B, hd, wd) int64`` output of :func:`cluster_masks` for
            these windows (the ``mask_clustering`` stage, run with the same ``cfg.padding``);
            used instead of clustering again.
    Returns:
        ``(B, hd, wd, E)`` features in the joint embedding space, not normalised.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (B, 3, H, W), got {tuple(crops.shape)}")
    b, _, h, w = crops.shape
    if qk.ndim != 4 or qk.shape[0] != b:
        raise ValueError(f"qk must be (B, hd, wd, C) with B = {b}, got {tuple(qk.shape)}")
    if regions.shape != (b, h, w):
        raise ValueError(f"regions must be (B, H, W) = {(b, h, w)} (crop resolution), got {tuple(regions.shape)}")
    if semantic is not None and not cfg.semantic_branch:
        raise ValueError("semantic tokens given but cfg.semantic_branch is False")
    clip_grid = clip_ops.token_grid(visual, h, w)
    dino_grid = (qk.shape[1], qk.shape[2])
    num_l = clip_ops.num_blocks(visual)
    names = required_blocks(cfg, num_l)

    # Mask clustering (on the DINO grid)
    if merged is None:
        merged = cluster_masks(qk, resize_regions(regions, dino_grid), cfg)
    elif merged.shape != (b, *dino_grid):
        raise ValueError(f"merged must be (B, hd, wd) = {(b, *dino_grid)}, got {tuple(merged.shape)}")
    # Scope reconstruction
    s = similarity(qk)
    e = scope_reconstruction(s, merged.reshape(b, -1), cfg)
    # Value reconstruction
    attn = value_reconstruction(s, e, cfg)
    del s, e

    # CLIP block outputs and mask class tokens (regions: merged map, nearest to the CLIP grid)
    region_grid = resize_regions(merged, clip_grid) if cfg.semantic_branch and semantic is None else None
    if blocks is None:
        penult, spatial_in, computed = _clip_blocks(visual, crops, cfg, region_grid)
        semantic = computed if semantic is None else semantic
    else:
        missing = [n for n in names if n not in blocks]
        if missing:
            raise ValueError(f"blocks lacks {missing}; pass the aggregates named by required_blocks(cfg, {num_l}) = {names}")
        penult = blocks[names[0]]
        spatial_in = blocks[names[1]] if cfg.spatial_branch else None
        if region_grid is not None:
            tokens_in, _ = clip_ops.embed_tokens(visual, crops)
            semantic = mask_class_tokens(visual, tokens_in, region_grid, cfg)

    # Feature refinement
    if token_transform is not None:
        transformed = token_transform(penult, clip_grid)
        if transformed.shape != penult.shape:
            raise ValueError(f"token_transform changed the token shape {tuple(penult.shape)} -> {tuple(transformed.shape)}")
        penult = transformed
    return feature_refinement(visual, penult, spatial_in, semantic, attn, clip_grid, dino_grid, cfg)
