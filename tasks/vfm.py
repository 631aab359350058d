"""``vfm_features``: one VFM forward over the whole original image (CorrCLIPv2's correlation source).

The image is the original file decoded without EXIF rotation (``storage.images.load_rgb``), as the
reference re-reads it with ``Image.open(path).convert("RGB")``; the VFM's own preprocessing (side
rounding, normalisation) and output choice are ``ovseg_core.features.vfm.vfm_dense_features``'s.
Each item stores the map ``(C, gh, gw)`` at the VFM's token grid in ``feature_dtype`` (C-RADIOv3-L
at float16: ~2.8 MB for a 448 x 597 ADE20K image, ~16.8 MB for a Cityscapes image): one map per
image serves every CorrCLIPv2 method with this VFM and size cap, whatever its window or CLIP.
Resizing it to the network input and to the windows happens where it is read (the
``reconstruction`` stage, ``ovseg_core.corrclip.vfm_correlation``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovseg_core.backbones.vfm_archs import vfm_arch
from ovseg_core.features.vfm import vfm_dense_features
from ovseg_core.features.vfm_preprocess import capped_size, vfm_input_size
from tasks.common import decoded_rgb, to_store
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The forward's autocast dtype for the run ``dtype``: None for float32 (the model's own float32)."""
    return None if dtype == "float32" else getattr(torch, dtype)


def vfm_models(ctx: StageContext):
    """The VFM with float32 weights (upcast exactly from the file); the run's ``dtype`` is the forward's autocast
    dtype, as the reference runs its VFM under fp16 autocast."""
    return ctx.backbone(ctx.params.backbone, "float32")


def vfm_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    rgb = decoded_rgb(ctx, row)  # no EXIF rotation; the manifest applied the pixel limit
    return {"image": torch.from_numpy(np.array(rgb)).permute(2, 0, 1)}  # a writable copy


def vfm_compute(ctx: StageContext, bb, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """The map ``(C, gh, gw)`` of each image (``feature_dtype``); attrs: the VFM input size and token grid."""
    p = ctx.params
    kind = vfm_arch(bb.spec.arch).kind
    out = []
    for inp in inputs:
        img = inp["image"]  # (3, H, W) uint8
        feats = vfm_dense_features(bb.model, kind, bb.patch_size, img, max_side=p.max_side,
                                   autocast_dtype=autocast_dtype(p.dtype))
        hw = capped_size((int(img.shape[1]), int(img.shape[2])), p.max_side)
        out.append(({"features": to_store(feats, p.feature_dtype)},
                    {"grid": [int(feats.shape[1]), int(feats.shape[2])],
                     "input_hw": list(vfm_input_size(kind, hw, bb.patch_size))}))
    return out
