"""Dynamic anomaly detection: the content-adaptive ratio on token fields of known entropy and contrast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovseg_core.scclip import SCCLIPConfig
from ovseg_core.scclip.dynamic_anomaly_detection import (
    anomaly_ratio,
    detect_dynamic_anomalies,
    global_outlier_scores,
    local_contrast,
    robust_standardise,
    row_quantile,
    semantic_outlier_scores,
    spatial_entropy,
)

GRID = (14, 14)
N = 196


def _field(directions: np.ndarray, labels: np.ndarray, scale: np.ndarray | None = None) -> torch.Tensor:
    """``(1, N, D)`` tokens: token i is ``directions[labels[i]]`` times a positive ``scale[i]``."""
    x = directions[labels.reshape(-1)]
    if scale is not None:
        x = x * scale.reshape(-1, 1)
    return torch.tensor(x[None], dtype=torch.float32)


def _ratio(h: float, c: float, base: float = 0.05, wh: float = 0.5, wc: float = 0.5, cap: float = 0.15) -> float:
    return min(cap, base * (1 + wh * h + wc * c))


def test_uniform_field_has_zero_entropy_and_contrast_and_the_base_ratio() -> None:
    x = _field(np.array([[1.0, 2.0, -0.5]]), np.zeros(N, dtype=int))
    assert spatial_entropy(x, 0.4).item() == 0.0
    assert local_contrast(x, GRID).item() == pytest.approx(0.0, abs=1e-6)
    assert anomaly_ratio(x, GRID, SCCLIPConfig()).item() == pytest.approx(0.05, abs=1e-7)


def test_checkerboard_of_opposite_tokens() -> None:
    # tokens v and -v alternate: every 4-neighbour is opposite (cos -1), every diagonal one equal (cos 1)
    rows, cols = np.indices(GRID)
    x = _field(np.array([[0.3, -1.0, 2.0], [-0.3, 1.0, -2.0]]), (rows + cols) % 2)
    # two equal groups of alike tokens: H = ln 2 / ln 196
    h = math.log(2) / math.log(N)
    # (1 - cos) / 2 is 1 across a 4-neighbour, 0 across a diagonal: interior 4/8, edge 3/5, corner 2/3
    c = (144 * 4 / 8 + 48 * 3 / 5 + 4 * 2 / 3) / N
    assert spatial_entropy(x, 0.4).item() == pytest.approx(h, abs=1e-6)
    assert local_contrast(x, GRID).item() == pytest.approx(c, abs=1e-6)
    assert anomaly_ratio(x, GRID, SCCLIPConfig()).item() == pytest.approx(_ratio(h, c), abs=1e-7)


def test_three_stripes_of_orthogonal_tokens_with_varying_norms() -> None:
    # column widths 7, 4, 3: area shares 1/2, 2/7, 3/14; tokens scaled by random positive norms (cosines unchanged)
    labels = np.repeat(np.array([0] * 7 + [1] * 4 + [2] * 3)[None], 14, axis=0)
    scale = np.random.default_rng(0).uniform(0.5, 20.0, size=N)
    x = _field(np.eye(3), labels, scale)
    shares = np.array([7, 4, 3]) / 14
    h = float(-(shares * np.log(shares)).sum() / math.log(N))
    # the 4 columns next to the 2 stripe borders; orthogonal neighbours add 1/2 each:
    # interior rows 3 of 8 neighbours across (3/16), top and bottom rows 2 of 5 (1/5)
    c = 4 * (12 * 3 / 16 + 2 * 1 / 5) / N
    assert spatial_entropy(x, 0.4).item() == pytest.approx(h, abs=1e-6)
    assert local_contrast(x, GRID).item() == pytest.approx(c, abs=1e-6)
    assert anomaly_ratio(x, GRID, SCCLIPConfig()).item() == pytest.approx(_ratio(h, c), abs=1e-7)


def test_mutually_orthogonal_tokens_have_entropy_one_and_the_cap_binds_only_when_raised() -> None:
    grid = (4, 4)
    x = torch.eye(16)[None]  # 16 orthogonal tokens: no two alike, every neighbour orthogonal
    assert spatial_entropy(x, 0.4).item() == pytest.approx(1.0, abs=1e-6)
    assert local_contrast(x, grid).item() == pytest.approx(0.5, abs=1e-6)
    assert anomaly_ratio(x, grid, SCCLIPConfig()).item() == pytest.approx(0.05 * 1.75, abs=1e-7)
    raised = SCCLIPConfig(dynamic_base_ratio=0.1, dynamic_entropy_weight=2.0, dynamic_contrast_weight=2.0)
    assert anomaly_ratio(x, grid, raised).item() == pytest.approx(0.15, abs=1e-7)  # 0.1 * (1 + 2 + 1) = 0.4, capped


def test_entropy_threshold_decides_what_is_alike() -> None:
    # two directions at cosine 0.6: alike at tau = 0.4 (H = 0), unlike at tau = 0.7 (two halves: H = ln 2 / ln N)
    a, b = np.array([1.0, 0.0]), np.array([0.6, 0.8])
    x = _field(np.stack([a, b]), np.repeat(np.array([0, 1]), N // 2))
    assert spatial_entropy(x, 0.4).item() == pytest.approx(0.0, abs=1e-7)
    assert spatial_entropy(x, 0.7).item() == pytest.approx(math.log(2) / math.log(N), abs=1e-6)


def test_robust_standardise_uses_mad_then_mean_deviation() -> None:
    z = robust_standardise(torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [3.0, 3.0, 3.0, 3.0, 8.0], [2.0] * 5]))
    np.testing.assert_allclose(z[0].numpy(), np.array([-2, -1, 0, 1, 97]) / 1.4826, rtol=1e-6)
    # MAD 0: mean absolute deviation 1 times sqrt(pi / 2)
    np.testing.assert_allclose(z[1].numpy(), [0, 0, 0, 0, 5 / math.sqrt(math.pi / 2)], rtol=1e-6)
    assert z[2].abs().max().item() == 0.0


def test_row_quantile_matches_torch_quantile_per_row() -> None:
    scores = torch.randn(5, 37, generator=torch.Generator().manual_seed(3))
    q = torch.tensor([0.95, 0.9, 0.85, 0.5, 1.0])
    expected = torch.stack([torch.quantile(scores[i], q[i].item()) for i in range(5)])
    torch.testing.assert_close(row_quantile(scores, q), expected)


def test_global_and_semantic_scores_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    mid = rng.normal(size=(2, 9, 5)).astype(np.float32)
    k = 3
    got_global = global_outlier_scores(torch.tensor(x)).numpy()
    got_semantic = semantic_outlier_scores(torch.tensor(x), torch.tensor(mid), k).numpy()
    for b in range(2):
        med = np.median(x[b], axis=0)  # odd N: the median is unique
        np.testing.assert_allclose(got_global[b], np.linalg.norm(x[b] - med, axis=1), rtol=1e-5)
        mn = mid[b] / np.linalg.norm(mid[b], axis=1, keepdims=True)
        for i in range(9):
            sims = [(float(mn[i] @ mn[j]), j) for j in range(9) if j != i]
            nbrs = [j for _, j in sorted(sims, reverse=True)[:k]]
            assert got_semantic[b, i] == pytest.approx(np.linalg.norm(x[b, i] - x[b, nbrs].mean(0)), rel=1e-5)


def test_detection_flags_planted_high_norm_tokens_and_the_ratio_sets_the_count() -> None:
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor(np.indices(GRID)[1].reshape(-1) >= 7)  # left / right halves
    base = torch.randn(2, 32, generator=gen) * 3
    x = base[labels.long()] + 0.3 * torch.randn(N, 32, generator=gen)
    mid = base[labels.long()] + 0.3 * torch.randn(N, 32, generator=gen)
    planted = [17, 90, 151]
    x[planted] = x[planted] * 12.0
    flagged, ratio = detect_dynamic_anomalies(x[None], mid[None], GRID, SCCLIPConfig())
    assert flagged[0, planted].all()
    r = ratio.item()
    assert 0.05 <= r <= 0.10
    # distinct scores: exactly those strictly above the linear-interpolation quantile at 1 - r
    assert int(flagged.sum()) == N - 1 - math.floor((1 - r) * (N - 1))


def test_detection_errors_name_the_problem() -> None:
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="grid"):
        local_contrast(x, (3, 3))
    with pytest.raises(ValueError, match="dynamic_semantic_neighbors"):
        semantic_outlier_scores(x, torch.randn(1, 16, 4), 16)
    with pytest.raises(ValueError, match="mid must be"):
        semantic_outlier_scores(x, torch.randn(1, 15, 4), 3)
