"""Value reconstruction: the attention A applied to CLIP values, restricted to the scope E."""

from __future__ import annotations

import torch

from ovseg_core.corrclip.config import CorrCLIPConfig

__all__ = ["value_reconstruction"]


def value_reconstruction(s: torch.Tensor, e: torch.Tensor, cfg: CorrCLIPConfig) -> torch.Tensor:
    """Row-wise attention over the interaction scope.

    With ``cfg.value_reconstruction``: ``A = softmax(cfg.tau * S)`` over the entries of each row
    where E is true (the others get weight 0; ``tau`` multiplies S). Without it: uniform
    attention over E, ``A_ij = E_ij / sum_j E_ij``.

    Args:
        s: ``(B, N, N) float`` similarities.
        e: ``(B, N, N) bool`` interaction matrix; every row must have a true entry.
        cfg: CorrCLIP configuration.
    Returns:
        ``(B, N, N) float32`` A, rows summing to 1.
    """
    if s.shape != e.shape or s.ndim != 3:
        raise ValueError(f"S {tuple(s.shape)} and E {tuple(e.shape)} must both be (B, N, N)")
    if e.dtype != torch.bool:
        raise ValueError(f"E must be a bool tensor, got dtype {e.dtype}")
    if not bool(e.any(dim=-1).all()):
        raise ValueError("E has an empty row (a patch with no interaction); build E with scope_reconstruction")
    if cfg.value_reconstruction:
        logits = (s.float() * cfg.tau).masked_fill(~e, float("-inf"))
        return logits.softmax(dim=-1)
    weights = e.float()
    return weights / weights.sum(dim=-1, keepdim=True)
