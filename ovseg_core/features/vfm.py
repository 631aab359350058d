"""VFM dense features: one forward over the whole image, the token-grid map CorrCLIPv2 correlates.

What the authors' ``extract_dense`` reads from each VFM (``CorrCLIPv2/vfms/factory.py``; facts
section 5), computed with the timm models of :mod:`ovseg_core.backbones.vfm_archs`:

- ``radio`` (C-RADIOv3): RADIO's "spatial features" ``model(x, feature_fmt='NCHW')[1]``: the
  output of the last block for the patch tokens (the summary and register tokens dropped, no
  final norm: RADIO replaces it by an identity unless trained with one; no feature normaliser
  for C-RADIOv3). timm's NaFlexViT ``forward_features`` computes it, RADIO's position rule
  included.
- ``dinov2`` / ``dinov3``: ``get_intermediate_layers(x, reshape=True)[0]``: the last block's output
  after the final LayerNorm, patch tokens only (CLS and the 4 register / storage tokens dropped);
  timm's ``forward_features`` (which ends with that norm) then the patch tokens.
- ``pe`` (PE-Spatial): ``forward_features(x, strip_cls_token=True)``: the last block's output, no
  final norm, CLS dropped. PE's tokens are built here with PE's own rules, since timm's PE port
  matches PE only at the 32 x 32 training grid: the patch convolution (floors the grid), CLS,
  the absolute position embedding resized bilinearly (``align_corners=False``, no antialias) to
  the grid when it is not 32 x 32 (:func:`pe_abs_pos_embed`), ``ln_pre``, then the model's own
  blocks with PE's 2-D RoPE (:func:`pe_rope_table`: integer positions ``1..gw`` / ``1..gh``, CLS at
  angle 0, frequencies ``10000^(-2i / (D/2))``, x-part then y-part, pairs interleaved).

The map is returned at the VFM's token grid; resizing it to the network-input image and the
windows is the correlation step (:mod:`ovseg_core.corrclip.vfm_correlation`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.features.vfm_preprocess import VFM_KINDS, vfm_input

__all__ = ["PE_ROPE_THETA", "pe_abs_pos_embed", "pe_rope_table", "vfm_dense_features"]

# Base of PE's RoPE frequencies (``RotaryEmbedding(theta=10000)`` of ``Rope2D``).
PE_ROPE_THETA = 10000.0


def pe_rope_table(grid: tuple[int, int], head_dim: int, theta: float = PE_ROPE_THETA) -> torch.Tensor:
    """PE's 2-D RoPE for the patch tokens of a ``(gh, gw)`` grid, in timm's concatenated layout.

    Patch ``(r, c)`` (row-major) has positions ``x = c + 1``, ``y = r + 1`` (PE reserves 0 for CLS,
    which stays unrotated); with ``f_i = theta^(-2i / (D/2))``, ``i < D/4``, its angles are
    ``[x f_0, x f_0, x f_1, x f_1, ..., y f_0, y f_0, ...]`` (the x half, then the y half; each
    frequency twice, for the interleaved pair rotation ``(a, b) -> (-b, a)``).

    Returns:
        ``(gh * gw, 2 * head_dim) float32``: ``[sin | cos]`` of the angles.
    """
    gh, gw = (int(v) for v in grid)
    if head_dim % 4:
        raise ValueError(f"PE's 2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32)[: head_dim // 4] / half))
    fx = ((torch.arange(gw, dtype=torch.float32) + 1)[:, None] * freqs).repeat_interleave(2, dim=-1)
    fy = ((torch.arange(gh, dtype=torch.float32) + 1)[:, None] * freqs).repeat_interleave(2, dim=-1)
    angles = torch.cat([fx[None, :, :].expand(gh, gw, half), fy[:, None, :].expand(gh, gw, half)], dim=-1)
    angles = angles.reshape(gh * gw, head_dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def pe_abs_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """PE's ``_sample_abs_posemb``: the CLS position kept, the ``G x G`` patch positions resized to ``grid``.

    Bilinear, ``align_corners=False``, no antialias; unchanged when ``grid == (G, G)``.

    Args:
        pos_embed: ``(1, 1 + G*G, C)`` (CLS first).
    Returns:
        ``(1, 1 + gh*gw, C)``.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1 + G*G, C), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - 1
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    gh, gw = (int(v) for v in grid)
    if (gh, gw) == (g, g):
        return pos_embed
    patch = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(gh, gw), mode="bilinear", align_corners=False)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


def _pe_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """PE-Spatial's last-block patch tokens (no final norm) and their grid."""
    tokens = model.patch_embed.proj(x)  # the convolution alone: any input size, floor grid
    grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    tokens = tokens + pe_abs_pos_embed(model.pos_embed, grid).to(tokens.dtype)
    tokens = model.norm_pre(tokens)
    head_dim = tokens.shape[-1] // model.blocks[0].attn.num_heads
    rope = pe_rope_table(grid, head_dim).to(tokens.device)
    for blk in model.blocks:
        tokens = blk(tokens, rope=rope)
    return tokens[:, model.num_prefix_tokens :], grid


@torch.no_grad()
def vfm_dense_features(
    model: nn.Module,
    kind: str,
    patch: int,
    image: torch.Tensor,
    *,
    max_side: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The VFM's dense map of one image at its token grid.

    Args:
        model: the timm model of a ``vfm`` backbone (``load_backbone("vfm:...").model``), eval mode.
        kind: its kind (``vfm_archs.vfm_arch(arch).kind``): ``radio`` | ``dinov2`` | ``dinov3`` | ``pe``.
        patch: its patch size (``Backbone.patch_size``).
        image: ``(3, H, W)`` RGB on the 0..255 scale, the original image (no EXIF rotation, as the
            reference reads it with ``Image.open(...).convert("RGB")``).
        max_side: optional cap on the image's longer side before the VFM's own resize (None:
            native resolution, the reference).
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (the reference:
            ``torch.float16`` on CUDA); None: the model's own dtype.
    Returns:
        ``(C, gh, gw) float32`` with ``(gh, gw) = vfm_token_grid(kind, (H', W'), patch)`` of the
        (capped) image size.
    """
    if kind not in VFM_KINDS:
        raise ValueError(f"VFM kind must be one of {VFM_KINDS}, got {kind!r}")
    param = next(model.parameters())
    x = vfm_input(image, kind, patch, max_side).to(device=param.device, dtype=param.dtype)
    ctx = torch.autocast(device_type=x.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with ctx:
        if kind == "pe":
            tokens, grid = _pe_features(model, x)
        else:
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
    if tokens.shape[1] != grid[0] * grid[1]:
        raise AssertionError(f"{tokens.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
    return tokens[0].float().transpose(0, 1).reshape(-1, *grid)
