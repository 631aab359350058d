"""Semantic branch, part 1: mask class tokens (MCT).

One extra token per region of a window, initialised as a copy of the CLS token after the
positional embedding and ``ln_pre``, is appended to the token sequence (order
``[CLS, patches, MCT_1..MCT_Z]``). Through every block (the L-1 first ones and the unmodified
last block) an attention mask lets CLS and patches see only CLS and patches, so their outputs
are those of a plain forward, and lets ``MCT_r`` see CLS and the patches of region r only (not
itself, not other MCTs). Each patch then takes the last-block output of its region's MCT.

Padding: with ``CorrCLIPConfig.padding == "reference"`` the merged maps have no ``-1``, padding is
a region with its own MCT, and real DINO patches whose nearest CLIP cell is padding take it (as in
the reference); ``-1`` cells (``"ignore"``) get no MCT.
"""

from __future__ import annotations

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.mask_clustering import PADDING_ID

__all__ = ["compact_region_index", "mask_class_tokens", "mask_class_tokens_with_blocks", "mct_attention_allowed"]


def compact_region_index(region_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window region index ``0..Z_b-1`` (ascending id order) of every patch.

    Args:
        region_grid: ``(B, gh, gw) int64`` region ids on the CLIP grid; ``-1`` = padding,
            every other id (``0`` included) is a region.
    Returns:
        ``(B, gh*gw) int64`` index (``-1`` for padding) and ``(B,) int64`` region counts ``Z_b``.
    """
    b = region_grid.shape[0]
    flat = region_grid.reshape(b, -1).long()
    valid = flat != PADDING_ID
    stride = int(flat.max()) + 2 if flat.numel() else 1
    window = torch.arange(b, device=flat.device)[:, None].expand_as(flat)
    keys = window * stride + flat  # unique per (window, id)
    uniq, inverse = torch.unique(keys[valid], sorted=True, return_inverse=True)
    counts = torch.bincount(uniq // stride, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.full_like(flat, PADDING_ID)
    local[valid] = inverse - starts[window[valid]]
    return local, counts


def mct_attention_allowed(local: torch.Tensor, num_mct: int) -> torch.Tensor:
    """Which key each query may attend to, for the sequence ``[CLS, patches, MCT_0..MCT_{num_mct-1}]``.

    Args:
        local: ``(B, N) int64`` region index of each patch (``-1`` = padding, in no region).
        num_mct: number of MCT slots (the largest ``Z_b`` of the batch); slots beyond a
            window's own ``Z_b`` attend to CLS only and are discarded.
    Returns:
        ``(B, T, T) bool`` with ``T = 1 + N + num_mct``; ``[b, query, key]`` true = allowed.
    """
    b, n = local.shape
    t = 1 + n + num_mct
    allowed = torch.zeros(b, t, t, dtype=torch.bool, device=local.device)
    allowed[:, : 1 + n, : 1 + n] = True
    allowed[:, 1 + n :, 0] = True
    slots = torch.arange(num_mct, device=local.device)
    allowed[:, 1 + n :, 1 : 1 + n] = local[:, None, :] == slots[None, :, None]
    return allowed


def mask_class_tokens_with_blocks(
    visual: nn.Module,
    tokens_in: torch.Tensor,
    region_grid: torch.Tensor,
    keep: tuple[int, ...] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Mask class tokens plus the (unchanged) outputs of the blocks in ``keep``, in one pass.

    Args:
        visual: open_clip ``VisionTransformer``.
        tokens_in: ``(B, 1 + N, D)`` input of block 1 (``clip_ops.embed_tokens`` output).
        region_grid: ``(B, gh, gw) int64`` region ids on the CLIP grid (``-1`` = padding).
        keep: 1-based block numbers whose ``(B, 1 + N, D)`` CLS + patch outputs are returned.
    Returns:
        ``(B, gh, gw, D)`` per-patch MCT outputs of the last block (pre ``ln_post``; zeros on
        padding patches) and ``{block: (B, 1 + N, D)}`` for ``keep``.
    """
    if tokens_in.ndim != 3:
        raise ValueError(f"tokens_in must be (B, 1 + N, D), got {tuple(tokens_in.shape)}")
    if region_grid.ndim != 3 or region_grid.shape[0] != tokens_in.shape[0]:
        raise ValueError(f"region_grid must be (B, gh, gw) with B = {tokens_in.shape[0]}, got {tuple(region_grid.shape)}")
    if region_grid.is_floating_point() or bool((region_grid < PADDING_ID).any()):
        raise ValueError("region_grid must hold integer ids >= -1 (-1 = padding)")
    b, t0, d = tokens_in.shape
    gh, gw = region_grid.shape[1:]
    n = gh * gw
    if t0 != 1 + n:
        raise ValueError(f"tokens_in has {t0 - 1} patch tokens but region_grid is {gh}x{gw}")
    num_l = clip_ops.num_blocks(visual)
    local, counts = compact_region_index(region_grid)
    num_mct = max(int(counts.max()) if b else 0, 1)
    heads = clip_ops.blocks_of(visual)[0].attn.num_heads
    allowed = mct_attention_allowed(local, num_mct)
    additive = torch.zeros(allowed.shape, dtype=tokens_in.dtype, device=tokens_in.device)
    additive.masked_fill_(~allowed, float("-inf"))
    additive = additive.repeat_interleave(heads, dim=0)  # (B * heads, T, T), batch-major
    mct = tokens_in[:, :1].expand(b, num_mct, d)
    x = torch.cat([tokens_in, mct], dim=1)
    out, kept = clip_ops.run_blocks(visual, x, 1, num_l, keep=tuple(keep), attn_mask=additive)
    kept = {i: y[:, : 1 + n] for i, y in kept.items()}
    mct_out = out[:, 1 + n :]  # (B, num_mct, D)
    per_patch = torch.gather(mct_out, 1, local.clamp_min(0)[:, :, None].expand(b, n, d))
    per_patch = per_patch * (local != PADDING_ID)[:, :, None].to(per_patch.dtype)
    return per_patch.reshape(b, gh, gw, d), kept


def mask_class_tokens(
    visual: nn.Module,
    tokens_in: torch.Tensor,
    region_grid: torch.Tensor,
    cfg: CorrCLIPConfig,
) -> torch.Tensor:
    """Semantic-branch tokens: for each patch, the last-block output of its region's MCT.

    Every id ``>= 0`` of a window (``0``/m0 included) that is present on the CLIP grid is a
    region with one MCT; regions that vanish on the coarse grid get none. Windows with
    different region counts are batched by padding the MCT set (padded slots see CLS only and
    are discarded).

    Args:
        visual: open_clip ``VisionTransformer``.
        tokens_in: ``(B, 1 + N, D)`` input of block 1 (``clip_ops.embed_tokens`` output).
        region_grid: ``(B, gh, gw) int64`` region ids on the CLIP token grid (``-1`` = padding).
        cfg: CorrCLIP configuration (the branch must be enabled).
    Returns:
        ``(B, gh, gw, D)`` pre-``ln_post`` MCT outputs; zeros where a patch has no MCT (padding).
    """
    if not cfg.semantic_branch:
        raise ValueError("mask_class_tokens called with cfg.semantic_branch=False")
    semantic, _ = mask_class_tokens_with_blocks(visual, tokens_in, region_grid)
    return semantic
