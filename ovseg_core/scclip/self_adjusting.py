"""SC-CLIP self-adjusting: attention enhancement and feature aggregation with mid-layer similarity.

- **Feature aggregation**: ``W = Sim`` with entries ``< sim_threshold`` zeroed and rows divided by
  ``(row sum + eps)``; tokens ``x := W @ x``. Before the last block ``Sim = Sim_mid`` (cosine of
  the repaired output of the pre-adjust block), after it ``Sim`` comes from the post-adjust block.
- **Attention enhancement** in the last block, per head:
  ``A = 1/2 [softmax(M) + softmax(K K^T / sqrt(d_head))]`` with
  ``M = attn_scale * (Sim_mid - mean(Sim_mid))`` and ``M < 0 -> -inf`` (M shared by all heads);
  output ``out_proj(A @ V)`` on ``ln_1(x)``, plus ``res_cls`` times the CLS token. No residual,
  no FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core import clip_ops

__all__ = [
    "aggregate",
    "aggregation_weights",
    "cosine_similarity",
    "enhanced_attention",
    "self_adjusted_attention",
]


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` cosine similarities of the rows of ``(B, N, D)`` tokens."""
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)}")
    xn = F.normalize(x, dim=-1)
    return torch.matmul(xn, xn.transpose(1, 2))


def aggregation_weights(sim: torch.Tensor, threshold: float, eps: float) -> torch.Tensor:
    """Thresholded, row-normalised similarity ``(B, N, N)`` for feature aggregation.

    Args:
        sim: ``(B, N, N)`` cosine similarities.
        threshold: entries ``< threshold`` become 0 (paper: 0.4).
        eps: rows are divided by ``(row sum + eps)`` (paper: 1e-6).
    """
    w = torch.where(sim < threshold, torch.zeros_like(sim), sim)
    return w / (w.sum(dim=-1, keepdim=True) + eps)


def aggregate(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Feature aggregation ``weights @ x`` for ``(B, N, N)`` weights and ``(B, N, D)`` tokens."""
    if weights.shape != (x.shape[0], x.shape[1], x.shape[1]):
        raise ValueError(f"weights {tuple(weights.shape)} do not match tokens {tuple(x.shape)}")
    return torch.matmul(weights.to(x.dtype), x)


def enhanced_attention(
    k: torch.Tensor, mid_sim: torch.Tensor | None, attn_scale: float, windows: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention weights of the self-adjusted last block.

    Args:
        k: ``(B, heads, N, dh)`` keys.
        mid_sim: ``(B, N, N)`` mid-layer cosine similarity Sim_mid, or ``None`` for key-key
            attention alone (attention enhancement off).
        attn_scale: the factor of ``M = attn_scale * (Sim_mid - mean(Sim_mid))``; ``mean`` is
            over each image's whole ``N x N`` matrix.
        windows: ``(B,) bool``: enhance only these windows (the others get key-key attention);
            ``None``: every window (design-document extensions that switch steps per window).
    Returns:
        ``(B, heads, N, N)`` row-stochastic weights:
        ``1/2 [softmax(M) + softmax(K K^T / sqrt(dh))]``, or ``softmax(K K^T / sqrt(dh))``.
    """
    kk = torch.matmul(k, k.transpose(-2, -1)) * k.shape[-1] ** -0.5
    attn = torch.softmax(kk, dim=-1)
    if mid_sim is None:
        return attn
    if mid_sim.shape != (k.shape[0], k.shape[2], k.shape[2]):
        expected = (k.shape[0], k.shape[2], k.shape[2])
        raise ValueError(f"mid_sim must be (B, N, N) = {expected}, got {tuple(mid_sim.shape)}")
    m = attn_scale * (mid_sim - mid_sim.mean(dim=(-2, -1), keepdim=True))
    m = m.masked_fill(m < 0, float("-inf"))  # the diagonal (cos = 1 >= mean) keeps every row finite
    enhanced = 0.5 * (torch.softmax(m, dim=-1)[:, None].to(attn.dtype) + attn)
    if windows is None:
        return enhanced
    return torch.where(windows.reshape(-1, 1, 1, 1), enhanced, attn)


def self_adjusted_attention(
    block: nn.Module,
    x: torch.Tensor,
    cls: torch.Tensor,
    mid_sim: torch.Tensor | None,
    attn_scale: float,
    res_cls: float,
    windows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last block run as SC-CLIP does: ``out_proj(A @ V)`` on ``ln_1(x)`` plus ``res_cls * cls``.

    Args:
        block: the last open_clip ``ResidualAttentionBlock`` of the tower (its own weights).
        x: ``(B, N, D)`` patch tokens (no CLS) entering the block.
        cls: ``(B, D)`` CLS token added with weight ``res_cls``.
        mid_sim: ``(B, N, N)`` Sim_mid for the attention enhancement, or ``None`` (off).
        attn_scale: see :func:`enhanced_attention`.
        res_cls: weight of ``cls`` (paper: 0.3 ViT-B, 0.1 ViT-L).
        windows: ``(B,) bool`` windows the enhancement applies to, ``None`` = all (see :func:`enhanced_attention`).
    Returns:
        ``(B, N, D)`` tokens. No residual, no FFN.
    """
    if x.ndim != 3 or cls.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"x must be (B, N, D) and cls (B, D); got {tuple(x.shape)} and {tuple(cls.shape)}")
    # the block runs at its weights' dtype (float16 / bfloat16 towers); the result returns at x's dtype
    _, k, v = clip_ops.qkv(block, block.ln_1(x.to(block.ln_1.weight.dtype)))
    attn = enhanced_attention(k, mid_sim, attn_scale, windows)
    return clip_ops.out_proj(block, clip_ops.attend(attn, v)).to(x.dtype) + res_cls * cls[:, None, :]
