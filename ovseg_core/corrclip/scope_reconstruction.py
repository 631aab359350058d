"""Scope reconstruction: the patch-similarity matrix S and the interaction matrix E."""

from __future__ import annotations

import torch

from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.mask_clustering import PADDING_ID

__all__ = ["scope_reconstruction", "similarity"]

# Largest tolerated deviation of a feature norm from 1 (features must be L2-normalised).
_NORM_TOLERANCE = 1e-3


def similarity(qk: torch.Tensor) -> torch.Tensor:
    """DINO similarity ``S = F F^T`` over the patches of each window.

    Args:
        qk: ``(B, hd, wd, C)`` L2-normalised DINO q+k features (row-major patch order).
    Returns:
        ``(B, N, N) float32`` cosine similarities, ``N = hd * wd``.
    """
    if qk.ndim != 4:
        raise ValueError(f"qk must be (B, hd, wd, C), got {tuple(qk.shape)}")
    f = qk.reshape(qk.shape[0], -1, qk.shape[-1]).float()
    norms = f.norm(dim=-1)
    if not bool(((norms - 1).abs() <= _NORM_TOLERANCE).all()):
        raise ValueError(
            f"qk features must be L2-normalised (norms in [{float(norms.min()):.4f}, {float(norms.max()):.4f}]); "
            "apply F.normalize(qk, dim=-1) first"
        )
    return f @ f.transpose(1, 2)


def scope_reconstruction(s: torch.Tensor, merged: torch.Tensor, cfg: CorrCLIPConfig) -> torch.Tensor:
    """Interaction matrix E of each window.

    With ``cfg.scope_reconstruction``:
    ``E_ij = (r_i == r_j >= 1) OR ((m0_i OR m0_j) AND S_ij > mean(S))`` where ``r`` are the merged
    ids, ``m0 = (r == 0)`` and ``mean(S)`` is over the window's full ``N x N`` matrix (padding
    included, as in the reference where DINO sees the padded crop). The region term is the OR
    over regions of ``outer(m_r, m_r)``, computed as an id-equality test (the same as a one-hot
    ``(N, Z)`` matrix times its transpose, without the ``Z`` dimension). Without scope
    reconstruction every patch interacts with every patch.

    Padding (``-1``, present only with ``cfg.padding == "ignore"``; under ``"reference"``
    padding is an ordinary merged region with its own block) is removed from every row and
    column, and each padding patch interacts only with itself, so every row of E is non-empty
    (their outputs are cut off by the caller).

    Args:
        s: ``(B, N, N) float`` similarities from :func:`similarity`.
        merged: ``(B, N) int64`` merged ids (``cluster_masks`` output, flattened row-major).
        cfg: CorrCLIP configuration.
    Returns:
        ``(B, N, N) bool`` E.
    """
    if s.ndim != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(f"S must be (B, N, N), got {tuple(s.shape)}")
    if merged.shape != s.shape[:2]:
        raise ValueError(f"merged ids must be (B, N) = {tuple(s.shape[:2])}, got {tuple(merged.shape)}")
    if merged.is_floating_point():
        raise ValueError(f"merged ids must be integers, got dtype {merged.dtype}")
    valid = merged != PADDING_ID
    if cfg.scope_reconstruction:
        e = (merged[:, :, None] == merged[:, None, :]) & (merged[:, :, None] >= 1)
        m0 = merged == 0
        above_mean = s > s.mean(dim=(1, 2), keepdim=True)
        e |= (m0[:, :, None] | m0[:, None, :]) & above_mean
    else:
        e = torch.ones_like(s, dtype=torch.bool)
    e &= valid[:, :, None] & valid[:, None, :]
    padding = ~valid
    e |= torch.diag_embed(padding)
    return e
