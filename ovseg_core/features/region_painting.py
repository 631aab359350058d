"""The region-map contract shared by every region source, and ascending-area painting.

CorrCLIP step 1, *region masks* (methods.md §2.1): masks are sorted by **ascending area** and
painted in that order with ids 1..Z, so larger masks overwrite smaller ones; 0 = unsegmented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RegionMap", "check_rgb_image", "paint_region_map", "paint_regions"]


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


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is an ``(H, W, 3) uint8`` RGB array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {_describe(image)}")
