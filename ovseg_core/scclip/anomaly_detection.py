"""SC-CLIP anomaly detection: find the anomaly tokens of the penultimate layer.

The paper detects anomaly tokens (a few patch tokens with abnormally high norm that attract
the attention of every other token) with a Local Outlier Factor over the patch tokens of the
output of block L-1, k = 30 neighbours under squared Euclidean distance, and flags the tokens
whose LOF exceeds the (1 - 0.05) quantile of the image's scores (about 10 of 196 tokens).

Local Outlier Factor with ``d`` the squared Euclidean distance, ``N_k(i)`` the k nearest
neighbours of i (i itself excluded) and ``k-dist(i)`` the distance to the k-th of them::

    reach-dist(i, j) = max(d(i, j), k-dist(j))     standard LOF ("sklearn")
    reach-dist(i, j) = max(d(i, j), k-dist(i))     the authors' variant ("lof")
    lrd(i)           = 1 / (mean_{j in N_k(i)} reach-dist(i, j) + eps)
    LOF(i)           = mean_{j in N_k(i)} lrd(j) / lrd(i)

In the authors' variant every neighbour j of i has d(i, j) <= k-dist(i), so reach-dist(i, j)
= k-dist(i) and LOF(i) = k-dist(i) * mean_j 1 / k-dist(j) (up to eps). The authors scale lrd
by k; that constant cancels in the ratio.

``adaptive_contamination`` (an extension, off in paper mode): a fixed quantile always flags
5 % of the tokens, also in an image without anomaly tokens, where it then "repairs" ordinary
tokens. With the option on, a token is flagged only if it is selected by the detector *and*
its score is a robust outlier of the image's score distribution:
``(score - median) / (1.4826 * MAD) > adaptive_z`` (median and MAD per image). The number of
flagged tokens thus adapts to the image, between 0 and the detector's budget. LOF scores
are right-skewed: on Gaussian clouds of 196 tokens the largest robust z-score stays below
about 7, whereas high-norm anomaly tokens score in the hundreds; hence the default 8.
"""

from __future__ import annotations

import torch

from ovseg_core.scclip.config import DetectorParams

__all__ = ["LOF_VARIANTS", "detect_anomalies", "lof_scores", "lof_variant", "robust_zscores"]

LOF_VARIANTS: tuple[str, ...] = ("lof", "sklearn")
"""``"lof"``: the authors' reach-dist with k-dist(i); ``"sklearn"``: standard LOF with k-dist(j)."""

_MAD_TO_STD: float = 1.4826  # MAD of a normal distribution times this = its standard deviation


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(B, N, N) float64`` of ``(B, N, D)`` rows.

    Computed in float64 through the Gram matrix (exact enough for CLIP's high-norm tokens,
    without the ``(B, N, N, D)`` difference tensor); the diagonal is set to exactly 0.
    """
    x64 = x.to(torch.float64)
    sq = (x64 * x64).sum(dim=-1)
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.matmul(x64, x64.transpose(1, 2))
    d = d.clamp_min(0.0)
    d.diagonal(dim1=1, dim2=2).zero_()
    return d


def lof_scores(x: torch.Tensor, n_neighbors: int, variant: str = "lof", eps: float = 1e-10) -> torch.Tensor:
    """Local Outlier Factor of every token under squared Euclidean distance.

    Args:
        x: ``(B, N, D)`` float tokens (one set of N tokens per image).
        n_neighbors: k, the number of neighbours (the token itself excluded); ``1 <= k < N``.
        variant: ``"lof"`` (authors' reach-dist with k-dist(i)) or ``"sklearn"`` (standard LOF,
            k-dist(j); equals ``-LocalOutlierFactor(metric="precomputed").negative_outlier_factor_``
            on the squared-distance matrix).
        eps: added to the mean reachability distance before inverting it.
    Returns:
        ``(B, N) float32`` LOF scores; about 1 for inliers, larger for outliers.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)}")
    if variant not in LOF_VARIANTS:
        raise ValueError(f"variant must be one of {LOF_VARIANTS}, got {variant!r}")
    b, n, _ = x.shape
    if not 1 <= n_neighbors < n:
        raise ValueError(f"n_neighbors must be in 1..N-1 = 1..{n - 1} for N={n} tokens, got {n_neighbors}")
    d = _squared_distances(x)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # a token is not its own neighbour
    knn_d, knn_idx = torch.topk(d, k=n_neighbors, dim=-1, largest=False)  # ascending
    k_dist = knn_d[..., -1]  # (B, N)
    if variant == "lof":
        reach = torch.maximum(knn_d, k_dist[..., None])
    else:
        k_dist_j = torch.gather(k_dist, 1, knn_idx.reshape(b, -1)).reshape(b, n, n_neighbors)
        reach = torch.maximum(knn_d, k_dist_j)
    lrd = 1.0 / (reach.mean(dim=-1) + eps)  # (B, N)
    lrd_neighbours = torch.gather(lrd, 1, knn_idx.reshape(b, -1)).reshape(b, n, n_neighbors)
    return (lrd_neighbours / lrd[..., None]).mean(dim=-1).to(torch.float32)


