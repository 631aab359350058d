"""Progressive, quality-gated calibration (design-document extension (4), off in paper mode).

The document: SC-CLIP's steps run in order (anomaly repair, self-adjusting aggregation,
attention enhancement, multi-level fusion); after each, a training-free quality score
compares the calibrated features with the previous ones; a step is kept only if its score
passes a threshold, otherwise it is rolled back; a complexity measure may skip the later
steps on simple images.

ovseg's definitions (per window; the document suggests the two ingredients, not the formula):

- Patch-text probabilities ``P_i = softmax(logit_scale * cos(f_i, t_q))`` over the queries
  ``q`` for every token feature ``f_i`` (the probabilities the prediction is made from).
- **Agreement** ``A``: Pearson correlation, over the token pairs ``i != j``, of the
  co-prediction ``P_i . P_j`` with the mid-layer similarity ``Sim_mid[i, j]`` (the paper's
  Sim_mid: pre-adjust block tokens, repaired at the detected anomalies when anomaly repair is
  on; a fixed reference for every step). 0 when either has no variance.
- **Prediction entropy** ``E = mean_i H(P_i) / ln Q`` in [0, 1] (0 for a single query).
- **Quality** ``Q = (1 - w) (A + 1) / 2 + w (1 - E)`` in [0, 1], ``w = gate_entropy_weight``.

Starting from the window with every step off (the last block's plain key-key attention), each
step ``s`` is tried in order on top of the steps kept so far; it is **kept** in a window when
``Q(with s) - Q(before s) >= gate_threshold`` and rolled back otherwise. A step a window may
not take (selective calibration's path, the complexity skip) is not tried there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

__all__ = ["prediction_agreement", "prediction_entropy", "progressive_calibration", "quality_score"]

_RELATIVE_SPREAD: float = 1e-6  # a quantity whose standard deviation is below this times its mean magnitude is constant


def _probabilities(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    if features.ndim != 3:
        raise ValueError(f"features must be (B, N, E), got shape {tuple(features.shape)}")
    if text.ndim != 2 or text.shape[1] != features.shape[-1]:
        raise ValueError(f"text must be (Q, E={features.shape[-1]}) query embeddings, got shape {tuple(text.shape)}")
    cos = torch.nn.functional.normalize(features.float(), dim=-1) @ text.float().T
    return torch.softmax(logit_scale * cos, dim=-1)


def prediction_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``mean_i H(P_i) / ln Q`` of ``(B, N, Q)`` probabilities; ``(B,) float32`` in [0, 1]."""
    q = probs.shape[-1]
    if q < 2:
        return torch.zeros(probs.shape[0], dtype=torch.float32, device=probs.device)
    p = probs.to(torch.float64)
    h = -(p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))).sum(dim=-1)
    return (h.mean(dim=-1) / math.log(q)).clamp(0.0, 1.0).to(torch.float32)


def prediction_agreement(probs: torch.Tensor, mid_sim: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over pairs ``i != j`` of ``P_i . P_j`` with ``mid_sim[i, j]``; ``(B,) float32``.

    Args:
        probs: ``(B, N, Q)`` per-token probabilities.
        mid_sim: ``(B, N, N)`` mid-layer cosine similarity.
    Returns:
        Correlations in [-1, 1]; 0 for a window where either quantity is constant over the pairs.
    """
    b, n, _ = probs.shape
    if mid_sim.shape != (b, n, n):
        raise ValueError(f"mid_sim must be (B, N, N) = ({b}, {n}, {n}), got {tuple(mid_sim.shape)}")
    p = probs.to(torch.float64)
    co = p @ p.transpose(1, 2)
    off = ~torch.eye(n, dtype=torch.bool, device=probs.device)
    a = co[:, off]  # (B, N (N - 1))
    s = mid_sim.to(torch.float64)[:, off]
    a_c = a - a.mean(dim=-1, keepdim=True)
    s_c = s - s.mean(dim=-1, keepdim=True)
    a_std = a_c.square().mean(dim=-1).sqrt()
    s_std = s_c.square().mean(dim=-1).sqrt()
    # a spread at rounding level (identical predictions computed in float32) counts as constant
    constant = (a_std <= _RELATIVE_SPREAD * a.abs().mean(dim=-1)) | (s_std <= _RELATIVE_SPREAD * s.abs().mean(dim=-1))
    corr = (a_c * s_c).mean(dim=-1) / torch.where(constant, torch.ones_like(a_std), a_std * s_std)
    return torch.where(constant, torch.zeros_like(corr), corr).clamp(-1.0, 1.0).to(torch.float32)


def quality_score(
    features: torch.Tensor, text: torch.Tensor, logit_scale: float, mid_sim: torch.Tensor, entropy_weight: float
) -> torch.Tensor:
    """The training-free quality ``Q`` of each window's features (module docstring).

    Args:
        features: ``(B, N, E)`` token features (not normalised; normalised here).
        text: ``(Q, E)`` L2-normalised query embeddings.
        logit_scale: softmax temperature of the prediction (the dataset preset's logit scale).
        mid_sim: ``(B, N, N)`` mid-layer cosine similarity (the reference structure).
        entropy_weight: ``w`` in [0, 1].
    Returns:
        ``(B,) float32`` in [0, 1].
    """
    probs = _probabilities(features, text, logit_scale)
    agreement = prediction_agreement(probs, mid_sim)
    return (1.0 - entropy_weight) * 0.5 * (agreement + 1.0) + entropy_weight * (1.0 - prediction_entropy(probs))


def progressive_calibration(
    forward: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    quality: Callable[[torch.Tensor], torch.Tensor],
    allowed: Mapping[str, torch.Tensor],
    threshold: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Try the steps of ``allowed`` in order; keep each per window when the quality gain passes ``threshold``.

    Args:
        forward: ``{step: (B,) bool windows where it is on} -> (B, ...)`` features; a step not in
            the mapping is off in every window.
        quality: ``(B, ...) features -> (B,)`` score.
        allowed: ``{step: (B,) bool}`` in the order to try; a step is tried only in its windows.
        threshold: a step is kept where ``quality(after) - quality(before) >= threshold``.
    Returns:
        The ``(B, ...)`` features of the kept steps and ``{step: (B,) bool kept}``.
    """
    kept: dict[str, torch.Tensor] = {}
    features = forward({})
    score = quality(features)
    for step, windows in allowed.items():
        if not bool(windows.any()):
            kept[step] = torch.zeros_like(windows)
            continue
        trial_features = forward({**kept, step: windows})
        trial_score = quality(trial_features)
        keep = windows & (trial_score - score >= threshold)
        kept[step] = keep
        features = torch.where(keep.reshape(-1, *([1] * (features.ndim - 1))), trial_features, features)
        score = torch.where(keep, trial_score, score)
    return features, kept
