"""Region maps from pre-generated mask files (how the CorrCLIP paper's numbers were made).

The CorrCLIP reference's default (``mask_generator=None`` in ``CorrCLIPv1/configs/base_config.py``)
reads one ``<image stem>.npz`` per image from ``instance_mask_path`` and takes its integer array
``instance_mask`` (H, W) as the region map, unchanged: no relabelling and no re-painting. Later
steps read it through two conventions only: the **smallest id is the unsegmented union** (map
correction skips the smallest value of the whole map; mask clustering treats the smallest id
present in a window as unsegmented) and ids are otherwise opaque labels.

:func:`regions_from_label_map` keeps both: it relabels **monotonically** (the smallest value -> 0,
the next -> 1, ...), so every comparison of ids, and therefore "smallest id in a window", is the
same as on the file's raw ids, and 0 is unsegmented as in every :class:`RegionMap`. The minimum
becomes 0 even when it labels a real segment covering part of the image; the reference treats it
as unsegmented too. Region ids keep the file's order (the reference does not re-sort by area), so
``areas`` (visible pixel counts) need not be ascending; ``scores`` are 1.0 (files carry none).

CorrCLIPv2's authors publish their EntitySeg masks in the same format (``instance_mask.zip``: one
``<stem>.npz``, ``instance_mask`` a 2-D integer map, 0 = unsegmented); their evaluation loader is
the same ``np.load(...)['instance_mask'].astype(int)``. Their memory-bank builder also accepts a
3-D bool stack ``[n, H, W]`` (one mask per region, possibly overlapping), which that evaluation
loader cannot use (its nearest resize takes a 2-D map). ``RegionFileConfig.stacked`` decides:
``"error"`` (default) refuses such a file naming the fix, ``"paint"`` paints the stack into a 2-D
map (:func:`paint_stack`: mask ``i`` gets id ``i + 1``, later masks over earlier ones, 0 where no
mask is, the generators' painting order).

File I/O belongs to the storage layer: it reads the bytes of ``RegionFileConfig.file_name(stem)``
in the configured directory and calls :func:`decode_label_map` then :func:`regions_from_label_map`.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ovseg_core.options import later_option
from .region_painting import RegionMap

__all__ = ["FILE_FORMATS", "STACKED_MODES", "RegionFileConfig", "decode_label_map", "paint_stack",
           "regions_from_label_map"]

# Accepted mask file suffixes: NumPy .npz archives (the reference's format) and PNG label maps.
FILE_FORMATS: tuple[str, ...] = (".npz", ".png")
# PIL modes of single-channel integer PNGs: 8-bit grey, palette indices, 32-bit int, 16-bit grey.
_PNG_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
_STEM_FIELD = "{stem}"
# How a 3-D [n, H, W] mask stack in an .npz is read: refused (default) or painted into one map.
STACKED_MODES: tuple[str, ...] = ("error", "paint")


@dataclass(frozen=True)
class RegionFileConfig:
    """Where an image's mask is inside the mask directory, and which array holds it."""

    pattern: str = "{stem}.npz"  # file name relative to the mask directory; {stem} = image file stem; .npz or .png; reference "{stem}.npz"
    key: str = "instance_mask"  # array name inside .npz files (unused for .png); reference "instance_mask"
    # A 3-D [n, H, W] mask stack (the bank builder's other form): "error" refuses it (the reference's
    # evaluation loader cannot read it), "paint" paints it into a 2-D map (paint_stack). A later option.
    stacked: str = later_option("error")

    def __post_init__(self) -> None:
        if self.stacked not in STACKED_MODES:
            raise ValueError(f"RegionFileConfig.stacked must be one of {STACKED_MODES}, got {self.stacked!r}")
        if self.pattern.count(_STEM_FIELD) != 1:
            raise ValueError(f"RegionFileConfig.pattern must contain {_STEM_FIELD} exactly once, got {self.pattern!r}")
        if not self.pattern.lower().endswith(FILE_FORMATS):
            raise ValueError(f"RegionFileConfig.pattern must end with one of {FILE_FORMATS}, got {self.pattern!r}")
        if self.file_format == ".npz" and not self.key:
            raise ValueError("RegionFileConfig.key must name the array inside the .npz files, got ''")

    @property
    def file_format(self) -> str:
        """``".npz"`` or ``".png"``."""
        return next(fmt for fmt in FILE_FORMATS if self.pattern.lower().endswith(fmt))

    def file_name(self, stem: str) -> str:
        """The mask file of the image with file stem ``stem``, relative to the mask directory."""
        return self.pattern.replace(_STEM_FIELD, stem)


