"""Feature refinement: main, spatial and semantic branches and their fusion.

Main branch: the last block's ``ln_1`` then only its V projection on the penultimate-block
output; CLS dropped; V bilinearly upsampled from the CLIP grid to the DINO grid; ``A @ V``;
``out_proj``. No residual, no FFN. Spatial branch: the same path on the mean of lower-block
outputs, with the same A. Semantic branch: per-patch mask class tokens, nearest-upsampled to
the DINO grid. Fusion: ``ln_post`` on each branch separately, ``main + alpha * spatial +
beta * semantic``, then ``@ proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.corrclip.config import CorrCLIPConfig

__all__ = ["feature_refinement", "value_branch"]


def value_branch(
    visual: nn.Module,
    tokens: torch.Tensor,
    attn: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
) -> torch.Tensor:
    """Value-only attention of the last block with an external attention matrix.

    Args:
        visual: open_clip ``VisionTransformer``.
        tokens: ``(B, 1 + gh*gw, D)`` block-input tokens (CLS first).
        attn: ``(B, hd*wd, hd*wd)`` attention on the DINO grid.
    Returns:
        ``(B, hd*wd, D)`` ``out_proj(A @ upsample(V))`` (pre ``ln_post``).
    """
    block = clip_ops.blocks_of(visual)[-1]
    b, t, d = tokens.shape
    gh, gw = clip_grid
    _, _, v = clip_ops.qkv(block, block.ln_1(tokens))  # (B, heads, T, dh)
    v = clip_ops.merge_heads(v)[:, 1:]  # drop CLS: (B, N, D)
    v = v.transpose(1, 2).reshape(b, d, gh, gw)
    v = F.interpolate(v, size=dino_grid, mode="bilinear", align_corners=False)
    v = v.flatten(2).transpose(1, 2)  # (B, Nd, D)
    return clip_ops.out_proj(block, torch.bmm(attn.to(v.dtype), v))


def _check_tokens(name: str, tokens: torch.Tensor, b: int, n: int) -> None:
    if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[1] != 1 + n:
        raise ValueError(f"{name} must be (B, 1 + N, D) = ({b}, {1 + n}, D), got {tuple(tokens.shape)}")


def feature_refinement(
    visual: nn.Module,
    penult: torch.Tensor,
    spatial_in: torch.Tensor | None,
    semantic: torch.Tensor | None,
    attn: torch.Tensor,
    clip_grid: tuple[int, int],
    dino_grid: tuple[int, int],
    cfg: CorrCLIPConfig,
) -> torch.Tensor:
    """Fused CorrCLIP features on the DINO grid.

    Args:
        visual: open_clip ``VisionTransformer``.
        penult: ``(B, 1 + N, D)`` output of block L-1 (after any ``token_transform``).
        spatial_in: ``(B, 1 + N, D)`` mean of the outputs of blocks L-1-NUM_SPATIAL..L-2;
            required iff ``cfg.spatial_branch``.
        semantic: ``(B, gh, gw, D)`` per-patch MCT outputs (``mask_class_tokens``); required iff
            ``cfg.semantic_branch``. All-zero vectors (padding patches without an MCT)
            contribute nothing.
        attn: ``(B, Nd, Nd)`` value-reconstruction attention A on the DINO grid.
        clip_grid: ``(gh, gw)``, ``N = gh * gw``.
        dino_grid: ``(hd, wd)``, ``Nd = hd * wd``.
        cfg: CorrCLIP configuration.
    Returns:
        ``(B, hd, wd, E) float`` projected features, not normalised.
    """
    b = penult.shape[0]
    gh, gw = clip_grid
    hd, wd = dino_grid
    _check_tokens("penult", penult, b, gh * gw)
    if attn.shape != (b, hd * wd, hd * wd):
        raise ValueError(f"A must be (B, Nd, Nd) = ({b}, {hd * wd}, {hd * wd}), got {tuple(attn.shape)}")
    if cfg.spatial_branch != (spatial_in is not None):
        raise ValueError(f"spatial_in must be given iff cfg.spatial_branch (= {cfg.spatial_branch})")
    if cfg.semantic_branch != (semantic is not None):
        raise ValueError(f"semantic must be given iff cfg.semantic_branch (= {cfg.semantic_branch})")

    # Main branch
    fused = visual.ln_post(value_branch(visual, penult, attn, clip_grid, dino_grid))
    # Spatial branch (shares A with the main branch)
    if spatial_in is not None:
        _check_tokens("spatial_in", spatial_in, b, gh * gw)
        fused = fused + cfg.alpha * visual.ln_post(value_branch(visual, spatial_in, attn, clip_grid, dino_grid))
    # Semantic branch: each DINO patch takes the MCT of its nearest CLIP-grid patch
    if semantic is not None:
        if semantic.shape[:3] != (b, gh, gw) or semantic.shape[-1] != penult.shape[-1]:
            raise ValueError(
                f"semantic must be (B, gh, gw, D) = ({b}, {gh}, {gw}, {penult.shape[-1]}), got {tuple(semantic.shape)}"
            )
        sem = F.interpolate(semantic.permute(0, 3, 1, 2), size=dino_grid, mode="nearest")
        sem = sem.flatten(2).transpose(1, 2)  # (B, Nd, D)
        has_mct = (sem != 0).any(dim=-1, keepdim=True).to(sem.dtype)
        fused = fused + cfg.beta * visual.ln_post(sem) * has_mct
    if visual.proj is not None:
        fused = fused @ visual.proj
    return fused.reshape(b, hd, wd, -1)
