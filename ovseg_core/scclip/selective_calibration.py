"""Selective calibration (design-document extension (6), off in paper mode).

The document: a cheap predictor of how much calibration an image needs, from statistics the
pipeline already has (e.g. the LOF scores of the penultimate tokens), chooses a fast, a
balanced or the full path; the thresholds are parameters.

ovseg's definitions (the document names neither the predictor's formula nor the paths' steps):

- **Need** ``nu`` of a window: the largest robust z-score ``(s - median) / (1.4826 MAD)`` of the
  LOF scores ``s`` of its penultimate tokens (``n_neighbors``, the detector's LOF variant: the
  scores the paper's detector computes anyway). It measures how far the strongest anomaly
  token stands out; on Gaussian token clouds of 196 tokens it stays below about 7 (see
  :mod:`~ovseg_core.scclip.anomaly_detection`), while SC-CLIP's high-norm anomaly tokens score
  in the hundreds. ``nu >= 0``; +inf where the MAD is 0 and some score is above the median.
- **Paths** (cheapest first): ``fast`` = anomaly repair only (the last block's plain key-key
  attention on the repaired tokens); ``balanced`` = anomaly repair, self-adjusting aggregation
  and attention enhancement (no multi-level fusion, the second pass of the last block and the
  largest cost after it); ``full`` = every step (the paper). Each path keeps only the steps the
  configuration switches on.
- ``nu < selective_fast_below`` -> fast; ``nu >= selective_full_from`` -> full; otherwise balanced.
  ``selective_force`` puts every window on one path.

The document decides per image; ovseg decides per window (SC-CLIP's unit of computation; an
image's windows are calibrated independently) and records per image how many windows took each path.
"""

from __future__ import annotations

import torch

from ovseg_core.scclip.anomaly_detection import robust_zscores
from ovseg_core.scclip.config import CALIBRATION_STEPS, SELECTIVE_PATHS

__all__ = ["PATH_STEPS", "allowed_steps", "calibration_need", "choose_paths"]

PATH_STEPS: dict[str, tuple[str, ...]] = {
    "fast": ("anomaly_repair",),
    "balanced": ("anomaly_repair", "self_adjusting", "attention_enhancement"),
    "full": CALIBRATION_STEPS,
}
"""The calibration steps each path may run (intersected with the steps the configuration switches on)."""


def calibration_need(lof: torch.Tensor) -> torch.Tensor:
    """``nu``: the largest robust z-score of each window's ``(B, N)`` LOF scores; ``(B,) float32``."""
    if lof.ndim != 2:
        raise ValueError(f"lof must be (B, N) scores, got shape {tuple(lof.shape)}")
    return robust_zscores(lof).amax(dim=-1).clamp_min(0.0)


def choose_paths(need: torch.Tensor, fast_below: float, full_from: float) -> torch.Tensor:
    """Index into :data:`~ovseg_core.scclip.config.SELECTIVE_PATHS` per window: ``(B,) int64``.

    0 (fast) where ``need < fast_below``, 2 (full) where ``need >= full_from``, 1 (balanced) otherwise.
    """
    if fast_below > full_from:
        raise ValueError(f"fast_below ({fast_below}) must not exceed full_from ({full_from})")
    paths = torch.ones_like(need, dtype=torch.int64)
    paths = torch.where(need < fast_below, torch.zeros_like(paths), paths)
    return torch.where(need >= full_from, torch.full_like(paths, 2), paths)


def allowed_steps(paths: torch.Tensor, steps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{step: (B,) bool}``: the windows whose path (``(B,)`` indices from :func:`choose_paths`) runs each step.

    Args:
        paths: ``(B,) int64`` path indices.
        steps: the configured steps, a subsequence of :data:`~ovseg_core.scclip.config.CALIBRATION_STEPS`.
    """
    unknown = [s for s in steps if s not in CALIBRATION_STEPS]
    if unknown:
        raise ValueError(f"unknown calibration steps {unknown}; expected names from {CALIBRATION_STEPS}")
    return {
        step: torch.stack([paths == i for i, p in enumerate(SELECTIVE_PATHS) if step in PATH_STEPS[p]]).any(dim=0)
        for step in steps
    }
