"""Automatic mask generation for segment-anything v1 and SAM 2, without the generators' bookkeeping.

Same algorithm, same parameters and the same masks, scores and order as
``SamAutomaticMaskGenerator.generate`` / ``SAM2AutomaticMaskGenerator.generate`` (per crop: embed
the crop, decode point prompts in batches, filter by predicted IoU, stability score and crop edge,
box NMS; then NMS between crops), with the work the results do not need left out:

- the predicted-IoU filter runs on the low-resolution logits, so only surviving masks are
  upsampled to the crop (the libraries upsample every candidate first, then filter);
- stability scores count both cutoffs on the upsampled logits once (exact integer counts, as
  the libraries' ``calculate_stability_score``);
- masks stay boolean arrays: no RLE encoding per batch and decoding at the end (RLEs are only
  built for ``min_mask_region_area > 0``, whose post-processing the libraries define on RLEs);
- the model-specific steps (embedding a crop, decoding prompts, upsampling logits) come from a
  :class:`PromptDecoder` over the library's own predictor (:mod:`.regions`, :mod:`.sam2_regions`).

The network runs under :func:`network_autocast` (``compute_dtype``); everything after the decoder
runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    rle_to_mask,
    uncrop_boxes_xyxy,
)
from torch import nn
from torchvision.ops.boxes import batched_nms, box_area

from .region_painting import check_rgb_image

__all__ = ["AutomaticMaskConfig", "PromptDecoder", "generate_masks", "network_autocast", "stability_scores"]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A library generator's static postprocess_small_regions(mask_data, min_area, nms_thresh).
SmallRegionPostprocess = Callable[[MaskData, int, float], MaskData]


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


def network_autocast(model: nn.Module, compute_dtype: torch.dtype) -> torch.autocast:
    """``torch.autocast`` on ``model``'s device in ``compute_dtype``; disabled for float32.

    Raises:
        ValueError: ``compute_dtype`` is not float32, bfloat16 or float16 (float16 needs CUDA).
    """
    device = next(model.parameters()).device
    if compute_dtype not in _COMPUTE_DTYPES or (compute_dtype == torch.float16 and device.type != "cuda"):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.bfloat16 (torch.float16 on CUDA only), "
            f"got {compute_dtype} on {device.type}"
        )
    return torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


class PromptDecoder(Protocol):
    """The model-specific steps of automatic mask generation, over one library predictor."""

    def set_image(self, crop: np.ndarray) -> None:
        """Embed an ``(h, w, 3) uint8`` crop (the library predictor's ``set_image``)."""

    def decode(self, points: np.ndarray, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits ``(N, 1, h', w')`` and predicted IoUs ``(N,)`` of point prompts.

        ``points`` is ``(P, 2)`` float (x, y) in crop pixels; ``N = P * C`` with ``C`` masks per
        point, flattened point-major as the libraries do.
        """

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """``(N, 1, h', w')`` logits -> ``(N, h, w)`` float32 logits at the crop's resolution."""


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks cut at ``mask_threshold + offset`` and ``- offset``, ``(N,)`` float32.

    Equal to the libraries' ``calculate_stability_score`` (the same exact pixel counts, divided once).
    """
    inner = (logits > (mask_threshold + offset)).sum(dim=(-1, -2), dtype=torch.int32)
    outer = (logits > (mask_threshold - offset)).sum(dim=(-1, -2), dtype=torch.int32)
    return inner / outer


@dataclass
class _CropMasks:
    """Surviving masks of one crop: crop-local boolean masks and their image-frame boxes."""

    masks: torch.Tensor  # (Z, h, w) bool, crop-local
    iou_preds: torch.Tensor  # (Z,) float32
    boxes: torch.Tensor  # (Z, 4) XYXY in the image frame
    crop_box: list[int]  # [x0, y0, x1, y1]


def _decode_batch(
    decoder: PromptDecoder,
    points: np.ndarray,
    crop_box: list[int],
    orig_size: tuple[int, int],
    cfg: AutomaticMaskConfig,
    mask_threshold: float,
    compute: torch.autocast,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of one batch of point prompts inside one crop, filtered as the library generators do."""
    with compute:
        low_res, iou_preds = decoder.decode(points, cfg.multimask_output)
    low_res, iou_preds = low_res.float(), iou_preds.float()
    if cfg.pred_iou_thresh > 0.0:
        keep = iou_preds > cfg.pred_iou_thresh
        low_res, iou_preds = low_res[keep], iou_preds[keep]
    logits = decoder.upsample(low_res)
    stability = stability_scores(logits, mask_threshold, cfg.stability_score_offset)
    if cfg.stability_score_thresh > 0.0:
        keep = stability >= cfg.stability_score_thresh
        logits, iou_preds = logits[keep], iou_preds[keep]
    masks = logits > mask_threshold
    del logits
    boxes = batched_mask_to_box(masks)
    keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
    if not torch.all(keep):
        masks, iou_preds, boxes = masks[keep], iou_preds[keep], boxes[keep]
    return masks, iou_preds, boxes


def _crop_masks(
    decoder: PromptDecoder,
    image: np.ndarray,
    crop_box: list[int],
    grid: np.ndarray,
    cfg: AutomaticMaskConfig,
    mask_threshold: float,
    compute: torch.autocast,
) -> _CropMasks:
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1, :]
    with compute:
        decoder.set_image(crop)
    points_for_crop = grid * np.array(crop.shape[:2])[None, ::-1]
    orig_size = (int(image.shape[0]), int(image.shape[1]))
    parts = [
        _decode_batch(decoder, points, crop_box, orig_size, cfg, mask_threshold, compute)
        for (points,) in batch_iterator(cfg.points_per_batch, points_for_crop)
    ]
    masks, iou_preds, boxes = (torch.cat(p) for p in zip(*parts))
    keep = batched_nms(boxes.float(), iou_preds, torch.zeros_like(boxes[:, 0]), iou_threshold=cfg.box_nms_thresh)
    return _CropMasks(masks[keep], iou_preds[keep], uncrop_boxes_xyxy(boxes[keep], crop_box), crop_box)


def _remove_small_regions(
    postprocess: SmallRegionPostprocess, masks: np.ndarray, iou_preds: np.ndarray, boxes: torch.Tensor, cfg: AutomaticMaskConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The library's ``postprocess_small_regions`` (holes and islands, then NMS), on RLEs as it expects."""
    data = MaskData(rles=mask_to_rle_pytorch(torch.from_numpy(masks)), iou_preds=iou_preds, boxes=boxes.float().numpy())
    try:
        data = postprocess(data, cfg.min_mask_region_area, max(cfg.box_nms_thresh, cfg.crop_nms_thresh))
    except ImportError as e:
        raise ImportError(f"{type(cfg).__name__}.min_mask_region_area > 0 needs opencv-python (cv2)") from e
    kept = [rle_to_mask(rle) for rle in data["rles"]]
    masks = np.stack(kept).astype(bool) if kept else np.zeros((0, *masks.shape[1:]), dtype=bool)
    return masks, np.asarray(data["iou_preds"], dtype=np.float32).reshape(-1)


@torch.no_grad()
def generate_masks(
    decoder: PromptDecoder,
    model: nn.Module,
    image: np.ndarray,
    cfg: AutomaticMaskConfig,
    *,
    mask_threshold: float,
    postprocess_small_regions: SmallRegionPostprocess,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Automatic masks of ``image`` at its resolution, as the library generator returns them.

    Args:
        decoder: the model-specific steps (a fresh one per call: it holds the crop embedding).
        model: the model ``decoder`` runs (its device picks the autocast device).
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters.
        mask_threshold: logit above which a pixel is in a mask (SAM v1: ``model.mask_threshold``).
        postprocess_small_regions: the library generator's static ``postprocess_small_regions``
            (used only when ``cfg.min_mask_region_area > 0``).
        compute_dtype: autocast dtype of the network.
    Returns:
        masks ``(Z, H, W) bool`` and predicted IoUs ``(Z,) float32`` in the generator's order.
    """
    check_rgb_image(image)
    compute = network_autocast(model, compute_dtype)
    height, width = int(image.shape[0]), int(image.shape[1])
    grids = cfg.layer_point_grids()
    crop_boxes, layer_idxs = generate_crop_boxes((height, width), cfg.crop_n_layers, cfg.crop_overlap_ratio)
    crops = [
        _crop_masks(decoder, image, box, grids[layer], cfg, mask_threshold, compute)
        for box, layer in zip(crop_boxes, layer_idxs)
    ]
    order = [(c, i) for c, crop in enumerate(crops) for i in range(crop.masks.shape[0])]
    boxes = torch.cat([crop.boxes for crop in crops])
    iou_preds = torch.cat([crop.iou_preds for crop in crops])
    if len(crop_boxes) > 1 and order:
        crop_areas = torch.cat([box_area(torch.tensor([crop.crop_box])).expand(len(crop.boxes)) for crop in crops])
        keep = batched_nms(
            boxes.float(), (1 / crop_areas).to(boxes.device), torch.zeros_like(boxes[:, 0]), iou_threshold=cfg.crop_nms_thresh
        )
        order, boxes, iou_preds = [order[k] for k in keep.tolist()], boxes[keep], iou_preds[keep]
    if not order:
        return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
    crop_masks = [crop.masks.cpu().numpy() for crop in crops]
    masks = np.zeros((len(order), height, width), dtype=bool)
    for z, (c, i) in enumerate(order):  # back to the image frame
        x0, y0, x1, y1 = crops[c].crop_box
        masks[z, y0:y1, x0:x1] = crop_masks[c][i]
    scores = iou_preds.cpu().numpy().astype(np.float32)
    if cfg.min_mask_region_area > 0:
        masks, scores = _remove_small_regions(postprocess_small_regions, masks, scores, boxes.cpu(), cfg)
    return masks, scores
