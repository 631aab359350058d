"""DINO input normalisation and the last-block q + k features CorrCLIP uses for its similarity S.

CorrCLIP (methods.md §2.2): the feature of a DINO patch token is q + k of the last block's
attention (all heads concatenated in channel order, CLS/prefix tokens dropped), L2-normalised;
S = F F^T on the DINO grid (crop / patch, 42 x 42 for a 336 crop with ViT-B/8).

The q/k are read with a forward hook on the last block's ``attn.qkv`` projection that exists only
for the duration of one call (removed in ``finally``), so repeated calls never accumulate hooks.

Positional embeddings at crop sizes other than the training grid (``pos_interpolation``):

- ``"dino"`` (default, the reference): DINO's own ``interpolate_pos_encoding``
  (facebookresearch/dino ``vision_transformer.py``): the patch embeddings of the square
  ``G x G`` training grid are resampled bicubically with ``scale_factor = ((gh + 0.1) / G,
  (gw + 0.1) / G)`` (no antialias, ``align_corners=False``), unchanged when ``(gh, gw) == (G, G)``.
  Tokens are built here (patch embedding, CLS, that embedding) and fed to the model's blocks;
  the model is not modified.
- ``"timm"``: timm's ``dynamic_img_size`` resampling inside ``forward_features`` (bicubic to an
  explicit size with antialias), numerically different; the behaviour of earlier ovseg versions.

DINO input as the CorrCLIP reference builds it: :func:`dino_input_from_clip` converts the padded
CLIP-normalised crops (see ``ovseg_core.corrclip.config.CorrCLIPConfig.padding``).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.features.clip import _normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "POS_INTERPOLATIONS",
    "dino_grid",
    "dino_input_from_clip",
    "dino_pos_embed",
    "dino_qk_features",
    "normalize_imagenet",
]

# Positional-embedding resampling of dino_qk_features: "dino" = DINO's interpolate_pos_encoding
# (reference), "timm" = timm's dynamic_img_size resampling.
POS_INTERPOLATIONS: tuple[str, ...] = ("dino", "timm")

# DINO's interpolate_pos_encoding adds this to the target grid before dividing by the source grid
# ("to avoid floating point error", facebookresearch/dino issue 8).
_DINO_SCALE_OFFSET = 0.1

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


OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""RGB mean the CorrCLIP reference un-normalises CLIP crops with (0..1 scale; ``CLIP_MEAN / 255`` to ~1e-6)."""

OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""RGB std the CorrCLIP reference un-normalises CLIP crops with (0..1 scale; ``CLIP_STD / 255`` to ~1e-5)."""


def dino_input_from_clip(crops: torch.Tensor) -> torch.Tensor:
    """DINO input made from CLIP-normalised crops, as the CorrCLIP reference makes it.

    The reference pads the CLIP-normalised crop with 0, then per crop
    ``Normalize(IMAGENET)(UnNormalize(OPENAI_CLIP)(crop))``: ``x * OPENAI_CLIP_STD +
    OPENAI_CLIP_MEAN`` (back to the 0..1 scale) then ``(. - IMAGENET_MEAN) / IMAGENET_STD``.
    Padded pixels therefore carry the CLIP mean colour in DINO's input (about
    ``(-0.016, 0.008, 0.023)``), not 0. Real pixels equal :func:`normalize_imagenet` of the image up
    to ~1e-5 (the un-normalisation constants are OpenAI's, the normalisation used mmseg's
    ``CLIP_MEAN`` / ``CLIP_STD``, equal to 6 digits).

    Args:
        crops: ``(B, 3, H, W)`` CLIP-normalised (``normalize_clip``), padded crops.
    Returns:
        ``(B, 3, H, W) float32`` ImageNet-normalised DINO input.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (B, 3, H, W), got shape {tuple(crops.shape)}")
    if not crops.is_floating_point():
        raise ValueError(f"crops must be CLIP-normalised floats, got dtype {crops.dtype}")

    def channels(values: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=crops.device).reshape(1, 3, 1, 1)

    rgb01 = crops.float() * channels(OPENAI_CLIP_STD) + channels(OPENAI_CLIP_MEAN)
    return (rgb01 - channels(IMAGENET_MEAN)) / channels(IMAGENET_STD)


