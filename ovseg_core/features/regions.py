"""Region maps: SAM automatic masks (CorrCLIP) or superpixels, painted into one integer map.

CorrCLIP step 1, *region masks* (methods.md §2.1): masks are sorted by **ascending area** and
painted in that order with ids 1..Z, so larger masks overwrite smaller ones; 0 = unsegmented.
The map is computed once per image at original resolution and later nearest-resized
(:func:`resize_regions_nearest`) to the network input and to the CLIP / DINO token grids.

SAM masks come from :func:`sam_regions`, which runs segment-anything v1's automatic mask
generation through its public pieces (``SamPredictor`` and ``segment_anything.utils.amg``) so that
the number of masks per point prompt is a visible option: v1's ``SamAutomaticMaskGenerator``
always asks for 3 masks per point, while the CorrCLIP on-the-fly reference uses single-mask output
(``multimask_output=False``, the default here). With ``multimask_output=True`` the result equals
``SamAutomaticMaskGenerator.generate`` with the same parameters.

Other region sources give the same :class:`RegionMap`: SAM 2 automatic masks
(:mod:`ovseg_core.features.sam2_regions`) and pre-generated mask files
(:mod:`ovseg_core.features.region_files`); :func:`region_map` dispatches on the config type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
)
from skimage.segmentation import felzenszwalb, slic
from torch import nn
from torchvision.ops.boxes import batched_nms, box_area

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


@dataclass(frozen=True)
class RegionMap:
    """An integer region map with per-region metadata; ids are in ascending-area order."""

    ids: np.ndarray  # (H, W) int32: 0 = unsegmented, z in 1..Z = region z
    scores: np.ndarray  # (Z,) float32: quality of region z at index z - 1 (SAM predicted_iou; 1.0 for superpixels)
    areas: np.ndarray  # (Z,) int64: pixel count of region z's own mask (the sort key), at index z - 1

    def __post_init__(self) -> None:
        if not isinstance(self.ids, np.ndarray) or self.ids.ndim != 2 or self.ids.dtype != np.int32:
            raise ValueError(f"RegionMap.ids must be an (H, W) int32 array, got {_describe(self.ids)}")
        z = self.scores.shape[0] if isinstance(self.scores, np.ndarray) and self.scores.ndim == 1 else -1
        if z < 0 or self.scores.dtype != np.float32:
            raise ValueError(f"RegionMap.scores must be a (Z,) float32 array, got {_describe(self.scores)}")
        if not isinstance(self.areas, np.ndarray) or self.areas.shape != (z,) or self.areas.dtype != np.int64:
            raise ValueError(f"RegionMap.areas must be a ({z},) int64 array, got {_describe(self.areas)}")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() > z):
            raise ValueError(f"RegionMap.ids must lie in 0..{z}, got {self.ids.min()}..{self.ids.max()}")

    @property
    def num_regions(self) -> int:
        """Z, the number of painted masks (a fully overwritten region keeps its id but no pixel)."""
        return int(self.scores.shape[0])


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"shape {x.shape} dtype {x.dtype}"
    return type(x).__name__


# ---------------------------------------------------------------------------------------------
# Painting


def _stack_masks(masks: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``(Z, H, W) bool`` from a ``(Z, H, W)`` array or a sequence of ``(H, W)`` masks."""
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"masks must be (Z, H, W) or a sequence of (H, W), got shape {masks.shape}")
        stacked = masks
    else:
        if len(masks) == 0:
            raise ValueError("an empty sequence of masks has no image size; pass a (0, H, W) array")
        shapes = {np.shape(m) for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"masks must all be (H, W) with one shared size, got shapes {sorted(shapes)}")
        stacked = np.stack([np.asarray(m) for m in masks])
    if stacked.dtype != np.bool_:
        raise ValueError(f"masks must be boolean, got dtype {stacked.dtype}")
    return stacked


