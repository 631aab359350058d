"""SC-CLIP anomaly repair: replace each anomaly token by the mean of its valid 3x3 neighbours.

Valid neighbours are the 8 surrounding grid positions that lie inside the grid and are not
anomalies themselves (the centre is excluded). All anomalies are repaired simultaneously from
the unrepaired tokens; an anomaly without any valid neighbour keeps its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["repair_anomalies"]


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
