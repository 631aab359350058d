"""Dynamic anomaly detection (design-document extension (1), off in paper mode).

The paper flags a fixed 5 % of the penultimate-layer tokens by LOF. The SC-CLIP design
document proposes a ratio that follows the window's complexity and a detector that combines
three outlier scores. ovseg defines what the document leaves open as follows (all on the
patch tokens ``x`` of block L-1 of one window, ``N`` tokens on a ``(gh, gw)`` grid).

**Spatial entropy** ``H`` in [0, 1]: a plug-in estimate of the entropy of the token
distribution. Token i's *mass* ``m_i = |{j : cos(x_i, x_j) >= tau}| / N`` (``tau`` =
``complexity_sim_threshold``; ``j = i`` always counts, so ``m_i >= 1/N``) and
``H = -(1/N) sum_i ln m_i / ln N``. For a window made of regions of identical tokens that are
unlike each other (cos < tau), ``m_i`` is the area share ``p_r`` of i's region and ``H`` is the
Shannon entropy ``-sum_r p_r ln p_r`` of the area shares divided by its maximum ``ln N``:
0 for a uniform window, 1 when no two tokens are alike.

**Local contrast** ``C`` in [0, 1]: the mean over tokens of the mean of ``(1 - cos) / 2`` over
the token's ring neighbours inside the grid (the 3x3 ring of anomaly repair): 0 when every
token equals its neighbours, 1/2 for orthogonal neighbours, 1 for opposite ones.

**Ratio** (document): ``ratio = min(max_ratio, base * (1 + w_H H + w_C C))`` with the
document's base 0.05, ``w_H = w_C = 0.5`` and cap 0.15 (at these values the ratio lies in
[0.05, 0.10], so the cap only binds when base or weights are raised).

**Scores** (document: a local LOF with k = 10, a global and a semantic outlier score; ovseg
defines the latter two and the combination):

- local ``s_L``: LOF with ``dynamic_lof_neighbors`` neighbours (variant of ``detector``);
- global ``s_G``: ``||x_i - med(x)||_2``, ``med`` the coordinate-wise median token of the window;
- semantic ``s_S``: ``||x_i - mean_{j in S_k(i)} x_j||_2``, ``S_k(i)`` the k tokens (i excluded)
  of largest mid-layer cosine to i (pre-adjust block, before repair; k = ``dynamic_semantic_neighbors``):
  how far the token has drifted from the tokens that were like it at mid depth.

Each score is standardised per window, ``z = (s - median) / scale`` with ``scale = 1.4826 MAD``
(or ``1.2533`` times the mean absolute deviation from the median where the MAD is 0; ``z = 0``
where both are 0), and the combined score is ``w_L z_L + w_G z_G + w_S z_S``
(``dynamic_score_weights``, default equal). Tokens whose combined score is strictly above the
window's ``(1 - ratio)`` quantile (linear interpolation, as ``torch.quantile``) are anomalies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ovseg_core.scclip.anomaly_detection import lof_scores, lof_variant
from ovseg_core.scclip.anomaly_repair import ring_neighbours
from ovseg_core.scclip.config import SCCLIPConfig
from ovseg_core.scclip.self_adjusting import cosine_similarity

__all__ = [
    "anomaly_ratio",
    "complexity",
    "detect_dynamic_anomalies",
    "global_outlier_scores",
    "local_contrast",
    "robust_standardise",
    "row_quantile",
    "semantic_outlier_scores",
    "spatial_entropy",
]

_MAD_TO_STD: float = 1.4826  # MAD of a normal distribution times this = its standard deviation
_MEAN_AD_TO_STD: float = math.sqrt(math.pi / 2)  # 1.2533: mean absolute deviation of a normal times this = its std


def _check_tokens(x: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)}")
    if grid is not None and grid[0] * grid[1] != x.shape[1]:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} positions but x has N={x.shape[1]} tokens")


def spatial_entropy(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Normalised spatial entropy ``H`` of each window's tokens (module docstring).

    Args:
        x: ``(B, N, D)`` tokens, ``N >= 2``.
        threshold: ``tau``; tokens with cosine ``>= tau`` are alike.
    Returns:
        ``(B,) float32`` in [0, 1].
    """
    _check_tokens(x)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"spatial entropy needs N >= 2 tokens, got {n}")
    alike = cosine_similarity(x.float()) >= threshold
    alike.diagonal(dim1=1, dim2=2).fill_(True)
    mass = alike.to(torch.float64).mean(dim=-1)
    return (-(mass.log().mean(dim=-1)) / math.log(n)).clamp(0.0, 1.0).to(torch.float32)


