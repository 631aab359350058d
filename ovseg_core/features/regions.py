"""Region maps: SAM automatic masks (CorrCLIP) or superpixels, painted into one integer map.

CorrCLIP step 1, *region masks* (methods.md §2.1): masks are sorted by **ascending area** and
painted in that order with ids 1..Z, so larger masks overwrite smaller ones; 0 = unsegmented
(:mod:`ovseg_core.features.region_painting`, re-exported here). The map is computed once per image
at original resolution and later nearest-resized (:func:`resize_regions_nearest`) to the network
input and to the CLIP / DINO token grids.

SAM masks come from :func:`sam_regions`: segment-anything v1's automatic mask generation
(:mod:`ovseg_core.features.automatic_masks`, over ``SamPredictor``) with the number of masks per
point prompt a visible option: v1's ``SamAutomaticMaskGenerator`` always asks for 3 masks per
point, while the CorrCLIP on-the-fly reference uses single-mask output (``multimask_output=False``,
the default here). With ``multimask_output=True`` the result equals
``SamAutomaticMaskGenerator.generate`` with the same parameters. Prompts are decoded by
:func:`~ovseg_core.features.sam_decoder.decode_point_prompts` (the library decoder's results,
without its per-prompt copies of the image).

Other region sources give the same :class:`RegionMap`: SAM 2 automatic masks
(:mod:`ovseg_core.features.sam2_regions`) and pre-generated mask files
(:mod:`ovseg_core.features.region_files`); :func:`region_map` dispatches on the config type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from torch import nn

from .automatic_masks import AutomaticMaskConfig, generate_masks
from .region_painting import RegionMap, check_rgb_image, paint_region_map, paint_regions
from .sam2_regions import Sam2RegionConfig, sam2_regions
from .sam_decoder import decode_point_prompts

__all__ = [
    "AutomaticMaskConfig",
    "RegionMap",
    "SamRegionConfig",
    "SuperpixelConfig",
    "check_rgb_image",
    "paint_region_map",
    "paint_regions",
    "region_map",
    "resize_regions_nearest",
    "sam_masks",
    "sam_regions",
    "superpixel_regions",
]


# ---------------------------------------------------------------------------------------------
# SAM automatic masks


@dataclass(frozen=True)
class SamRegionConfig(AutomaticMaskConfig):
    """segment-anything v1's ``SamAutomaticMaskGenerator`` parameters (fields: :class:`AutomaticMaskConfig`).

    v1 binarises mask logits at the model's ``mask_threshold`` (0.0) and has no mask-to-mask refinement.
    """


class _SamPromptDecoder:
    """:class:`~ovseg_core.features.automatic_masks.PromptDecoder` over segment-anything's ``SamPredictor``."""

    def __init__(self, sam_model: nn.Module) -> None:
        self.model = sam_model
        self.predictor = SamPredictor(sam_model)

    def set_image(self, crop: np.ndarray) -> None:
        self.predictor.set_image(crop)

    def decode(self, points: np.ndarray, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        predictor, model = self.predictor, self.model
        # As SamAutomaticMaskGenerator._process_batch and SamPredictor.predict_torch do.
        coords = torch.as_tensor(predictor.transform.apply_coords(points, predictor.original_size), device=predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou_preds = decode_point_prompts(
            model.mask_decoder, predictor.features, model.prompt_encoder.get_dense_pe(), sparse, dense[:1], multimask_output
        )
        return low_res.flatten(0, 1)[:, None], iou_preds.flatten(0, 1)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        return self.model.postprocess_masks(low_res, self.predictor.input_size, self.predictor.original_size)[:, 0]


@torch.no_grad()
def sam_masks(
    sam_model: nn.Module, image: np.ndarray, cfg: SamRegionConfig, *, compute_dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Automatic SAM masks at the image's resolution.

    Args:
        sam_model: a segment-anything v1 ``Sam`` (its device is used; keep its weights float32).
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters.
        compute_dtype: autocast dtype of the network (``torch.bfloat16`` is the CPU speed option;
            outputs move slightly, see ``bench/sam_speed.py``); post-processing stays float32.
    Returns:
        masks ``(Z, H, W) bool`` and their predicted IoUs ``(Z,) float32``, in the library
        generator's output order.
    """
    return generate_masks(
        _SamPromptDecoder(sam_model),
        sam_model,
        image,
        cfg,
        mask_threshold=sam_model.mask_threshold,
        postprocess_small_regions=SamAutomaticMaskGenerator.postprocess_small_regions,
        compute_dtype=compute_dtype,
    )


def sam_regions(
    sam_model: nn.Module, image: np.ndarray, cfg: SamRegionConfig, *, compute_dtype: torch.dtype = torch.float32
) -> RegionMap:
    """CorrCLIP region masks: SAM automatic masks painted by ascending area, at original resolution.

    Args:
        sam_model: a segment-anything v1 ``Sam`` (its device is used).
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters (paper defaults in :class:`SamRegionConfig`).
        compute_dtype: autocast dtype of the network (see :func:`sam_masks`).
    Returns:
        a :class:`RegionMap`; all zeros with ``Z = 0`` when no mask survives the filters.
    """
    masks, scores = sam_masks(sam_model, image, cfg, compute_dtype=compute_dtype)
    return paint_region_map(masks, scores)


# ---------------------------------------------------------------------------------------------
# Superpixels (weight-free alternative)


@dataclass(frozen=True)
class SuperpixelConfig:
    """Weight-free regions from scikit-image superpixels (not part of either paper).

    Every pixel gets a region (no 0); ids are assigned by ascending area like SAM regions.
    """

    method: Literal["slic", "felzenszwalb"] = "slic"  # superpixel algorithm
    n_segments: int = 100  # slic: approximate number of superpixels, >= 1 (scikit-image default 100)
    compactness: float = 10.0  # slic: colour vs space trade-off, > 0 (scikit-image default 10)
    slic_sigma: float = 0.0  # slic: Gaussian pre-smoothing width, >= 0 (scikit-image default 0)
    max_num_iter: int = 10  # slic: k-means iterations, >= 1 (scikit-image default 10)
    scale: float = 100.0  # felzenszwalb: higher = larger segments, > 0 (chosen for ~100 regions on VOC-sized images)
    felzenszwalb_sigma: float = 0.8  # felzenszwalb: Gaussian pre-smoothing width, >= 0 (scikit-image default 0.8)
    min_size: int = 50  # felzenszwalb: minimum segment size in pixels, >= 0 (chosen with scale)

    def __post_init__(self) -> None:
        if self.method not in ("slic", "felzenszwalb"):
            raise ValueError(f"SuperpixelConfig.method must be 'slic' or 'felzenszwalb', got {self.method!r}")
        if self.n_segments < 1:
            raise ValueError(f"SuperpixelConfig.n_segments must be >= 1, got {self.n_segments}")
        if not self.compactness > 0:
            raise ValueError(f"SuperpixelConfig.compactness must be > 0, got {self.compactness}")
        if self.max_num_iter < 1:
            raise ValueError(f"SuperpixelConfig.max_num_iter must be >= 1, got {self.max_num_iter}")
        if not self.scale > 0:
            raise ValueError(f"SuperpixelConfig.scale must be > 0, got {self.scale}")
        for field in ("slic_sigma", "felzenszwalb_sigma", "min_size"):
            if getattr(self, field) < 0:
                raise ValueError(f"SuperpixelConfig.{field} must be >= 0, got {getattr(self, field)}")


def superpixel_regions(image: np.ndarray, cfg: SuperpixelConfig) -> RegionMap:
    """Superpixels as a :class:`RegionMap` (ids 1..Z by ascending area, scores 1.0, no 0).

    Args:
        image: ``(H, W, 3) uint8`` RGB.
        cfg: method and parameters.
    """
    # scikit-image only for superpixel regions: the SAM pipeline (and the GPU benchmark's machine) runs without it
    from skimage.segmentation import felzenszwalb, slic

    check_rgb_image(image)
    if cfg.method == "slic":
        labels = slic(
            image,
            n_segments=cfg.n_segments,
            compactness=cfg.compactness,
            sigma=cfg.slic_sigma,
            max_num_iter=cfg.max_num_iter,
            start_label=1,
            channel_axis=-1,
        )
    else:
        labels = felzenszwalb(
            image, scale=cfg.scale, sigma=cfg.felzenszwalb_sigma, min_size=cfg.min_size, channel_axis=-1
        )
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ids = (rank[inverse.reshape(labels.shape)] + 1).astype(np.int32)
    return RegionMap(
        ids=ids, scores=np.ones(order.size, dtype=np.float32), areas=counts[order].astype(np.int64)
    )


def region_map(
    source: nn.Module | None,
    image: np.ndarray,
    cfg: AutomaticMaskConfig | SuperpixelConfig,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> RegionMap:
    """Region map of ``image`` from the source named by the config type.

    Args:
        source: the segment-anything ``Sam`` for :class:`SamRegionConfig`, the sam2 ``SAM2Base``
            for :class:`~ovseg_core.features.sam2_regions.Sam2RegionConfig`; unused (may be None)
            for :class:`SuperpixelConfig`.
        image: ``(H, W, 3) uint8`` RGB.
        cfg: :class:`SamRegionConfig`, ``Sam2RegionConfig`` or :class:`SuperpixelConfig`.
        compute_dtype: autocast dtype of the SAM network (float32, or bfloat16 on CPU); unused
            for superpixels.
    """
    if isinstance(cfg, (SamRegionConfig, Sam2RegionConfig)):
        if source is None:
            kind = "segment-anything Sam" if isinstance(cfg, SamRegionConfig) else "sam2 SAM2Base"
            raise ValueError(f"{type(cfg).__name__} needs a {kind} model as source, got None")
        if isinstance(cfg, Sam2RegionConfig):
            return sam2_regions(source, image, cfg, compute_dtype=compute_dtype)
        return sam_regions(source, image, cfg, compute_dtype=compute_dtype)
    if isinstance(cfg, SuperpixelConfig):
        return superpixel_regions(image, cfg)
    raise ValueError(
        f"cfg must be a SamRegionConfig, Sam2RegionConfig or SuperpixelConfig, got {type(cfg).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Resizing

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _nearest_source_index(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output position under ``interpolate(mode="nearest")`` (float32 maps)."""
    coords = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
    return F.interpolate(coords, size=(out_size, 1), mode="nearest").reshape(out_size).long()


def resize_regions_nearest(ids: ArrayT, size: tuple[int, int]) -> ArrayT:
    """Nearest resize of a region map with ``torch.nn.functional.interpolate(mode="nearest")`` semantics.

    Ids are gathered (never interpolated as values), so any id value and dtype survive exactly.

    Args:
        ids: ``(..., H, W)`` integer map, numpy array or torch tensor.
        size: target ``(h, w)``, both >= 1.
    Returns:
        ``(..., h, w)`` of the same type, dtype and (for tensors) device.
    """
    if ids.ndim < 2:
        raise ValueError(f"ids must be (..., H, W), got shape {tuple(ids.shape)}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (h, w) with h, w >= 1, got {size}")
    height, width = ids.shape[-2:]
    rows = _nearest_source_index(int(height), int(size[0]))
    cols = _nearest_source_index(int(width), int(size[1]))
    if isinstance(ids, torch.Tensor):
        rows, cols = rows.to(ids.device), cols.to(ids.device)
        return ids[..., rows[:, None], cols[None, :]]
    return ids[..., rows.numpy()[:, None], cols.numpy()[None, :]]
