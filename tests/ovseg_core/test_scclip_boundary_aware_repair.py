"""Boundary-aware repair: an anomaly on a two-region border is repaired from its own side only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_core.scclip import repair_anomalies
from ovseg_core.scclip.anomaly_repair import RING_OFFSETS, ring_neighbours
from ovseg_core.scclip.boundary_aware_repair import boundary_aware_repair, own_side_neighbours, repair_from_neighbours
from ovseg_core.scclip.self_adjusting import cosine_similarity

GRID = (8, 8)


def _two_regions(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Left half region A, right half region B: x and mid tokens, anomaly mask on the border columns, sides."""
    rng = np.random.default_rng(seed)
    gh, gw = GRID
    side = np.indices(GRID)[1].reshape(-1) >= gw // 2  # False: left (A), True: right (B)
    # x: A tokens live in dims 0..3, B tokens in dims 4..7 (random values); mid: one direction per region + noise
    x = np.zeros((gh * gw, 8), dtype=np.float32)
    x[~side, :4] = rng.normal(size=((~side).sum(), 4))
    x[side, 4:] = rng.normal(size=(side.sum(), 4))
    mid = np.where(side[:, None], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(gh * gw, 3))
    anomalies = np.zeros(gh * gw, dtype=bool)
    border = np.flatnonzero(np.isin(np.indices(GRID)[1].reshape(-1), [gw // 2 - 1, gw // 2]))
    anomalies[rng.choice(border, size=6, replace=False)] = True
    x[anomalies] = rng.normal(scale=50.0, size=(anomalies.sum(), 8))  # anomaly tokens: garbage in every dim
    return (torch.tensor(x)[None], torch.tensor(mid, dtype=torch.float32)[None], torch.tensor(anomalies)[None], side)


@pytest.mark.parametrize("seed", range(5))
def test_boundary_aware_repair_never_mixes_the_two_sides_while_plain_repair_does(seed: int) -> None:
    x, mid, anomalies, side = _two_regions(seed)
    aware = boundary_aware_repair(x, anomalies, GRID, cosine_similarity(mid), gap=0.2)[0].numpy()
    plain = repair_anomalies(x, anomalies, GRID)[0].numpy()
    flagged = np.flatnonzero(anomalies[0].numpy())
    other_dims = lambda i: slice(0, 4) if side[i] else slice(4, 8)  # noqa: E731 - the dims of the other region
    for i in flagged:
        assert np.abs(aware[i, other_dims(i)]).max() == 0.0, f"token {i} took values from the other side"
    # plain repair averages across the border: some repaired token carries the other region's dims
    assert max(np.abs(plain[i, other_dims(i)]).max() for i in flagged) > 0.1
    # non-anomalies are untouched
    keep = ~anomalies[0].numpy()
    np.testing.assert_array_equal(aware[keep], x[0].numpy()[keep])


def test_own_side_is_the_high_similarity_group_of_a_hand_made_split() -> None:
    # a 3x3 grid, the centre is the only anomaly; its ring neighbours' mid-layer cosines to it:
    sims = [0.9, 0.8, 0.85, 0.1, 0.2, 0.15, 0.9, 0.05]  # RING_OFFSETS order
    mid_sim = torch.eye(9)[None].clone()
    ring = [(1 + dr) * 3 + (1 + dc) for dr, dc in RING_OFFSETS]
    for j, s in zip(ring, sims):
        mid_sim[0, 4, j] = mid_sim[0, j, 4] = s
    anomalies = torch.zeros(1, 9, dtype=torch.bool)
    anomalies[0, 4] = True
    own = own_side_neighbours(mid_sim, anomalies, (3, 3), gap=0.2)[0, 4].tolist()
    # sorted: .05 .1 .15 .2 | .8 .85 .9 .9; group means 0.125 and 0.8625 differ by 0.7375 >= 0.2
    assert own == [True, True, True, False, False, False, True, False]
    # a gap above 0.7375: not a boundary, every valid neighbour is used
    assert all(own_side_neighbours(mid_sim, anomalies, (3, 3), gap=0.8)[0, 4].tolist())


def test_without_a_boundary_it_is_the_papers_repair() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 16, generator=gen)
    mid = torch.ones(2, 64, 5) + 0.01 * torch.randn(2, 64, 5, generator=gen)  # one region: cosines ~1, no split
    anomalies = torch.rand(2, 64, generator=gen) < 0.15
    torch.testing.assert_close(boundary_aware_repair(x, anomalies, GRID, cosine_similarity(mid), gap=0.2),
                               repair_anomalies(x, anomalies, GRID))


def test_repair_from_neighbours_skips_anomalies_and_keeps_isolated_ones() -> None:
    x = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1)
    anomalies = torch.ones(1, 9, dtype=torch.bool)
    anomalies[0, 1] = False  # only token 1 is valid
    use = torch.ones(1, 9, 8, dtype=torch.bool)
    out = repair_from_neighbours(x, anomalies, (3, 3), use)[0, :, 0].tolist()
    # tokens next to 1 (0, 2, 3, 4, 5) take its value; 6, 7, 8 have no valid neighbour and keep theirs
    assert out == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0, 7.0, 8.0]


def test_ring_neighbours_of_a_corner_and_the_errors() -> None:
    idx, inside = ring_neighbours((3, 4))
    assert inside[0].tolist() == [False, False, False, False, True, False, True, True]
    assert idx[0][inside[0]].tolist() == [1, 4, 5]
    with pytest.raises(ValueError, match="grid"):
        boundary_aware_repair(torch.zeros(1, 10, 2), torch.zeros(1, 10, dtype=torch.bool), (3, 3), torch.zeros(1, 10, 10), 0.2)
    with pytest.raises(ValueError, match="mid_sim must be"):
        own_side_neighbours(torch.zeros(1, 8, 8), torch.zeros(1, 9, dtype=torch.bool), (3, 3), 0.2)
