"""Baseline dense features: vanilla CLIP, MaskCLIP and ClearCLIP.

All three read the output of block L-1 (``"block:L-1"``; vanilla CLIP the output of the last
block ``"block:L"``) and return patch features ``ln_post(.) @ proj`` on the CLIP token grid:

- ``"clip"``: the unmodified last block (attention with residual, FFN), patch tokens.
- ``"maskclip"``: the last block's value path only: ``out_proj(V(ln_1(x)))``; no attention
  mixing, no residual, no FFN.
- ``"clearclip"``: the last block's attention with query-query weights
  ``softmax(Q Q^T / sqrt(d_head))`` over all tokens (CLS included), ``out_proj(A @ V)``; no
  residual, no FFN.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.scclip.pipeline import resolve_block_inputs

__all__ = ["BASELINE_METHODS", "baseline_required_blocks", "baseline_window_features"]

BASELINE_METHODS: tuple[str, ...] = ("clip", "maskclip", "clearclip")
"""Valid ``method`` names."""


def _check_method(method: str) -> None:
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline method {method!r}; valid: {BASELINE_METHODS}")


def baseline_required_blocks(method: str, num_blocks: int) -> tuple[str, ...]:
    """Block outputs a baseline reads: ``("block:L",)`` for ``"clip"``, ``("block:L-1",)`` otherwise."""
    _check_method(method)
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2, got {num_blocks}")
    return (f"block:{num_blocks}",) if method == "clip" else (f"block:{num_blocks - 1}",)


@torch.no_grad()
def baseline_window_features(
    visual: nn.Module,
    crops: torch.Tensor,
    method: str,
    blocks: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dense features of a baseline for a batch of crops (no gradients).

    Args:
        visual: an open_clip ``VisionTransformer``.
        crops: ``(B, 3, H, W) float32`` CLIP-normalised crops, sides multiples of the patch size.
        method: ``"clip"``, ``"maskclip"`` or ``"clearclip"``.
        blocks: optional cached block outputs named by :func:`baseline_required_blocks`.
    Returns:
        ``(B, gh, gw, E) float32`` features in the joint embedding space, not normalised.
    """
    _check_method(method)
    num = clip_ops.num_blocks(visual)
    (name,) = baseline_required_blocks(method, num)
    named, (gh, gw) = resolve_block_inputs(visual, crops, (name,), blocks)
    block = clip_ops.blocks_of(visual)[num - 1]
    tokens = named[name].to(block.ln_1.weight.dtype)  # the tower's dtype: float32 unless run at float16 / bfloat16
    if method == "clip":
        x = tokens[:, 1:]
    else:
        q, _, v = clip_ops.qkv(block, block.ln_1(tokens))
        if method == "maskclip":
            x = clip_ops.out_proj(block, clip_ops.merge_heads(v))[:, 1:]
        else:
            attn = torch.softmax(torch.matmul(q, q.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            x = clip_ops.out_proj(block, clip_ops.attend(attn, v))[:, 1:]
    feats = clip_ops.project(visual, x)
    return feats.reshape(feats.shape[0], gh, gw, feats.shape[-1]).float()
