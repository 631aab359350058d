"""Map correction: every original region takes the mode of the predicted labels inside it."""

from __future__ import annotations

import torch

__all__ = ["map_correction"]


def map_correction(labels: torch.Tensor, regions: torch.Tensor, *, m0_quirk: bool = True) -> torch.Tensor:
    """Replace the labels inside every region by their mode.

    Every region id except the unsegmented one gets, on all its pixels, the most frequent
    predicted label inside it; ties go to the smallest label. The unsegmented id is 0; with
    ``m0_quirk`` (reference, ``CorrCLIPConfig.m0_quirk``) it is the smallest non-negative id of the
    map, which is a real region when the map has no 0. Negative ids are never corrected. Vectorised: one
    ``bincount`` over ``region * K + label``.

    Args:
        labels: ``(H, W) int64`` predicted labels (after prob_thd), values ``>= 0``.
        regions: ``(H, W)`` integer original (un-merged) region ids at the same resolution.
        m0_quirk: treat the smallest id as unsegmented (reference) instead of only id 0.
    Returns:
        ``(H, W) int64`` corrected labels.
    """
    if labels.ndim != 2 or labels.shape != regions.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and regions {tuple(regions.shape)} must be the same (H, W)")
    if labels.is_floating_point() or regions.is_floating_point():
        raise ValueError(f"labels and regions must be integer tensors, got {labels.dtype} and {regions.dtype}")
    if labels.numel() == 0:
        return labels.long().clone()
    labels = labels.long()
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    ids, inverse = torch.unique(regions.long(), sorted=True, return_inverse=True)
    k = int(labels.max()) + 1
    counts = torch.bincount((inverse * k + labels).reshape(-1), minlength=ids.numel() * k).reshape(ids.numel(), k)
    mode = counts.argmax(dim=1)  # first maximum = smallest label on ties
    corrected = ids >= 0
    if bool(corrected.any()):
        unsegmented_id = int(ids[corrected][0]) if m0_quirk else 0
        corrected &= ids != unsegmented_id
    return torch.where(corrected[inverse], mode[inverse], labels)
