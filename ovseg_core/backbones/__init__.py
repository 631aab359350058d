"""Backbone factory: one registry of CLIP, DINO, SAM and VFM backbones, weight loading, random init.

Names are ``family:arch[@weights]`` (:func:`parse_backbone`); :func:`load_backbone` returns a
:class:`Backbone` (model in eval mode with gradients off, tokenizer, identity, geometry).

Registered names and their official weight files (put them, under exactly these names, in the
weights directory: ``load_backbone(..., weights_dir=...)`` or the ``OVSEG_WEIGHTS`` environment
variable; :func:`official_weight_file` gives the same table programmatically):

- ``clip:ViT-B-16@openai``: ``ViT-B-16.pt`` (OpenAI TorchScript),
  https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt
- ``clip:ViT-B-16-quickgelu@metaclip_fullcc``: ``b16_fullcc2.5b.pt``,
  https://dl.fbaipublicfiles.com/MMPT/metaclip/b16_fullcc2.5b.pt
- ``clip:ViT-L-14@openai``: ``ViT-L-14.pt`` (OpenAI TorchScript),
  https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt
- ``clip:ViT-L-14-quickgelu@metaclip_fullcc``: ``l14_fullcc2.5b.pt``,
  https://dl.fbaipublicfiles.com/MMPT/metaclip/l14_fullcc2.5b.pt
- ``clip:ViT-H-14@laion2b_s32b_b79k``: ``CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_pytorch_model.bin``
  (or ``open_clip_model.safetensors`` in that sub-directory),
  https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
- ``clip:ViT-B-16@dfn2b`` (DFN2B-CLIP ViT-B/16, CorrCLIPv2's DMCE auxiliary CLIP; QuickGELU, 512-d):
  ``DFN2B-CLIP-ViT-B-16/open_clip_pytorch_model.bin`` (or ``open_clip_model.safetensors`` in that
  sub-directory), https://huggingface.co/apple/DFN2B-CLIP-ViT-B-16
- ``dino:vitb8``: ``dino_vitbase8_pretrain.pth``,
  https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth
- ``dino:vits8``: ``dino_deitsmall8_pretrain.pth``,
  https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth
- ``dino:vits16``: ``dino_deitsmall16_pretrain.pth``,
  https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth
- ``dino:vitb16``: ``dino_vitbase16_pretrain.pth``,
  https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth
- ``sam:vit_b``: ``sam_vit_b_01ec64.pth``, https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth
- ``sam:vit_l``: ``sam_vit_l_0b3195.pth``, https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth
- ``sam:vit_h``: ``sam_vit_h_4b8939.pth``, https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth
- ``sam2:hiera_t`` / ``hiera_s`` / ``hiera_b+`` / ``hiera_l`` (SAM 2, the sam2 package, ``sam2==1.1.0``):
  ``sam2_hiera_tiny.pt`` / ``sam2_hiera_small.pt`` / ``sam2_hiera_base_plus.pt`` /
  ``sam2_hiera_large.pt``, https://dl.fbaipublicfiles.com/segment_anything_2/072824/FILE (the CorrCLIP
  reference uses ``sam2_hiera_large.pt``); with ``@sam2.1`` the SAM 2.1 files ``sam2.1_hiera_tiny.pt``
  ... ``sam2.1_hiera_large.pt``, https://dl.fbaipublicfiles.com/segment_anything_2/092824/FILE.

Short forms: ``clip:ARCH`` means the default tag above, ``dino:vitb8`` / ``sam:vit_b`` /
``sam2:hiera_l`` / ``vfm:radiov3_l`` the official release (also spelled ``@official``).

Tiny test configurations (real classes, same code paths, seconds on a CPU; see
:mod:`ovseg_core.backbones.builders`): ``clip:tiny``, ``dino:tiny8``, ``dino:tiny16``, ``sam:tiny``, ``sam2:tiny``,
``vfm:tiny_radiov3``, ``vfm:tiny_dinov2``, ``vfm:tiny_dinov3``, ``vfm:tiny_pe``.
They are random (``@random:SEED`` picks the seed) or load a local checkpoint of their shape.

Weights suffixes, valid on every name:

- ``@random`` / ``@random:SEED``: the real architecture with seeded random weights (seed 0 by
  default); ``identity["random"]`` is true. A random ``clip:ViT-B-16`` uses the architecture's
  own GELU; pretrained tags trained with QuickGELU (``openai``) get QuickGELU.
- ``@/path/to/file`` (or ``weights=`` with a tag name): a local checkpoint. Accepted formats:
  OpenAI TorchScript ``.pt`` (read with ``torch.jit.load(...).state_dict()``, keys converted as
  open_clip does), pickled state dicts read with ``torch.load(weights_only=True)`` (plain, or
  under ``state_dict`` / ``teacher`` / ``model``, with ``module.`` / DINO ``backbone.`` prefixes),
  and ``.safetensors``.
- CLIP names accept any open_clip pretrained tag of their architecture.

Downloads are opt-in (``allow_download=True``) and fail fast with ``ConnectionError`` when the
network is closed. Identities use a cheap partial hash of the file (size plus first and last
MiB), not a full sha256: hashing multi-GB files on every load is too slow.
"""

from .factory import Backbone, load_backbone, num_blocks, official_weight_file, patch_size, weights_identity
from .spec import BackboneSpec, list_backbones, parse_backbone
from .vfm_archs import VFM_ARCHS
from .weights import WEIGHTS_ENV

__all__ = [
    "VFM_ARCHS",
    "WEIGHTS_ENV",
    "Backbone",
    "BackboneSpec",
    "list_backbones",
    "load_backbone",
    "num_blocks",
    "official_weight_file",
    "parse_backbone",
    "patch_size",
    "weights_identity",
]