def local_contrast(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Local contrast ``C``: mean over tokens of the mean ``(1 - cos) / 2`` to their ring neighbours.

    Args:
        x: ``(B, N, D)`` tokens, row-major over ``grid``.
        grid: ``(gh, gw)``.
    Returns:
        ``(B,) float32`` in [0, 1] (0 for a 1x1 grid).
    """
    _check_tokens(x, grid)
    idx, inside = ring_neighbours(grid, x.device)
    xn = F.normalize(x.float(), dim=-1)
    cos = (xn[:, :, None, :] * xn[:, idx]).sum(dim=-1)  # (B, N, 8)
    dissimilarity = ((1.0 - cos) / 2.0) * inside
    count = inside.sum(dim=-1).clamp_min(1)
    per_token = dissimilarity.sum(dim=-1) / count
    return per_token.mean(dim=-1).clamp(0.0, 1.0)


def complexity(x: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """``(H + C) / 2``: the window complexity in [0, 1] used to skip later steps (``(B,) float32``)."""
    return 0.5 * (spatial_entropy(x, threshold) + local_contrast(x, grid))


def anomaly_ratio(x: torch.Tensor, grid: tuple[int, int], cfg: SCCLIPConfig) -> torch.Tensor:
    """The document's content-adaptive ratio ``min(max, base * (1 + w_H H + w_C C))``, ``(B,) float32``."""
    h = spatial_entropy(x, cfg.complexity_sim_threshold)
    c = local_contrast(x, grid)
    ratio = cfg.dynamic_base_ratio * (1.0 + cfg.dynamic_entropy_weight * h + cfg.dynamic_contrast_weight * c)
    return ratio.clamp(max=cfg.dynamic_max_ratio)


def global_outlier_scores(x: torch.Tensor) -> torch.Tensor:
    """``||x_i - med(x)||_2`` with the coordinate-wise median token of each window; ``(B, N) float32``."""
    _check_tokens(x)
    xf = x.float()
    return (xf - xf.median(dim=1, keepdim=True).values).norm(dim=-1)


def semantic_outlier_scores(x: torch.Tensor, mid: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each token to the mean of its k mid-layer similarity neighbours.

    Args:
        x: ``(B, N, D)`` penultimate-layer tokens.
        mid: ``(B, N, Dm)`` mid-layer (pre-adjust block) tokens of the same positions.
        k: neighbours, ``1 <= k < N``; neighbours are the k tokens of largest ``cos(mid_i, mid_j)``, ``j != i``.
    Returns:
        ``(B, N) float32`` ``||x_i - mean_{j in S_k(i)} x_j||_2``.
    """
    _check_tokens(x)
    b, n, _ = x.shape
    if mid.ndim != 3 or mid.shape[:2] != (b, n):
        raise ValueError(f"mid must be (B, N, Dm) = ({b}, {n}, Dm), got {tuple(mid.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"dynamic_semantic_neighbors must be in 1..N-1 = 1..{n - 1} for N={n} tokens, got {k}")
    sim = cosine_similarity(mid.float())
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    nbrs = torch.topk(sim, k, dim=-1).indices  # (B, N, k)
    xf = x.float()
    target = torch.gather(xf, 1, nbrs.reshape(b, n * k, 1).expand(-1, -1, xf.shape[-1])).reshape(b, n, k, -1).mean(2)
    return (xf - target).norm(dim=-1)


def robust_standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per-row ``(s - median) / scale`` of ``(B, N)`` scores (scale: module docstring); ``(B, N) float32``."""
    s = scores.to(torch.float32)
    dev = s - s.median(dim=-1, keepdim=True).values
    mad_scale = dev.abs().median(dim=-1, keepdim=True).values * _MAD_TO_STD
    mean_scale = dev.abs().mean(dim=-1, keepdim=True) * _MEAN_AD_TO_STD
    scale = torch.where(mad_scale > 0, mad_scale, mean_scale)
    return torch.where(scale > 0, dev / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(dev))


def row_quantile(scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row quantile ``q[b]`` of ``(B, N)`` scores with ``torch.quantile``'s linear interpolation; ``(B,)``."""
    if scores.ndim != 2 or q.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (B, N) and q (B,), got {tuple(scores.shape)} and {tuple(q.shape)}")
    s = scores.sort(dim=-1).values
    pos = q.to(s.dtype).clamp(0.0, 1.0) * (s.shape[1] - 1)
    lo = pos.floor().long().clamp(0, s.shape[1] - 1)
    hi = pos.ceil().long().clamp(0, s.shape[1] - 1)
    s_lo, s_hi = s.gather(1, lo[:, None])[:, 0], s.gather(1, hi[:, None])[:, 0]
    return s_lo + (pos - lo.to(s.dtype)) * (s_hi - s_lo)


def detect_dynamic_anomalies(
    x: torch.Tensor, mid: torch.Tensor, grid: tuple[int, int], cfg: SCCLIPConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic anomaly detection of each window (module docstring).

    Args:
        x: ``(B, N, D)`` penultimate-layer patch tokens (CLS excluded), row-major over ``grid``.
        mid: ``(B, N, Dm)`` pre-adjust block patch tokens (before repair).
        grid: ``(gh, gw)``.
        cfg: the ``dynamic_*`` and ``complexity_sim_threshold`` fields, ``detector`` (LOF variant), ``lof_eps``.
    Returns:
        ``(B, N) bool`` anomalies and the ``(B,) float32`` ratio used per window.
    """
    _check_tokens(x, grid)
    ratio = anomaly_ratio(x, grid, cfg)
    w_local, w_global, w_semantic = cfg.dynamic_score_weights
    local = lof_scores(x, cfg.dynamic_lof_neighbors, variant=lof_variant(cfg.detector), eps=cfg.lof_eps)
    combined = (
        w_local * robust_standardise(local)
        + w_global * robust_standardise(global_outlier_scores(x))
        + w_semantic * robust_standardise(semantic_outlier_scores(x, mid, cfg.dynamic_semantic_neighbors))
    )
    threshold = row_quantile(combined, 1.0 - ratio)
    return combined > threshold[:, None], ratio
