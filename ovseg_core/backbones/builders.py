"""Architecture builders: the real library classes, randomly initialised from a seed.

Weights are loaded separately (:mod:`ovseg_core.backbones.weights`). Every builder runs inside
``torch.random.fork_rng`` seeded with the spec's seed, so random builds are deterministic and
the caller's global RNG state is left untouched.

Tiny configurations use the same classes and code paths as the real ones:

- ``clip:tiny``: open_clip ``CLIP`` with a 12-block ViT/16 vision tower (width 64, 4 heads,
  224 px training grid, so the ViT-B block indices of both methods apply), QuickGELU, embed
  dim 32, and a 2-block text tower of context length 77 over the real BPE vocabulary (49408).
- ``dino:tiny8`` / ``dino:tiny16``: timm ``VisionTransformer`` (patch 8 / 16, width 64, 2 blocks,
  4 heads, ``num_classes=0``, ``dynamic_img_size=True``).
- ``sam:tiny``: segment_anything ``Sam`` with an ``ImageEncoderViT`` at the real 1024 px input
  (patch 16, width 32, 2 blocks with the second global, relative positions, window 14, 32 output
  channels), a 32-dim prompt encoder and mask decoder.
- ``sam2:tiny``: the sam2 package's ``SAM2Base`` from ``sam2_hiera_t.yaml`` shrunk
  (:mod:`ovseg_core.backbones.sam2_builder`).
- ``vfm:tiny_radiov3`` / ``tiny_dinov2`` / ``tiny_dinov3`` / ``tiny_pe``: the timm classes of the
  official VFMs (:mod:`ovseg_core.backbones.vfm_archs`) at width 64, 2 blocks, 4 heads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import open_clip
import timm
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from .sam2_builder import build_sam2_model
from .spec import DINO_ARCHS, BackboneSpec
from .vfm_archs import vfm_arch

__all__ = ["build_model", "build_tokenizer", "clip_uses_quick_gelu"]

# Tiny CLIP (see module docstring).
_TINY_CLIP_EMBED_DIM = 32
_TINY_CLIP_VISION = dict(image_size=224, patch_size=16, width=64, layers=12, head_width=16, mlp_ratio=4.0)
_TINY_CLIP_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
# The BPE tokenizer of the real ViT-B/16 (context length 77) serves the tiny CLIP too.
_TINY_CLIP_TOKENIZER_ARCH = "ViT-B-16"

# Tiny DINO: timm base architecture per tiny name, and the size overrides.
_TINY_DINO_BASE = {"tiny8": "vit_small_patch8_224.dino", "tiny16": "vit_small_patch16_224.dino"}
_TINY_DINO_SIZE = dict(embed_dim=64, depth=2, num_heads=4)

# Tiny SAM. The image size must stay 1024 for SamAutomaticMaskGenerator.
_SAM_IMAGE_SIZE = 1024
_SAM_PATCH_SIZE = 16
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)
_TINY_SAM_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14, out_chans=32)
_TINY_SAM_DECODER = dict(transformer_depth=2, mlp_dim=64, num_heads=2, iou_head_hidden_dim=32, mask_in_chans=8)


def _tiny_clip() -> CLIP:
    return CLIP(
        embed_dim=_TINY_CLIP_EMBED_DIM,
        vision_cfg=CLIPVisionCfg(**_TINY_CLIP_VISION),
        text_cfg=CLIPTextCfg(**_TINY_CLIP_TEXT),
        quick_gelu=True,
    )


def _tiny_sam() -> Sam:
    enc, dec = _TINY_SAM_ENCODER, _TINY_SAM_DECODER
    grid = _SAM_IMAGE_SIZE // _SAM_PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=_SAM_IMAGE_SIZE,
            patch_size=_SAM_PATCH_SIZE,
            embed_dim=enc["embed_dim"],
            depth=enc["depth"],
            num_heads=enc["num_heads"],
            mlp_ratio=4,
            out_chans=enc["out_chans"],
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=enc["global_attn_indexes"],
            window_size=enc["window_size"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=enc["out_chans"],
            image_embedding_size=(grid, grid),
            input_image_size=(_SAM_IMAGE_SIZE, _SAM_IMAGE_SIZE),
            mask_in_chans=dec["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=dec["transformer_depth"],
                embedding_dim=enc["out_chans"],
                mlp_dim=dec["mlp_dim"],
                num_heads=dec["num_heads"],
            ),
            transformer_dim=enc["out_chans"],
            iou_head_depth=3,
            iou_head_hidden_dim=dec["iou_head_hidden_dim"],
        ),
        pixel_mean=list(_SAM_PIXEL_MEAN),
        pixel_std=list(_SAM_PIXEL_STD),
    )


def clip_uses_quick_gelu(spec: BackboneSpec) -> bool:
    """Whether the CLIP of ``spec`` is built with QuickGELU.

    True for architectures configured with it (``*-quickgelu``, the tiny CLIP) and for pretrained
    tags trained with it (e.g. ``ViT-B-16@openai``), as the original OpenAI code builds them;
    open_clip itself only warns about that mismatch. Random and local-file weights use the
    architecture's own setting (the factory also switches it on for OpenAI TorchScript files).
    """
    if spec.is_tiny:
        return True
    arch_cfg = open_clip.get_model_config(spec.arch) or {}
    if arch_cfg.get("quick_gelu", False):
        return True
    if spec.is_random or spec.is_local_file:
        return False
    return bool(open_clip.get_pretrained_cfg(spec.arch, spec.weights).get("quick_gelu", False))


def _build_clip(spec: BackboneSpec, quick_gelu: bool, device: torch.device) -> CLIP:
    if spec.is_tiny:
        return _tiny_clip()
    model = open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=quick_gelu, device=device)
    if not isinstance(model, CLIP):
        raise TypeError(f"open_clip built {type(model).__name__} for {spec.arch}, expected CLIP")
    return model


def _build_dino(spec: BackboneSpec) -> nn.Module:
    if spec.is_tiny:
        timm_name, size = _TINY_DINO_BASE[spec.arch], _TINY_DINO_SIZE
    else:
        timm_name, size = DINO_ARCHS[spec.arch][0], {}
    return timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **size)


def _build_vfm(spec: BackboneSpec) -> nn.Module:
    arch = vfm_arch(spec.arch)
    return timm.create_model(arch.timm_name, pretrained=False, num_classes=0, **arch.build_kwargs)


def _build_sam(spec: BackboneSpec) -> Sam:
    if spec.is_tiny:
        return _tiny_sam()
    return sam_model_registry[spec.arch](checkpoint=None)


def build_model(spec: BackboneSpec, *, quick_gelu: bool | None = None, meta: bool = False) -> nn.Module:
    """Build the architecture of ``spec`` with random weights drawn from ``spec.seed``.

    Args:
        quick_gelu: CLIP only; None decides with :func:`clip_uses_quick_gelu`.
        meta: build on the meta device (no storage, no initialisation), to read the structure.
    Returns:
        a float32 CPU (or meta) module in eval mode; the global RNG state is not changed.
    """
    device = torch.device("meta" if meta else "cpu")
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(spec.seed)
        if spec.family == "clip":
            model = _build_clip(spec, clip_uses_quick_gelu(spec) if quick_gelu is None else quick_gelu, device)
        elif spec.family == "dino":
            model = _build_dino(spec)
        elif spec.family == "sam2":
            model = build_sam2_model(spec)
        elif spec.family == "vfm":
            model = _build_vfm(spec)
        else:
            model = _build_sam(spec)
    return model.eval()


def build_tokenizer(spec: BackboneSpec) -> Callable[..., torch.Tensor] | None:
    """open_clip tokenizer of a CLIP spec (``list[str] -> (N, 77) int64``); None for other families."""
    if spec.family != "clip":
        return None
    return open_clip.get_tokenizer(_TINY_CLIP_TOKENIZER_ARCH if spec.is_tiny else spec.arch)
