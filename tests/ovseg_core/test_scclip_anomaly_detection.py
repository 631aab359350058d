"""SC-CLIP anomaly detection: LOF variants against explicit formulas and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from ovseg_core.scclip import SCCLIPConfig, detect_anomalies, lof_scores
from ovseg_core.scclip.anomaly_detection import lof_variant, robust_zscores

N, D, K = 196, 16, 30


def _tokens_with_outliers(seed: int, planted: list[int], scale: float = 8.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, N, D, generator=g)
    x[0, planted] = x[0, planted] * scale  # far from the inlier cloud, each in its own direction
    return x


def _sq_dists(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def _authors_lof_explicit(x: np.ndarray, k: int) -> np.ndarray:
    """The authors' formula written out token by token (LRD = k / mean reach-dist, reach uses k-dist(i))."""
    d = _sq_dists(x)
    n = len(x)
    neighbours, kdist = [], np.empty(n)
    for i in range(n):
        order = [j for j in np.argsort(d[i], kind="stable") if j != i][:k]
        neighbours.append(order)
        kdist[i] = d[i, order[-1]]
    lrd = np.empty(n)
    for i in range(n):
        reach = [max(d[i, j], kdist[i]) for j in neighbours[i]]
        lrd[i] = k / np.mean(reach)
    return np.array([np.mean([lrd[j] / lrd[i] for j in neighbours[i]]) for i in range(n)])


def test_authors_variant_matches_explicit_formula() -> None:
    x = _tokens_with_outliers(0, [3, 50, 120])
    got = lof_scores(x, K, variant="lof")[0].numpy()
    np.testing.assert_allclose(got, _authors_lof_explicit(x[0].double().numpy(), K), rtol=1e-5)


def test_standard_variant_matches_sklearn_on_squared_distances() -> None:
    x = _tokens_with_outliers(1, [7, 77, 177])
    d = _sq_dists(x[0].double().numpy())
    ref = -LocalOutlierFactor(n_neighbors=K, metric="precomputed").fit(d).negative_outlier_factor_
    np.testing.assert_allclose(lof_scores(x, K, variant="sklearn")[0].numpy(), ref, rtol=1e-5)


def test_variants_differ_but_agree_on_planted_outliers() -> None:
    planted = [0, 13, 98, 195]
    x = _tokens_with_outliers(2, planted, scale=10.0)
    a, s = lof_scores(x, K, "lof")[0], lof_scores(x, K, "sklearn")[0]
    assert not torch.allclose(a, s)
    assert set(torch.topk(a, 4).indices.tolist()) == set(planted) == set(torch.topk(s, 4).indices.tolist())


@pytest.mark.parametrize("detector", ["lof", "sklearn_lof"])
def test_top_five_percent_flags_exactly_the_planted_outliers(detector: str) -> None:
    planted = [1, 20, 33, 60, 61, 90, 130, 150, 171, 194]  # 10 of 196 = the size of the top 5 %
    x = _tokens_with_outliers(3, planted, scale=10.0)
    flagged = detect_anomalies(x, SCCLIPConfig(detector=detector))
    assert flagged.dtype == torch.bool and flagged.shape == (1, N)
    assert torch.nonzero(flagged[0]).flatten().tolist() == planted


def test_quantile_selection_counts_like_torch_quantile() -> None:
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(4))
    flagged = detect_anomalies(x, SCCLIPConfig())
    scores = lof_scores(x, K)
    for b in range(2):
        thr = torch.quantile(scores[b], 0.95)
        assert flagged[b].sum() == (scores[b] > thr).sum() == 10  # 0.95 quantile of 196 -> 10 above


def test_batch_rows_are_independent() -> None:
    x = torch.cat([_tokens_with_outliers(5, [4, 40]), _tokens_with_outliers(6, [100])])
    both = lof_scores(x, K)
    torch.testing.assert_close(both[1], lof_scores(x[1:], K)[0])
    torch.testing.assert_close(detect_anomalies(x, SCCLIPConfig())[0], detect_anomalies(x[:1], SCCLIPConfig())[0])


def test_l2norm_topk_flags_the_largest_norms() -> None:
    planted = [5, 6, 7]
    x = torch.randn(1, N, D, generator=torch.Generator().manual_seed(7))
    x[0, planted] *= 20.0
    flagged = detect_anomalies(x, SCCLIPConfig(detector="l2norm_topk", topk=3))
    assert torch.nonzero(flagged[0]).flatten().tolist() == planted
    assert detect_anomalies(x, SCCLIPConfig(detector="l2norm_topk", topk=10))[0].sum() == 10
    assert detect_anomalies(x, SCCLIPConfig(detector="l2norm_topk", topk=0))[0].sum() == 0


def test_adaptive_contamination_flags_only_real_outliers() -> None:
    cfg = SCCLIPConfig(adaptive_contamination=True)
    clean = torch.randn(1, N, D, generator=torch.Generator().manual_seed(8))
    assert detect_anomalies(clean, SCCLIPConfig())[0].sum() == 10  # a fixed quantile always flags 5 %
    assert detect_anomalies(clean, cfg)[0].sum() < 10
    planted = [10, 11, 150, 151]
    dirty = _tokens_with_outliers(8, planted, scale=10.0)
    assert torch.nonzero(detect_anomalies(dirty, cfg)[0]).flatten().tolist() == planted


def test_robust_zscores_known_values() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])  # median 3, MAD 1
    torch.testing.assert_close(robust_zscores(s), (s - 3.0) / 1.4826)
    flat = robust_zscores(torch.tensor([[1.0, 1.0, 1.0, 5.0]]))  # MAD 0
    assert flat[0, :3].eq(0).all() and torch.isinf(flat[0, 3])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"n_neighbors must be in 1..N-1 = 1..9"):
        lof_scores(torch.randn(1, 10, 4), 10)
    with pytest.raises(ValueError, match="variant must be one of"):
        lof_scores(torch.randn(1, 40, 4), 5, variant="median")
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        detect_anomalies(torch.randn(40, 4), SCCLIPConfig())


def test_precomputed_lof_scores_are_reused() -> None:
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(5))
    for detector in ("lof", "sklearn_lof"):
        cfg = SCCLIPConfig(detector=detector, n_neighbors=5)
        lof = lof_scores(x, 5, variant=lof_variant(detector))
        assert torch.equal(detect_anomalies(x, cfg, lof=lof), detect_anomalies(x, cfg))
        # the flags follow the given scores: mark two tokens as the only outliers
        planted = torch.ones(2, 40)
        planted[:, [3, 7]] = 50.0
        assert detect_anomalies(x, cfg, lof=planted)[:, [3, 7]].all()
    with pytest.raises(ValueError, match=r"lof must be the \(B, N\) = \(2, 40\) scores"):
        detect_anomalies(x, SCCLIPConfig(), lof=torch.ones(2, 39))