def robust_zscores(scores: torch.Tensor) -> torch.Tensor:
    """``(scores - median) / (1.4826 * MAD)`` per row of ``(B, N)`` scores; ``(B, N) float32``.

    A row with zero MAD gives +inf for scores above its median, 0 at the median and -inf below.
    """
    s = scores.to(torch.float32)
    med = s.median(dim=-1, keepdim=True).values
    mad = (s - med).abs().median(dim=-1, keepdim=True).values * _MAD_TO_STD
    dev = s - med
    return torch.where(dev == 0, torch.zeros_like(dev), dev / mad)


def lof_variant(detector: str) -> str:
    """The :func:`lof_scores` variant of a LOF detector (``"lof"`` for ``l2norm_topk``, which has none)."""
    return "sklearn" if detector == "sklearn_lof" else "lof"


def detect_anomalies(x: torch.Tensor, cfg: DetectorParams, lof: torch.Tensor | None = None) -> torch.Tensor:
    """Flag the anomaly tokens of each image.

    Args:
        x: ``(B, N, D)`` patch tokens (CLS excluded) of the penultimate layer.
        cfg: detector fields (``SCCLIPConfig`` or the combined method's config): ``detector``
            ``"lof"`` / ``"sklearn_lof"`` flag scores strictly above the per-image
            ``(1 - contamination)`` quantile (linear interpolation, as ``torch.quantile``);
            ``"l2norm_topk"`` flags the ``topk`` tokens of largest L2 norm. With
            ``adaptive_contamination`` a flagged token must also have a robust z-score of its
            detector score above ``adaptive_z`` (see the module docstring).
        lof: the LOF detectors' ``(B, N)`` scores if already computed, i.e.
            ``lof_scores(x, cfg.n_neighbors, lof_variant(cfg.detector), cfg.lof_eps)``; ignored by
            ``l2norm_topk``.
    Returns:
        ``(B, N) bool`` anomaly mask.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)}")
    b, n, _ = x.shape
    if cfg.detector == "l2norm_topk":
        scores = x.to(torch.float32).norm(dim=-1)
        k = min(cfg.topk, n)
        flagged = torch.zeros(b, n, dtype=torch.bool, device=x.device)
        if k > 0:
            flagged.scatter_(1, torch.topk(scores, k, dim=-1).indices, True)
    elif cfg.detector in ("lof", "sklearn_lof"):
        if lof is None:
            lof = lof_scores(x, cfg.n_neighbors, variant=lof_variant(cfg.detector), eps=cfg.lof_eps)
        elif lof.shape != (b, n):
            raise ValueError(f"lof must be the (B, N) = ({b}, {n}) scores of x, got shape {tuple(lof.shape)}")
        scores = lof
        threshold = torch.quantile(scores, 1.0 - cfg.contamination, dim=-1, keepdim=True)
        flagged = scores > threshold
    else:
        raise ValueError(f"unknown detector {cfg.detector!r}; expected 'lof', 'sklearn_lof' or 'l2norm_topk'")
    if cfg.adaptive_contamination:
        flagged = flagged & (robust_zscores(scores) > cfg.adaptive_z)
    return flagged
