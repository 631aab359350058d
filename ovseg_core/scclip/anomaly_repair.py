"""SC-CLIP anomaly repair: replace each anomaly token by the mean of its valid 3x3 neighbours.

Valid neighbours are the 8 surrounding grid positions that lie inside the grid and are not
anomalies themselves (the centre is excluded). All anomalies are repaired simultaneously from
the unrepaired tokens; an anomaly without any valid neighbour keeps its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RING_OFFSETS", "repair_anomalies", "ring_neighbours"]

RING_OFFSETS: tuple[tuple[int, int], ...] = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))
"""``(row, column)`` offsets of the 8 positions around a token (its 3x3 ring), row-major."""


def ring_neighbours(grid: tuple[int, int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the 3x3 ring of every token of a row-major ``(gh, gw)`` grid.

    Returns:
        ``(N, 8) int64`` neighbour indices in :data:`RING_OFFSETS` order (0 where outside the
        grid) and the ``(N, 8) bool`` mask of the positions inside the grid.
    """
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    dr = torch.tensor([o[0] for o in RING_OFFSETS], device=device)
    dc = torch.tensor([o[1] for o in RING_OFFSETS], device=device)
    r, c = rows[:, None] + dr, cols[:, None] + dc
    inside = (r >= 0) & (r < gh) & (c >= 0) & (c < gw)
    return torch.where(inside, r * gw + c, torch.zeros_like(r)), inside


def _ring_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(channels, 1, 3, 3)`` depthwise kernel of ones with a zero centre."""
    kernel = torch.ones(channels, 1, 3, 3, dtype=dtype, device=device)
    kernel[:, :, 1, 1] = 0.0
    return kernel


def repair_anomalies(x: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Repair anomaly tokens on the token grid.

    Args:
        x: ``(B, N, D)`` patch tokens (no CLS), row-major over ``grid``.
        anomalies: ``(B, N) bool`` mask of the tokens to repair.
        grid: ``(gh, gw)`` with ``gh * gw == N``.
    Returns:
        ``(B, N, D)`` tokens, same dtype; non-anomalies unchanged, each anomaly with at least
        one valid neighbour replaced by the mean of its valid neighbours.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) patch tokens, got shape {tuple(x.shape)}")
    b, n, d = x.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {grid} has {gh * gw} positions but x has N={n} tokens")
    if anomalies.shape != (b, n) or anomalies.dtype != torch.bool:
        raise ValueError(
            f"anomalies must be a (B, N) = ({b}, {n}) bool mask, got {tuple(anomalies.shape)} {anomalies.dtype}"
        )
    dtype = x.dtype if x.is_floating_point() else torch.float32
    valid = (~anomalies).to(dtype).reshape(b, 1, gh, gw)
    fmap = x.to(dtype).permute(0, 2, 1).reshape(b, d, gh, gw)
    # zero padding = out-of-grid positions contribute neither to the sum nor to the count
    neighbour_sum = F.conv2d(fmap * valid, _ring_kernel(d, dtype, x.device), padding=1, groups=d)
    neighbour_count = F.conv2d(valid, _ring_kernel(1, dtype, x.device), padding=1)
    mean = neighbour_sum / neighbour_count.clamp_min(1.0)
    update = anomalies.reshape(b, 1, gh, gw) & (neighbour_count > 0)
    repaired = torch.where(update, mean, fmap)
    return repaired.reshape(b, d, n).permute(0, 2, 1).to(x.dtype)