def dino_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` of a ``(1, 1 + G*G, C)`` embedding to a ``(gh, gw)`` grid.

    The class embedding is kept; the ``G x G`` patch embeddings are resampled with
    ``F.interpolate(scale_factor=((gh + 0.1) / G, (gw + 0.1) / G), mode="bicubic")`` (the scale
    factor, not the size, defines the sampling grid; no antialias), computed in float32 and
    cast back. Returned unchanged when ``(gh, gw) == (G, G)``.

    Returns:
        ``(1, 1 + gh*gw, C)`` in the dtype of ``pos_embed``.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1 + G*G, C), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid; use pos_interpolation='timm'")
    gh, gw = (int(v) for v in grid)
    if (gh, gw) == (g, g):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    scale = ((gh + _DINO_SCALE_OFFSET) / g, (gw + _DINO_SCALE_OFFSET) / g)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False)
    if tuple(patch.shape[-2:]) != (gh, gw):
        raise AssertionError(f"DINO pos-embed resampling gave {tuple(patch.shape[-2:])}, wanted {(gh, gw)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


def _dino_tokens(model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Block-1 input of a timm ViT with DINO's positional-embedding interpolation: ``(B, 1 + N, C)``."""
    if getattr(model, "cls_token", None) is None or getattr(model, "reg_token", None) is not None \
            or getattr(model, "no_embed_class", False) or getattr(model, "pos_embed", None) is None:
        raise ValueError(
            "pos_interpolation='dino' needs a DINO-style ViT (a CLS token with its own position, no register "
            "tokens); use pos_interpolation='timm' for this model"
        )
    patch_embed = model.patch_embed
    x = patch_embed.proj(crops)  # (B, C, gh, gw): the conv alone, so any crop size is accepted
    gh, gw = x.shape[-2:]
    x = patch_embed.norm(x.flatten(2).transpose(1, 2))
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = x + dino_pos_embed(model.pos_embed, (gh, gw)).to(x.dtype)
    return model.norm_pre(model.patch_drop(model.pos_drop(x)))


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
def dino_qk_features(model: nn.Module, crops: torch.Tensor, pos_interpolation: str = "dino") -> torch.Tensor:
    """Last block's q + k per patch token, L2-normalised, on the DINO grid.

    Args:
        model: a timm ``VisionTransformer`` (e.g. DINO ViT-B/8) whose last block has the
            standard fused ``attn.qkv`` projection. Models with q/k normalisation (``qk_norm``)
            get the raw projections, before that normalisation.
        crops: ``(B, 3, H, W)`` DINO input (:func:`normalize_imagenet`, or
            :func:`dino_input_from_clip` as the CorrCLIP reference); H and W multiples of the
            patch size.
        pos_interpolation: ``"dino"`` (default): tokens are built with DINO's own
            positional-embedding interpolation (:func:`dino_pos_embed`) and run through
            ``model.blocks`` (needs a CLS token and no register tokens; any crop size).
            ``"timm"``: ``model.forward_features``; crops of another size than the model's
            ``img_size`` then need ``dynamic_img_size=True`` (timm resamples).
    Returns:
        ``(B, gh, gw, C) float32`` with ``(gh, gw) = (H, W) // patch`` and ``C`` the attention
        width (``heads * head_dim``); every token vector has unit L2 norm.
    """
    if pos_interpolation not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {pos_interpolation!r}")
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
    if pos_interpolation == "timm" and not getattr(model, "dynamic_img_size", False) and (height, width) != native:
        raise ValueError(
            f"crop {height}x{width} differs from the model's img_size {native[0]}x{native[1]}; "
            "build the timm model with dynamic_img_size=True (or use pos_interpolation='dino')"
        )
    gh, gw = height // ph, width // pw
    crops = crops.to(next(model.parameters()).dtype)

    captured: list[torch.Tensor] = []
    caller = threading.get_ident()

    def _capture(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # a model shared by threads (several local workers of one process) runs every thread's forward through the
        # hook: keep this call's own output only (hooks run in the thread that called the forward)
        if threading.get_ident() == caller:
            captured.append(output)

    handle = qkv_proj.register_forward_hook(_capture)
    try:
        if pos_interpolation == "dino":
            model.blocks(_dino_tokens(model, crops))
        else:
            model.forward_features(crops)
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