def decode_label_map(data: bytes, cfg: RegionFileConfig) -> np.ndarray:
    """Decode the bytes of one mask file into its integer label array.

    Args:
        data: the whole file.
        cfg: format (from the pattern's suffix) and ``.npz`` array name.
    Returns:
        the stored ``(H, W)`` array as it is (any integer or bool dtype; checked by
        :func:`regions_from_label_map`); a 3-D ``[n, H, W]`` stack painted by :func:`paint_stack`
        with ``cfg.stacked == "paint"``.
    Raises:
        ValueError: unreadable file, missing ``key``, a 3-D stack with ``cfg.stacked == "error"``, or a
            PNG that is not a single-channel label map.
    """
    if cfg.file_format == ".npz":
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read the mask file as .npz: {type(e).__name__}: {e}") from e
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("mask file is a single .npy array, not an .npz archive; save it with np.savez")
        with archive:
            if cfg.key not in archive.files:
                raise ValueError(
                    f"mask file has no array {cfg.key!r} (it holds {sorted(archive.files)}); "
                    "set regions.params.key to one of those"
                )
            try:
                labels = archive[cfg.key]
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"cannot read array {cfg.key!r} of the .npz mask file: {type(e).__name__}: {e}") from e
        if labels.ndim == 3:
            if cfg.stacked != "paint":
                raise ValueError(
                    f"mask array {cfg.key!r} is a stack of {labels.shape[0]} masks {tuple(labels.shape)}, not an (H, W) "
                    "label map (the reference's evaluation loader cannot read it); set regions.params.stacked: paint "
                    "to paint the masks into one map (mask i -> id i + 1, later masks over earlier ones)")
            return paint_stack(labels)
        return labels
    try:
        with Image.open(io.BytesIO(data)) as png:
            if png.mode not in _PNG_LABEL_MODES:
                raise ValueError(
                    f"PNG mask must be a single-channel label map (mode {', '.join(_PNG_LABEL_MODES)}), "
                    f"got mode {png.mode}"
                )
            return np.asarray(png)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read the mask file as PNG: {type(e).__name__}: {e}") from e


def paint_stack(masks: np.ndarray) -> np.ndarray:
    """A ``[n, H, W]`` mask stack painted into one ``(H, W) int32`` map.

    Mask ``i`` (any nonzero value counts) gets id ``i + 1``, painted in stack order so later masks
    cover earlier ones where they overlap; pixels of no mask are 0 (unsegmented).
    """
    if masks.ndim != 3:
        raise ValueError(f"a mask stack is [n, H, W], got shape {masks.shape}")
    out = np.zeros(masks.shape[1:], dtype=np.int32)
    for i in range(masks.shape[0]):
        out[masks[i] != 0] = i + 1
    return out


def regions_from_label_map(labels: np.ndarray, image_hw: tuple[int, int]) -> RegionMap:
    """A region map from a pre-generated label array, as the CorrCLIP reference reads it.

    Args:
        labels: ``(H, W)`` integer (or bool) ids at the image's original resolution; the smallest
            value is the unsegmented union.
        image_hw: ``(H, W)`` of the image the mask belongs to.
    Returns:
        a :class:`RegionMap` whose ids are the monotone relabelling of ``labels`` (smallest -> 0,
        then 1..Z in increasing value), ``scores`` 1.0 and ``areas`` the pixel count of each id.
    Raises:
        ValueError: not 2-D, not integer, or not of size ``image_hw``.
    """
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.size == 0:
        shape = labels.shape if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"region mask must be a non-empty 2-D (H, W) label array, got {shape}")
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"region mask must hold integer ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(image_hw):
        raise ValueError(
            f"region mask has size {tuple(labels.shape)} (H, W) but the image is {tuple(image_hw)}; "
            "masks must be at the image's original resolution"
        )
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    ids = inverse.reshape(labels.shape).astype(np.int32)
    z = values.size - 1
    return RegionMap(ids=ids, scores=np.ones(z, dtype=np.float32), areas=counts[1:].astype(np.int64))
