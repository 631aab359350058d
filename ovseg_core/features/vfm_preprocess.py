"""VFM input: each vision foundation model's own side rounding and normalisation.

CorrCLIPv2 runs its VFM once per image on the raw file at native resolution
(``CorrCLIPv2/vfms/factory.py`` ``VFMExtractor.extract_dense``; facts section 5). Per kind:

- ``radio`` (C-RADIOv3): pixels / 255, bilinearly resized (``align_corners=False``, no antialias)
  to ``get_nearest_supported_resolution``: each side ``max(round(side / 16) * 16, 16)`` with
  Python's ``round`` (halves go to the even multiple: 24 -> 32, 40 -> 32); then RADIO's input
  conditioner ``(x - OpenAI CLIP mean) / OpenAI CLIP std`` (inside RADIO's forward, after the
  resize). The resize is applied even when the size does not change (an identity).
- ``dinov2`` / ``dinov3``: ``ToTensor`` (/ 255), ImageNet ``Normalize``, then, only if a side is
  not already a multiple of the patch (14 / 16), a bilinear resize (``align_corners=False``, no
  antialias) of the normalised tensor to ``max(round(side / p) * p, p)`` (Python ``round``).
- ``pe`` (PE-Spatial): PE's transform without its square resize: ``ToTensor``, ``Normalize(0.5,
  0.5)``, native size; the patch convolution drops the remainder, grid ``floor(side / 14)``.

The optional size cap (``max_side``, off by default as in the reference) first shrinks an image
whose longer side exceeds it, keeping the aspect ratio (sides ``int(side * scale + 0.5)``,
bilinear with antialias, on the 0..1 scale), before the VFM's own steps above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ovseg_core.features.clip import _normalize
from ovseg_core.features.dino import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "VFM_KINDS",
    "PE_MEAN",
    "PE_STD",
    "RADIO_MEAN",
    "RADIO_STD",
    "capped_size",
    "nearest_multiple",
    "vfm_input",
    "vfm_input_size",
    "vfm_token_grid",
]

VFM_KINDS: tuple[str, ...] = ("radio", "dinov2", "dinov3", "pe")
"""VFM kinds: each decides the preprocessing here, the output read (``features.vfm``) and the key conversion."""

RADIO_MEAN: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)  # type: ignore[assignment]
"""RADIO's default input conditioner mean (OpenAI CLIP's, 0..1 scale); the checkpoint's is checked equal."""
RADIO_STD: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)  # type: ignore[assignment]
"""RADIO's default input conditioner std (OpenAI CLIP's, 0..1 scale)."""
PE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""PE's ``Normalize`` mean (0..1 scale)."""
PE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""PE's ``Normalize`` std (0..1 scale)."""

_NORMALISATION = {
    "radio": (RADIO_MEAN, RADIO_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov3": (IMAGENET_MEAN, IMAGENET_STD),
    "pe": (PE_MEAN, PE_STD),
}


def _check_kind(kind: str) -> None:
    if kind not in VFM_KINDS:
        raise ValueError(f"VFM kind must be one of {VFM_KINDS}, got {kind!r}")


def _check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image size must be a pair (H, W) of positive ints, got {hw!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"image size must be a pair (H, W) of positive ints, got {hw!r}")
    return h, w


def nearest_multiple(side: int, step: int) -> int:
    """``max(round(side / step) * step, step)`` with Python's ``round`` (ties to the even multiple).

    This is RADIO's ``get_nearest_supported_resolution`` per side and the authors' DINO rounding.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return max(int(round(side / step)) * step, step)


def vfm_input_size(kind: str, hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Size ``(H', W')`` of the tensor the VFM receives for an image of size ``hw``.

    ``radio`` / ``dinov2`` / ``dinov3``: each side :func:`nearest_multiple` of the patch;
    ``pe``: unchanged (not a multiple in general; see :func:`vfm_token_grid`).
    """
    _check_kind(kind)
    h, w = _check_hw(hw)
    if kind == "pe":
        return h, w
    return nearest_multiple(h, patch), nearest_multiple(w, patch)


def vfm_token_grid(kind: str, hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Token grid ``(gh, gw)`` of the dense map for an image of size ``hw`` (``floor`` of the input size / patch)."""
    h, w = vfm_input_size(kind, hw, patch)
    if h < patch or w < patch:
        raise ValueError(f"image {hw[0]}x{hw[1]} is smaller than one {patch}x{patch} patch of the {kind} VFM")
    return h // patch, w // patch


def capped_size(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``hw`` shrunk so that its longer side is at most ``max_side`` (None: unchanged).

    ``scale = max_side / max(H, W)`` when the longer side exceeds the cap; sides become
    ``max(int(side * scale + 0.5), 1)``.
    """
    h, w = _check_hw(hw)
    if max_side is None:
        return h, w
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be None or an int >= 1, got {max_side!r}")
    if max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def vfm_input(image: torch.Tensor, kind: str, patch: int, max_side: int | None = None) -> torch.Tensor:
    """The VFM's input tensor made from an RGB image, as the authors' ``extract_dense`` makes it.

    Args:
        image: ``(3, H, W)`` RGB on the 0..255 scale (``uint8`` or float), the original image.
        kind: ``radio`` | ``dinov2`` | ``dinov3`` | ``pe``.
        patch: the VFM's patch size.
        max_side: optional cap on the longer side (:func:`capped_size`); None = native size (reference).
    Returns:
        ``(1, 3, H', W') float32`` with ``(H', W') = vfm_input_size(kind, capped size, patch)``.
    """
    _check_kind(kind)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    x = image[None].to(torch.float32) / 255.0
    size = capped_size(tuple(x.shape[-2:]), max_side)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    target = vfm_input_size(kind, size, patch)
    vfm_token_grid(kind, size, patch)  # at least one patch
    mean, std = _NORMALISATION[kind]
    if kind == "radio":
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        return _normalize(x, mean, std, 1.0)
    x = _normalize(x, mean, std, 1.0)
    if target != size:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x
