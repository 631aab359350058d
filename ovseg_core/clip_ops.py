"""Functional pieces over an open_clip ``VisionTransformer``.

Every method (CorrCLIP, SC-CLIP, the baselines) reads CLIP internals through these
functions instead of editing a copy of open_clip: token embedding with the positional
embedding resized to the crop's grid, running a range of blocks, extracting q/k/v from a
block's own ``in_proj`` weights, and applying a block's ``out_proj``/``ln_post``/``proj``.

Shapes: tokens are ``(B, 1 + N, D)`` batch-first with CLS first and patches in row-major
order of the ``(gh, gw)`` grid; heads are split as ``(B, H, N, D // H)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "attend",
    "blocks_of",
    "embed_tokens",
    "num_blocks",
    "out_proj",
    "patch_size",
    "project",
    "qkv",
    "resize_pos_embed",
    "run_blocks",
    "split_heads",
    "merge_heads",
    "token_grid",
]


def blocks_of(visual: nn.Module) -> nn.ModuleList:
    """The residual attention blocks of an open_clip visual tower, in order."""
    try:
        return visual.transformer.resblocks
    except AttributeError as e:
        raise TypeError(
            f"expected an open_clip VisionTransformer with .transformer.resblocks, got {type(visual).__name__}"
        ) from e


def num_blocks(visual: nn.Module) -> int:
    """L, the number of transformer blocks."""
    return len(blocks_of(visual))


def patch_size(visual: nn.Module) -> int:
    """Side of a square patch in pixels (16 for ViT-B/16)."""
    ps = visual.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def token_grid(visual: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Token grid ``(gh, gw)`` of a crop of ``height x width`` pixels (floor: the conv stride drops a remainder)."""
    p = patch_size(visual)
    return height // p, width // p


def resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a ``(1 + G*G, D)`` positional embedding to ``(1 + gh*gw, D)``.

    Bicubic, as both reference codes do: ``interpolate(scale_factor=(g + 0.1) / G)`` with the
    given scale factor used for the sampling grid (``recompute_scale_factor=False``), which is
    numerically different from resizing to ``size=(gh, gw)``. Returned unchanged when the grid
    already matches.
    """
    n, dim = pos_embed.shape
    g0 = int(round(math.sqrt(n - 1)))
    if g0 * g0 != n - 1:
        raise ValueError(f"positional embedding of {n - 1} patch tokens is not a square grid")
    gh, gw = grid_hw
    if (gh, gw) == (g0, g0):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    patch_pos = patch_pos.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(
        patch_pos,
        scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    if patch_pos.shape[-2:] != (gh, gw):
        raise AssertionError(f"pos-embed resize gave {tuple(patch_pos.shape[-2:])}, wanted {(gh, gw)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def embed_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding + CLS + resized positional embedding + ``ln_pre``.

    Sides that are not a multiple of the patch size are handled as the reference codes' patch
    convolution handles them: the stride drops the remainder, ``(gh, gw) = (H, W) // patch``
    (a 280-pixel CorrCLIP window with ViT-B/16: 17 tokens covering pixels 0..271).

    Args:
        images: ``(B, 3, H, W)`` normalised crops, H and W at least the patch size.
    Returns:
        tokens ``(B, 1 + gh*gw, D)`` (the input of block 1) and the grid ``(gh, gw)``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    p = patch_size(visual)
    h, w = images.shape[-2:]
    if h < p or w < p:
        raise ValueError(f"crop {h}x{w} is smaller than the patch size {p}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_pos_embed(visual.positional_embedding, (gh, gw)).to(x.dtype)
    x = visual.ln_pre(x)
    return x, (gh, gw)


def run_blocks(
    visual: nn.Module,
    tokens: torch.Tensor,
    start: int,
    stop: int,
    keep: tuple[int, ...] | frozenset[int] = (),
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run blocks ``start..stop`` (1-based, inclusive) of the tower, unmodified.

    Args:
        tokens: ``(B, T, D)`` the input of block ``start`` (output of block ``start - 1``).
        keep: 1-based block numbers whose outputs are returned.
        attn_mask: optional additive ``(T, T)`` or ``(B * heads, T, T)`` mask passed to each block.
    Returns:
        the output of block ``stop`` and ``{block: output}`` for the blocks in ``keep``.
    """
    blocks = blocks_of(visual)
    if not 1 <= start <= stop + 1 or stop > len(blocks):
        raise ValueError(f"block range {start}..{stop} outside 1..{len(blocks)}")
    kept: dict[int, torch.Tensor] = {}
    x = tokens
    for i in range(start, stop + 1):
        x = blocks[i - 1](x, attn_mask=attn_mask)
        if i in keep:
            kept[i] = x
    return x, kept


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, heads, N, D // heads)``."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, dh)`` -> ``(B, N, heads * dh)``."""
    b, h, n, dh = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * dh)


def qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a block's attention for already normalised tokens (apply ``block.ln_1`` first).

    Args:
        x: ``(B, T, D)``.
    Returns:
        three ``(B, heads, T, D // heads)`` tensors, computed with the block's own ``in_proj``.
    """
    attn: nn.MultiheadAttention = block.attn
    out = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = out.chunk(3, dim=-1)
    h = attn.num_heads
    return split_heads(q, h), split_heads(k, h), split_heads(v, h)


def out_proj(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a block's attention output projection to ``(B, T, D)`` merged heads."""
    return F.linear(x, block.attn.out_proj.weight, block.attn.out_proj.bias)


def attend(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn @ v`` for ``attn (B|1, heads|1, T, S)`` and ``v (B, heads, S, dh)``; returns ``(B, T, D)``."""
    return merge_heads(torch.matmul(attn.to(v.dtype), v))


def project(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ln_post(x) @ proj``: tokens ``(..., D)`` into the joint embedding space ``(..., E)``.

    ``x`` enters at the tower's weight dtype (float32 tokens of a float16 / bfloat16 tower are cast).
    """
    x = visual.ln_post(x.to(visual.ln_post.weight.dtype))
    if visual.proj is not None:
        x = x @ visual.proj
    return x
