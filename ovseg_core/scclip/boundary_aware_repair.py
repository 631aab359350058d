"""Boundary-aware repair (design-document extension (1), off in paper mode).

The paper replaces an anomaly token by the mean of its valid 3x3 neighbours (inside the
grid, not anomalies themselves): on a semantic boundary that mean mixes two objects. The
design document proposes to repair such a token from the neighbours on its own side only.

ovseg's definition of "on a boundary" and "its own side" (the document names the signal,
mid-layer similarity, not the rule): for anomaly i with valid neighbours ``V(i)`` take
``s_j = cos(mid_i, mid_j)`` for ``j in V(i)`` (pre-adjust block tokens, before repair). Sort
the ``m = |V(i)|`` values and split them into a low and a high group at the cut that
maximises the between-group variance ``t (m - t) (mean_high - mean_low)^2`` (the exact 1-D
two-means / Otsu split; ties -> the smallest cut). The token lies on a boundary when
``m >= 2`` and ``mean_high - mean_low >= boundary_gap``; it is then repaired from the high
group (the neighbours most like itself, i.e. its own side), otherwise from all of ``V(i)``
as in the paper. An anomaly without valid neighbours keeps its value.
"""

from __future__ import annotations

import torch

from ovseg_core.scclip.anomaly_repair import ring_neighbours

__all__ = ["boundary_aware_repair", "own_side_neighbours", "repair_from_neighbours"]


def _check(x: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int]) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) patch tokens, got shape {tuple(x.shape)}")
    b, n, _ = x.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} positions but x has N={n} tokens")
    if anomalies.shape != (b, n) or anomalies.dtype != torch.bool:
        raise ValueError(
            f"anomalies must be a (B, N) = ({b}, {n}) bool mask, got {tuple(anomalies.shape)} {anomalies.dtype}"
        )


def _valid_neighbours(anomalies: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 8)`` ring indices and the ``(B, N, 8)`` mask of ring neighbours inside the grid and not anomalies."""
    idx, inside = ring_neighbours(grid, anomalies.device)
    return idx, inside[None] & ~anomalies[:, idx]


def own_side_neighbours(
    mid_sim: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int], gap: float
) -> torch.Tensor:
    """The ring neighbours each token is repaired from under boundary-aware repair.

    Args:
        mid_sim: ``(B, N, N)`` cosine similarity of the mid-layer tokens (before repair).
        anomalies: ``(B, N) bool`` anomaly mask.
        grid: ``(gh, gw)``.
        gap: ``boundary_gap``; the two groups' means must differ by at least this.
    Returns:
        ``(B, N, 8) bool`` over :data:`~ovseg_core.scclip.anomaly_repair.RING_OFFSETS`: the valid
        neighbours, restricted to the high-similarity group for tokens on a boundary.
    """
    b, n = anomalies.shape
    if mid_sim.shape != (b, n, n):
        raise ValueError(f"mid_sim must be (B, N, N) = ({b}, {n}, {n}), got {tuple(mid_sim.shape)}")
    idx, valid = _valid_neighbours(anomalies, grid)
    s = torch.gather(mid_sim.to(torch.float64), 2, idx[None].expand(b, -1, -1))  # (B, N, 8)
    vals = torch.where(valid, s, torch.full_like(s, float("inf"))).sort(dim=-1).values  # valid values first
    m = valid.sum(dim=-1)  # (B, N)
    csum = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals)).cumsum(dim=-1)
    total = csum.gather(2, (m - 1).clamp_min(0)[..., None])  # (B, N, 1)
    t = torch.arange(1, vals.shape[-1], device=vals.device, dtype=torch.float64)  # cut after t values: 1..7
    low_sum = csum[..., :-1]
    mf = m[..., None].to(torch.float64)
    high_n = (mf - t).clamp_min(1.0)
    mean_gap = (total - low_sum) / high_n - low_sum / t
    between = torch.where(t < mf, t * (mf - t) * mean_gap**2, torch.full_like(mean_gap, -1.0))
    best = between.argmax(dim=-1, keepdim=True)  # first maximum = smallest cut
    best_gap = mean_gap.gather(2, best)[..., 0]
    cut_value = vals.gather(2, best + 1)[..., 0]  # smallest value of the high group
    boundary = (m >= 2) & (best_gap >= gap)
    return valid & (~boundary[..., None] | (s >= cut_value[..., None]))


def repair_from_neighbours(
    x: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int], use: torch.Tensor
) -> torch.Tensor:
    """Replace each anomaly by the mean of the ring neighbours marked in ``use``.

    Args:
        x: ``(B, N, D)`` patch tokens, row-major over ``grid``.
        anomalies: ``(B, N) bool`` tokens to repair.
        grid: ``(gh, gw)``.
        use: ``(B, N, 8) bool`` neighbours to average (:data:`RING_OFFSETS` order); anomalous or
            out-of-grid neighbours are never used.
    Returns:
        ``(B, N, D)`` tokens, same dtype; an anomaly without a usable neighbour keeps its value.
    """
    _check(x, anomalies, grid)
    b, n, d = x.shape
    if use.shape != (b, n, 8) or use.dtype != torch.bool:
        raise ValueError(f"use must be a (B, N, 8) = ({b}, {n}, 8) bool mask, got {tuple(use.shape)} {use.dtype}")
    idx, valid = _valid_neighbours(anomalies, grid)
    weights = (use & valid).to(torch.float32)
    count = weights.sum(dim=-1, keepdim=True)  # (B, N, 1)
    xf = x.float()
    neighbours = torch.gather(xf, 1, idx.reshape(1, n * 8, 1).expand(b, -1, d)).reshape(b, n, 8, d)
    mean = (neighbours * weights[..., None]).sum(dim=2) / count.clamp_min(1.0)
    update = anomalies[..., None] & (count > 0)
    return torch.where(update, mean, xf).to(x.dtype)


def boundary_aware_repair(
    x: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int], mid_sim: torch.Tensor, gap: float
) -> torch.Tensor:
    """Boundary-aware repair of ``(B, N, D)`` tokens (module docstring); ``mid_sim`` ``(B, N, N)`` before repair."""
    _check(x, anomalies, grid)
    return repair_from_neighbours(x, anomalies, grid, own_side_neighbours(mid_sim, anomalies, grid, gap))
