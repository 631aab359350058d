"""The backbone factory: a name in, a ready model (eval mode, frozen) and its identity out."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import clip_ops
from .builders import build_model, build_tokenizer
from .sam2_builder import sam2_geometry
from .spec import BackboneSpec, parse_backbone
from .vfm_archs import vfm_arch
from .weights import (
    FINGERPRINT_SCOPE,
    file_fingerprint,
    is_torchscript_archive,
    load_into,
    official_file,
    resolve_weight_file,
)

__all__ = ["Backbone", "load_backbone", "num_blocks", "official_weight_file", "patch_size", "weights_identity"]

_DTYPES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Backbone:
    """A loaded backbone (see :func:`load_backbone`)."""

    # The parsed name.
    spec: BackboneSpec
    # clip: open_clip CLIP (.visual is a VisionTransformer, has encode_text); dino: timm
    # VisionTransformer (num_classes=0, dynamic_img_size=True); sam: segment_anything Sam;
    # sam2: sam2.modeling.sam2_base.SAM2Base (1024 px input); vfm: the timm model of
    # vfm_archs.VFM_ARCHS (dense features: ovseg_core.features.vfm.vfm_dense_features).
    model: nn.Module
    # clip: open_clip tokenizer, list[str] -> (N, 77) int64; None for the other families.
    tokenizer: Callable[..., torch.Tensor] | None
    # JSON-able identity of the weights, hashed into stage keys and written into run records
    # (see weights_identity); device and dtype are not part of it.
    identity: dict[str, Any]
    # Side of a square patch in pixels (16 for ViT-B/16 and SAM, 8 for DINO ViT-B/8; SAM 2: the
    # stride of the image embedding the mask decoder reads, 16).
    patch_size: int
    # Number of transformer blocks of the (vision / image-encoder) tower.
    num_blocks: int


def official_weight_file(name: str) -> tuple[str, str]:
    """(official file name, where to download it) of a named pretrained backbone.

    The file name is relative to the weights directory (``weights_dir`` / ``OVSEG_WEIGHTS``).

    Raises:
        ValueError: unknown name, or random / tiny / local-file weights (no official file).
    """
    return official_file(parse_backbone(name))


def _check_device_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())} (torch dtypes), got {dtype!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype torch.float16 is not supported on CPU; use torch.bfloat16 or torch.float32")
    return dev


def _identity(spec: BackboneSpec, path: Path | None) -> dict[str, Any]:
    name = f"{spec.family}:{spec.arch}@{path.name}" if spec.is_local_file and path is not None else spec.name
    return {
        "name": name,
        "family": spec.family,
        "arch": spec.arch,
        "weights": "file" if spec.is_local_file else spec.weights,
        "random": spec.is_random,
        "seed": spec.seed if spec.is_random else None,
        "file": path.name if path is not None else None,
        "sha256": file_fingerprint(path) if path is not None else None,
        "sha256_scope": FINGERPRINT_SCOPE if path is not None else None,
    }


def weights_identity(
    name: str, *, weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The identity :func:`load_backbone` would record, without building the model.

    JSON-able: ``name`` (canonical; a local file appears by base name), ``family``, ``arch``,
    ``weights`` (tag, ``official``, ``random`` or ``file``), ``random``, ``seed`` (random only),
    ``file`` (base name), ``sha256`` (cheap partial hash, see ``sha256_scope``). Location
    independent: the same file in another directory gives the same identity.

    Raises:
        ValueError / FileNotFoundError: as :func:`load_backbone` (no download is attempted).
    """
    spec = parse_backbone(name)
    return _identity(spec, resolve_weight_file(spec, weights=weights, weights_dir=weights_dir))


def _geometry(spec: BackboneSpec, model: nn.Module) -> tuple[int, int]:
    """(patch_size, num_blocks) of the vision tower / image encoder."""
    if spec.family == "clip":
        return clip_ops.patch_size(model.visual), clip_ops.num_blocks(model.visual)
    if spec.family == "dino":
        return int(model.patch_embed.patch_size[0]), len(model.blocks)
    if spec.family == "sam2":
        return int(model.backbone_stride), len(model.image_encoder.trunk.blocks)
    if spec.family == "vfm":
        return vfm_arch(spec.arch).patch_size, len(model.blocks)
    encoder = model.image_encoder
    return int(encoder.patch_embed.proj.kernel_size[0]), len(encoder.blocks)


@lru_cache(maxsize=None)
def _arch_geometry(family: str, arch: str) -> tuple[int, int]:
    spec = BackboneSpec(family=family, arch=arch, weights="random")
    if family == "sam2":  # SAM 2 cannot be built on the meta device (Hiera calls .item() in __init__)
        return sam2_geometry(spec)
    return _geometry(spec, build_model(spec, meta=True))


def patch_size(name: str) -> int:
    """Patch size in pixels of a backbone's vision tower, without loading weights."""
    spec = parse_backbone(name)
    return _arch_geometry(spec.family, spec.arch)[0]


def num_blocks(name: str) -> int:
    """Number of transformer blocks of a backbone's vision tower, without loading weights."""
    spec = parse_backbone(name)
    return _arch_geometry(spec.family, spec.arch)[1]


def load_backbone(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> Backbone:
    """Build a backbone by name and load its weights.

    Args:
        name: ``family:arch[@weights]``, see :func:`~ovseg_core.backbones.list_backbones`.
        device: target device; CUDA must be available when asked for.
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, or ``torch.float16`` (CUDA only).
        weights: explicit checkpoint file for a named pretrained tag (``clip:ViT-B-16@openai``
            read from this file); not allowed with random or ``@/path`` names.
        weights_dir: directory holding the official files under their official names
            (:func:`official_weight_file`); default the ``OVSEG_WEIGHTS`` environment variable.
        allow_download: download a missing official file into ``weights_dir`` (fails fast with
            ``ConnectionError`` when the network is closed).
    Returns:
        a :class:`Backbone` whose model is in eval mode with ``requires_grad`` off.
    Raises:
        ValueError: unknown name, bad device/dtype, unreadable or wrong-architecture checkpoint.
        FileNotFoundError: missing weight file (names the file, the directory and the URL).
        ConnectionError: download requested but the server is unreachable.
    """
    spec = parse_backbone(name)
    dev = _check_device_dtype(device, dtype)
    path = resolve_weight_file(spec, weights=weights, weights_dir=weights_dir, allow_download=allow_download)
    # OpenAI's TorchScript releases were trained with QuickGELU (open_clip builds them so too);
    # otherwise the architecture and tag decide (builders.clip_uses_quick_gelu).
    openai_file = spec.family == "clip" and path is not None and is_torchscript_archive(path)
    model = build_model(spec, quick_gelu=True if openai_file else None)
    if path is not None:
        load_into(model, spec, path)
    model = model.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    patch, blocks = _geometry(spec, model)
    return Backbone(
        spec=spec,
        model=model,
        tokenizer=build_tokenizer(spec),
        identity=_identity(spec, path),
        patch_size=patch,
        num_blocks=blocks,
    )
