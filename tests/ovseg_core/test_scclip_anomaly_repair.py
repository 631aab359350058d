"""SC-CLIP anomaly repair on hand-made grids."""

from __future__ import annotations

import pytest
import torch

from ovseg_core.scclip import repair_anomalies


def _grid_tokens(values: list[list[float]]) -> torch.Tensor:
    """(1, gh*gw, 2) tokens: channel 0 = the given value, channel 1 = 10 * value."""
    v = torch.tensor(values, dtype=torch.float32).flatten()
    return torch.stack([v, 10 * v], dim=-1)[None]


def _mask(gh: int, gw: int, cells: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(1, gh * gw, dtype=torch.bool)
    for r, c in cells:
        m[0, r * gw + c] = True
    return m


def test_interior_anomaly_becomes_the_mean_of_its_eight_neighbours() -> None:
    vals = [[1, 2, 3, 4], [5, 100, 7, 8], [9, 10, 11, 12]]
    out = repair_anomalies(_grid_tokens(vals), _mask(3, 4, [(1, 1)]), (3, 4))
    expected = (1 + 2 + 3 + 5 + 7 + 9 + 10 + 11) / 8
    torch.testing.assert_close(out[0, 5], torch.tensor([expected, 10 * expected]))
    unchanged = torch.ones(12, dtype=torch.bool)
    unchanged[5] = False
    torch.testing.assert_close(out[0, unchanged], _grid_tokens(vals)[0, unchanged])


def test_corner_and_edge_use_only_in_grid_neighbours() -> None:
    vals = [[100, 2, 3], [4, 5, 6], [7, 100, 9]]
    out = repair_anomalies(_grid_tokens(vals), _mask(3, 3, [(0, 0), (2, 1)]), (3, 3))
    assert out[0, 0, 0] == pytest.approx((2 + 4 + 5) / 3)  # corner: 3 neighbours
    assert out[0, 7, 0] == pytest.approx((4 + 5 + 6 + 7 + 9) / 5)  # bottom edge: 5 neighbours


def test_clustered_anomalies_exclude_each_other_and_use_unrepaired_values() -> None:
    vals = [[1, 2, 3], [4, 50, 60], [7, 8, 9]]
    out = repair_anomalies(_grid_tokens(vals), _mask(3, 3, [(1, 1), (1, 2)]), (3, 3))
    assert out[0, 4, 0] == pytest.approx((1 + 2 + 3 + 4 + 7 + 8 + 9) / 7)
    assert out[0, 5, 0] == pytest.approx((2 + 3 + 8 + 9) / 4)


def test_anomaly_without_valid_neighbour_keeps_its_value() -> None:
    vals = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    all_but_corner = [(r, c) for r in range(3) for c in range(3) if (r, c) != (2, 2)]
    x = _grid_tokens(vals)
    out = repair_anomalies(x, _mask(3, 3, all_but_corner), (3, 3))
    assert out[0, 0, 0] == pytest.approx(1.0)  # all neighbours of (0, 0) are anomalies
    assert out[0, 4, 0] == pytest.approx(9.0)  # the centre sees only the valid corner
    one_token = repair_anomalies(torch.ones(1, 1, 3), torch.ones(1, 1, dtype=torch.bool), (1, 1))
    torch.testing.assert_close(one_token, torch.ones(1, 1, 3))


def test_non_square_grid_is_row_major_and_batches_are_independent() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * 5, 3, generator=g)
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, 4] = True  # (0, 4): neighbours (0, 3), (1, 3), (1, 4)
    out = repair_anomalies(x, m, (2, 5))
    torch.testing.assert_close(out[0, 4], x[0, [3, 8, 9]].mean(0))
    torch.testing.assert_close(out[1], x[1])


def test_no_anomalies_is_identity() -> None:
    x = torch.randn(1, 12, 4)
    torch.testing.assert_close(repair_anomalies(x, torch.zeros(1, 12, dtype=torch.bool), (3, 4)), x)


def test_bad_inputs() -> None:
    x = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match=r"grid \(3, 3\) has 9 positions but x has N=12"):
        repair_anomalies(x, torch.zeros(1, 12, dtype=torch.bool), (3, 3))
    with pytest.raises(ValueError, match="anomalies must be a"):
        repair_anomalies(x, torch.zeros(1, 12), (3, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        repair_anomalies(x[0], torch.zeros(1, 12, dtype=torch.bool), (3, 4))
