"""DINO input normalisation and the last-block q + k features CorrCLIP uses for its similarity S.

CorrCLIP (methods.md §2.2): the feature of a DINO patch token is q + k of the last block's
attention (all heads concatenated in channel order, CLS/prefix tokens dropped), L2-normalised;
S = F F^T on the DINO grid (crop / patch, 42 x 42 for a 336 crop with ViT-B/8).

The q/k are read with a forward hook on the last block's ``attn.qkv`` projection that exists only
for the duration of one call (removed in ``finally``), so repeated calls never accumulate hooks.

Known deviation: at crop sizes other than the model's ``img_size`` the positional embedding is
resampled by timm (``dynamic_img_size=True``: bicubic to the target size), whereas the original
DINO code interpolates with ``scale_factor=(g + 0.1) / G``; the two differ slightly numerically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.features.clip import _normalize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "dino_grid", "dino_qk_features", "normalize_imagenet"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of the ImageNet normalisation, on the 0..1 scale."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of the ImageNet normalisation, on the 0..1 scale."""


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation (DINO input): ``(images / 255 - IMAGENET_MEAN) / IMAGENET_STD``.

    Args:
        images: ``(B, 3, H, W)`` (or ``(3, H, W)``) RGB, ``uint8`` or floating point on the
            0..255 scale (not 0..1).
    Returns:
        ``float32`` tensor of the same shape.
    """
    return _normalize(images, IMAGENET_MEAN, IMAGENET_STD, 255.0)


def _patch_size(model: nn.Module) -> tuple[int, int]:
    try:
        ps = model.patch_embed.patch_size
    except AttributeError as e:
        raise TypeError(f"expected a timm VisionTransformer with .patch_embed, got {type(model).__name__}") from e
    return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))


def dino_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Token grid ``(gh, gw)`` of a ``height x width`` crop (``(42, 42)`` for 336 with patch 8)."""
    ph, pw = _patch_size(model)
    return height // ph, width // pw


@torch.no_grad()
def dino_qk_features(model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Last block's q + k per patch token, L2-normalised, on the DINO grid.

    Args:
        model: a timm ``VisionTransformer`` (e.g. DINO ViT-B/8) whose last block has the
            standard fused ``attn.qkv`` projection. Crops of another size than the model's
            ``img_size`` need a model built with ``dynamic_img_size=True`` (timm then resamples
            the positional embedding). Models with q/k normalisation (``qk_norm``) get the raw
            projections, before that normalisation.
        crops: ``(B, 3, H, W)`` ImageNet-normalised crops (see :func:`normalize_imagenet`);
            H and W multiples of the patch size.
    Returns:
        ``(B, gh, gw, C) float32`` with ``(gh, gw) = (H, W) // patch`` and ``C`` the attention
        width (``heads * head_dim``); every token vector has unit L2 norm.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (B, 3, H, W), got shape {tuple(crops.shape)}")
    try:
        last = model.blocks[-1]
        qkv_proj: nn.Module = last.attn.qkv
    except (AttributeError, IndexError, TypeError) as e:
        raise TypeError(
            f"expected a timm VisionTransformer whose last block has attn.qkv, got {type(model).__name__}"
        ) from e
    height, width = crops.shape[-2:]
    ph, pw = _patch_size(model)
    if height % ph or width % pw:
        raise ValueError(f"crop {height}x{width} is not a multiple of the DINO patch size {ph}x{pw}; pad it first")
    native = tuple(int(s) for s in model.patch_embed.img_size)
    if not getattr(model, "dynamic_img_size", False) and (height, width) != native:
        raise ValueError(
            f"crop {height}x{width} differs from the model's img_size {native[0]}x{native[1]}; "
            "build the timm model with dynamic_img_size=True"
        )
    gh, gw = height // ph, width // pw

    captured: list[torch.Tensor] = []

    def _capture(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(output)

    handle = qkv_proj.register_forward_hook(_capture)
    try:
        model.forward_features(crops.to(next(model.parameters()).dtype))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise AssertionError(f"last block qkv ran {len(captured)} times in one forward pass")

    out = captured[0]  # (B, T, 3 * A): [q heads..., k heads..., v heads...]
    attn_dim = out.shape[-1] // 3
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    q = out[:, prefix:, :attn_dim]
    k = out[:, prefix:, attn_dim : 2 * attn_dim]
    if q.shape[1] != gh * gw:
        raise AssertionError(f"{q.shape[1]} patch tokens for a {gh}x{gw} grid")
    feats = F.normalize((q + k).float(), dim=-1)
    return feats.reshape(crops.shape[0], gh, gw, attn_dim)
