"""Vision foundation models (VFMs): the ``vfm`` family of the backbone registry.

CorrCLIPv2 builds its patch correlation from one dense forward of a VFM over the whole image
(``CorrCLIPv2/vfms/factory.py`` ``VFM_REGISTRY``; ``../shared/docs/corrclipv2.md`` section 5). Each
row names the timm architecture ovseg builds, the official checkpoint file (looked up by this
name in the weights directory) and its ``kind``, which decides the preprocessing, the output
read and the checkpoint key conversion (:mod:`ovseg_core.features.vfm`,
:mod:`ovseg_core.backbones.vfm_weights`).

Why these timm architectures (timm 1.0.31; checked against the authors' loaders, see
``docs/reference-fidelity.md``):

- C-RADIOv3-L: ``naflexvit_large_patch16_radio_v3`` keeps RADIO's 128 x 128 position grid and
  its evaluation-time "CPE" rule (bilinear resize to a square of the longer side, top-left
  crop) at every input size. timm also ships ``vit_large_patch16_radio_v3``, a classic ViT whose
  position embedding is resampled once, at load time, to a fixed grid and then resized again by
  timm's own rule: it matches RADIO only at that one grid, so it is not used.
- DINOv2-L/14 with 4 registers: ``vit_large_patch14_reg4_dinov2`` at 518 px (the 37 x 37 grid of
  the checkpoint) with ``dynamic_img_size``: timm's bicubic antialiased size-based resampling is
  DINOv2's own rule for the register models (``interpolate_antialias=True, interpolate_offset=0``).
- DINOv3-L/16: ``vit_large_patch16_dinov3_qkvb`` (q and v biases loaded as stored, k bias fixed to
  0 as DINOv3's ``mask_k_bias``); RoPE as DINOv3 computes it, with the checkpoint's stored periods.
- PE-Spatial-L14-448: ``vit_pe_spatial_large_patch14_448`` for the weights and blocks only: at a
  token grid other than 32 x 32 timm rescales RoPE positions and resamples the absolute position
  embedding bicubically, PE does neither, so :mod:`ovseg_core.features.vfm` builds PE's tokens
  and RoPE table itself and runs the blocks.

Tiny configurations (``vfm:tiny_radiov3`` ...) use the same timm classes at width 64, 2 blocks,
4 heads, for tests; they are random unless a local checkpoint of their shape is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ovseg_core.features.vfm_preprocess import VFM_KINDS

__all__ = ["TINY_VFM_ARCHS", "VFM_ARCHS", "VFM_KINDS", "VFMArch", "vfm_arch"]

# Size overrides of the tiny test configurations (same classes and code paths).
_TINY_SIZE: Mapping[str, Any] = MappingProxyType(dict(embed_dim=64, depth=2, num_heads=4))


@dataclass(frozen=True)
class VFMArch:
    """One VFM architecture of the registry."""

    kind: str  # one of VFM_KINDS
    timm_name: str  # timm architecture built with random weights (num_classes=0)
    patch_size: int  # side of a square patch in pixels
    file: str | None = None  # official checkpoint file name in the weights directory (None: tiny)
    url: str | None = None  # download address of the official file
    page: str | None = None  # the model's page (licence, release notes)
    # extra timm keyword arguments (training grid, dynamic input size, tiny sizes)
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in VFM_KINDS:
            raise ValueError(f"VFMArch.kind must be one of {VFM_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "build_kwargs", MappingProxyType(dict(self.build_kwargs)))


VFM_ARCHS: Mapping[str, VFMArch] = MappingProxyType({
    # C-RADIOv3-L (CorrCLIPv2 default, ``vfm_type='radiov3'``): the torch.hub checkpoint the authors'
    # ``torch.hub.load('NVlabs/RADIO', 'radio_model', version='c-radio_v3-l')`` downloads.
    "radiov3_l": VFMArch(
        "radio", "naflexvit_large_patch16_radio_v3", 16, "c-radio-v3_l_half.pth.tar",
        "https://huggingface.co/nvidia/C-RADIOv3-L/resolve/main/c-radio-v3_l_half.pth.tar",
        "https://huggingface.co/nvidia/C-RADIOv3-L"),
    # DINOv2 ViT-L/14 with 4 registers (``dinov2_vitl14_reg``).
    "dinov2_l14_reg4": VFMArch(
        "dinov2", "vit_large_patch14_reg4_dinov2", 14, "dinov2_vitl14_reg4_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
        "https://github.com/facebookresearch/dinov2", dict(img_size=518, dynamic_img_size=True)),
    # DINOv3 ViT-L/16, LVD-1689M weights (``dinov3_vitl16``; Meta hands out download links on request).
    "dinov3_l16": VFMArch(
        "dinov3", "vit_large_patch16_dinov3_qkvb", 16, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
        "https://dl.fbaipublicfiles.com/dinov3/dinov3_vitl16/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
        "https://github.com/facebookresearch/dinov3"),
    # Perception Encoder, spatial variant, ViT-L/14 at 448 px (``PE-Spatial-L14-448``).
    "pe_spatial_l14_448": VFMArch(
        "pe", "vit_pe_spatial_large_patch14_448", 14, "PE-Spatial-L14-448.pt",
        "https://huggingface.co/facebook/PE-Spatial-L14-448/resolve/main/PE-Spatial-L14-448.pt",
        "https://huggingface.co/facebook/PE-Spatial-L14-448", dict(img_size=448, dynamic_img_size=True)),
})  # fmt: skip

TINY_VFM_ARCHS: Mapping[str, VFMArch] = MappingProxyType({
    "tiny_radiov3": VFMArch("radio", VFM_ARCHS["radiov3_l"].timm_name, 16, build_kwargs=_TINY_SIZE),
    "tiny_dinov2": VFMArch("dinov2", VFM_ARCHS["dinov2_l14_reg4"].timm_name, 14,
                           build_kwargs={**VFM_ARCHS["dinov2_l14_reg4"].build_kwargs, **_TINY_SIZE}),
    "tiny_dinov3": VFMArch("dinov3", VFM_ARCHS["dinov3_l16"].timm_name, 16, build_kwargs=_TINY_SIZE),
    "tiny_pe": VFMArch("pe", VFM_ARCHS["pe_spatial_l14_448"].timm_name, 14,
                       build_kwargs={**VFM_ARCHS["pe_spatial_l14_448"].build_kwargs, **_TINY_SIZE}),
})  # fmt: skip


def vfm_arch(arch: str) -> VFMArch:
    """The registry row of a ``vfm`` architecture (official or tiny).

    Raises:
        ValueError: unknown architecture; the message lists the valid ones.
    """
    row = VFM_ARCHS.get(arch) or TINY_VFM_ARCHS.get(arch)
    if row is None:
        raise ValueError(f"unknown VFM architecture {arch!r}; valid: {', '.join([*VFM_ARCHS, *TINY_VFM_ARCHS])}")
    return row