def _paint(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint ``(Z, H, W) bool`` masks by ascending area.

    Returns:
        ``ids (H, W) int32``, ``order (Z,) int64`` (mask index painted with id ``z`` is
        ``order[z - 1]``; stable for equal areas) and ``areas (Z,) int64`` in id order.
    """
    z, height, width = masks.shape
    areas = masks.sum(axis=(1, 2), dtype=np.int64)
    order = np.argsort(areas, kind="stable").astype(np.int64)
    if z == 0:
        return np.zeros((height, width), dtype=np.int32), order, areas
    painted = masks[order]
    # The id of a pixel is the last (largest) mask covering it: first hit in reversed order.
    last = z - 1 - np.argmax(painted[::-1], axis=0)
    ids = np.where(painted.any(axis=0), last + 1, 0).astype(np.int32)
    return ids, order, areas[order]


def paint_regions(masks: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Paint boolean masks into one map: ascending area, larger masks overwrite smaller ones.

    Args:
        masks: ``(Z, H, W) bool`` array or a sequence of ``(H, W) bool`` masks.
    Returns:
        ``(H, W) int32``: id ``z`` (1..Z) is the ``z``-th smallest mask (ties keep input order);
        0 where no mask covers the pixel.
    """
    return _paint(_stack_masks(masks))[0]


def paint_region_map(masks: np.ndarray, scores: np.ndarray) -> RegionMap:
    """Paint ``(Z, H, W) bool`` masks by ascending area into a :class:`RegionMap`.

    Args:
        masks: ``(Z, H, W) bool`` in generator order.
        scores: ``(Z,) float32`` quality of each mask, in the same order.
    Returns:
        ids as :func:`paint_regions`; ``scores`` and ``areas`` reordered to id order.
    """
    masks = _stack_masks(masks)
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must be ({masks.shape[0]},) like the masks, got shape {scores.shape}")
    ids, order, areas = _paint(masks)
    return RegionMap(ids=ids, scores=np.asarray(scores, dtype=np.float32)[order], areas=areas)


# ---------------------------------------------------------------------------------------------
# SAM automatic masks


@dataclass(frozen=True)
class AutomaticMaskConfig:
    """Parameters shared by segment-anything's and SAM 2's automatic mask generators.

    Defaults are the CorrCLIP on-the-fly reference (methods.md §2.1): 8 points per side,
    pred_iou_thresh 0.4, stability_score_thresh 0.4, single-mask output, no post-processing.
    ``output_mode`` of the library generators is not exposed: regions always need binary masks.
    """

    points_per_side: int | None = 8  # grid points per image side (points_per_side**2 prompts); paper 8; None => point_grids
    points_per_batch: int = 64  # prompts run through the decoder at once; memory only, no effect on results
    pred_iou_thresh: float = 0.4  # keep masks whose predicted IoU > this, in [0, 1] (0 disables); paper 0.4
    stability_score_thresh: float = 0.4  # keep masks with stability score >= this, in [0, 1] (0 disables); paper 0.4
    stability_score_offset: float = 1.0  # logit offset of the stability score's two cutoffs, > 0; library default 1.0
    box_nms_thresh: float = 0.7  # box IoU of the within-crop NMS, in [0, 1]; library default 0.7
    crop_n_layers: int = 0  # extra crop layers (layer i has (2**i)**2 crops), >= 0; paper 0 (whole image only)
    crop_nms_thresh: float = 0.7  # box IoU of the NMS between crops, in [0, 1]; library default 0.7
    crop_overlap_ratio: float = 512 / 1500  # crop overlap as a fraction of the short side, in [0, 1); library default
    crop_n_points_downscale_factor: int = 1  # points per side divided by this**layer in crop layers, >= 1; default 1
    point_grids: tuple[tuple[tuple[float, float], ...], ...] | None = None  # explicit (x, y) in [0,1] per crop layer
    min_mask_region_area: int = 0  # > 0 removes holes/islands below this area (needs opencv); paper 0 (none)
    multimask_output: bool = False  # True = 3 masks per point (the library default); paper False (single-mask output)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError(f"{name}: set exactly one of points_per_side and point_grids")
        if self.points_per_side is not None and self.points_per_side < 1:
            raise ValueError(f"{name}.points_per_side must be >= 1, got {self.points_per_side}")
        if self.point_grids is not None:
            if len(self.point_grids) != self.crop_n_layers + 1:
                raise ValueError(
                    f"{name}.point_grids needs crop_n_layers + 1 = {self.crop_n_layers + 1} grids, "
                    f"got {len(self.point_grids)}"
                )
            for grid in self.point_grids:
                arr = np.asarray(grid, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0 or arr.min() < 0 or arr.max() > 1:
                    raise ValueError(f"{name}.point_grids: each grid must be non-empty (x, y) pairs in [0, 1]")
        if self.points_per_batch < 1:
            raise ValueError(f"{name}.points_per_batch must be >= 1, got {self.points_per_batch}")
        for field in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}.{field} must be in [0, 1], got {value}")
        if not self.stability_score_offset > 0:
            raise ValueError(f"{name}.stability_score_offset must be > 0, got {self.stability_score_offset}")
        if self.crop_n_layers < 0:
            raise ValueError(f"{name}.crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ValueError(f"{name}.crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio}")
        if self.crop_n_points_downscale_factor < 1:
            raise ValueError(
                f"{name}.crop_n_points_downscale_factor must be >= 1, got {self.crop_n_points_downscale_factor}"
            )
        if self.min_mask_region_area < 0:
            raise ValueError(f"{name}.min_mask_region_area must be >= 0, got {self.min_mask_region_area}")

    def layer_point_grids(self) -> list[np.ndarray]:
        """``(P_i, 2) float64`` normalised (x, y) prompt points of each crop layer."""
        if self.point_grids is not None:
            return [np.asarray(grid, dtype=np.float64) for grid in self.point_grids]
        assert self.points_per_side is not None
        return build_all_layer_point_grids(
            self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
        )


@dataclass(frozen=True)
class SamRegionConfig(AutomaticMaskConfig):
    """segment-anything v1's ``SamAutomaticMaskGenerator`` parameters (fields: :class:`AutomaticMaskConfig`).

    v1 binarises mask logits at the model's ``mask_threshold`` (0.0) and has no mask-to-mask refinement.
    """


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is an ``(H, W, 3) uint8`` RGB array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {_describe(image)}")


def _sam_batch(
    predictor: SamPredictor, points: np.ndarray, crop_box: list[int], orig_size: tuple[int, int], cfg: SamRegionConfig
) -> MaskData:
    """Masks of one batch of point prompts inside one crop, filtered as the library generator does."""
    orig_h, orig_w = orig_size
    crop_size = (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])
    coords = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), device=predictor.device)
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
    masks, iou_preds, _ = predictor.predict_torch(
        coords[:, None, :], labels[:, None], multimask_output=cfg.multimask_output, return_logits=True
    )
    data = MaskData(masks=masks.flatten(0, 1), iou_preds=iou_preds.flatten(0, 1))
    del masks
    if cfg.pred_iou_thresh > 0.0:
        data.filter(data["iou_preds"] > cfg.pred_iou_thresh)
    threshold = predictor.model.mask_threshold
    data["stability_score"] = calculate_stability_score(data["masks"], threshold, cfg.stability_score_offset)
    if cfg.stability_score_thresh > 0.0:
        data.filter(data["stability_score"] >= cfg.stability_score_thresh)
    data["masks"] = data["masks"] > threshold
    data["boxes"] = batched_mask_to_box(data["masks"])
    keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
    if not torch.all(keep):
        data.filter(keep)
    data["rles"] = mask_to_rle_pytorch(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
    del data["masks"]
    return data


@torch.no_grad()
def sam_masks(sam_model: nn.Module, image: np.ndarray, cfg: SamRegionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Automatic SAM masks at the image's resolution.

    Args:
        sam_model: a segment-anything v1 ``Sam``.
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters.
    Returns:
        masks ``(Z, H, W) bool`` and their predicted IoUs ``(Z,) float32``, in the library
        generator's output order.
    """
    check_rgb_image(image)
    orig_size = (int(image.shape[0]), int(image.shape[1]))
    predictor = SamPredictor(sam_model)
    grids = cfg.layer_point_grids()
    crop_boxes, layer_idxs = generate_crop_boxes(orig_size, cfg.crop_n_layers, cfg.crop_overlap_ratio)

    data = MaskData()
    for crop_box, layer in zip(crop_boxes, layer_idxs):
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        predictor.set_image(cropped)
        points_for_crop = grids[layer] * np.array(cropped.shape[:2])[None, ::-1]
        crop_data = MaskData()
        for (points,) in batch_iterator(cfg.points_per_batch, points_for_crop):
            crop_data.cat(_sam_batch(predictor, points, crop_box, orig_size, cfg))
        predictor.reset_image()
        keep = batched_nms(
            crop_data["boxes"].float(),
            crop_data["iou_preds"],
            torch.zeros(len(crop_data["boxes"]), device=crop_data["boxes"].device),
            iou_threshold=cfg.box_nms_thresh,
        )
        crop_data.filter(keep)
        crop_data["boxes"] = uncrop_boxes_xyxy(crop_data["boxes"], crop_box)
        crop_data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(crop_data["rles"]))])
        data.cat(crop_data)

    height, width = orig_size
    if len(data["rles"]) == 0:
        return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
    if len(crop_boxes) > 1:
        scores = 1 / box_area(data["crop_boxes"])
        keep = batched_nms(
            data["boxes"].float(),
            scores.to(data["boxes"].device),
            torch.zeros(len(data["boxes"]), device=data["boxes"].device),
            iou_threshold=cfg.crop_nms_thresh,
        )
        data.filter(keep)
    data.to_numpy()
    if cfg.min_mask_region_area > 0:
        try:
            data = SamAutomaticMaskGenerator.postprocess_small_regions(
                data, cfg.min_mask_region_area, max(cfg.box_nms_thresh, cfg.crop_nms_thresh)
            )
        except ImportError as e:
            raise ImportError("SamRegionConfig.min_mask_region_area > 0 needs opencv-python (cv2)") from e
    masks = np.stack([rle_to_mask(rle) for rle in data["rles"]]).astype(bool)
    return masks, np.asarray(data["iou_preds"], dtype=np.float32).reshape(-1)


def sam_regions(sam_model: nn.Module, image: np.ndarray, cfg: SamRegionConfig) -> RegionMap:
    """CorrCLIP region masks: SAM automatic masks painted by ascending area, at original resolution.

    Args:
        sam_model: a segment-anything v1 ``Sam`` (its device is used).
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters (paper defaults in :class:`SamRegionConfig`).
    Returns:
        a :class:`RegionMap`; all zeros with ``Z = 0`` when no mask survives the filters.
    """
    masks, scores = sam_masks(sam_model, image, cfg)
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


def region_map(source: nn.Module | None, image: np.ndarray, cfg: AutomaticMaskConfig | SuperpixelConfig) -> RegionMap:
    """Region map of ``image`` from the source named by the config type.

    Args:
        source: the segment-anything ``Sam`` for :class:`SamRegionConfig`, the sam2 ``SAM2Base``
            for :class:`~ovseg_core.features.sam2_regions.Sam2RegionConfig`; unused (may be None)
            for :class:`SuperpixelConfig`.
        image: ``(H, W, 3) uint8`` RGB.
        cfg: :class:`SamRegionConfig`, ``Sam2RegionConfig`` or :class:`SuperpixelConfig`.
    """
    # Imported here: sam2_regions imports this module, and the sam2 package only loads when used.
    from .sam2_regions import Sam2RegionConfig, sam2_regions

    if isinstance(cfg, (SamRegionConfig, Sam2RegionConfig)):
        if source is None:
            kind = "segment-anything Sam" if isinstance(cfg, SamRegionConfig) else "sam2 SAM2Base"
            raise ValueError(f"{type(cfg).__name__} needs a {kind} model as source, got None")
        if isinstance(cfg, Sam2RegionConfig):
            return sam2_regions(source, image, cfg)
        return sam_regions(source, image, cfg)
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
