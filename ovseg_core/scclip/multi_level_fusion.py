"""SC-CLIP multi-level fusion: a second pass of the last block over summed mid-level features.

``r`` = **sum** of the outputs of the fusion blocks (ViT-B: blocks 4..10, CLS included);
``r := self_adjusted_attention(ln_1(r patches)) + res_cls * (r's CLS)``; with feature
aggregation on, ``r := W' @ r`` (the post-adjust weights); finally ``x := x + r``.
"""

from __future__ import annotations

import torch
from torch import nn

from ovseg_core.scclip.self_adjusting import aggregate, self_adjusted_attention

__all__ = ["multi_level_fusion"]


def multi_level_fusion(
    x: torch.Tensor,
    level_sum: torch.Tensor,
    block: nn.Module,
    mid_sim: torch.Tensor | None,
    post_weights: torch.Tensor | None,
    attn_scale: float,
    res_cls: float,
    enhance_windows: torch.Tensor | None = None,
    aggregate_windows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the second (multi-level) pass to the first pass's tokens.

    Args:
        x: ``(B, N, D)`` first-pass patch tokens (after post-adjust).
        level_sum: ``(B, 1 + N, D)`` sum of the fusion blocks' outputs, CLS first.
        block: the last block of the tower.
        mid_sim: ``(B, N, N)`` Sim_mid for the attention enhancement, or ``None`` (off).
        post_weights: ``(B, N, N)`` post-adjust aggregation weights W', or ``None`` (aggregation off).
        attn_scale, res_cls: as in :func:`ovseg_core.scclip.self_adjusting.self_adjusted_attention`.
        enhance_windows, aggregate_windows: ``(B,) bool`` windows where the attention enhancement and
            the aggregation by ``post_weights`` apply; ``None``: every window.
    Returns:
        ``(B, N, D)`` tokens ``x + r``.
    """
    if level_sum.ndim != 3 or level_sum.shape[0] != x.shape[0] or level_sum.shape[1] != x.shape[1] + 1:
        raise ValueError(
            f"level_sum must be (B, 1 + N, D) = ({x.shape[0]}, {x.shape[1] + 1}, D), got {tuple(level_sum.shape)}"
        )
    r = self_adjusted_attention(block, level_sum[:, 1:], level_sum[:, 0], mid_sim, attn_scale, res_cls, enhance_windows)
    if post_weights is not None:
        aggregated = aggregate(r, post_weights)
        r = aggregated if aggregate_windows is None else torch.where(aggregate_windows.reshape(-1, 1, 1), aggregated, r)
    return x + r
