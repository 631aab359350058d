"""Map correction: mode per original region, ties to the smallest label, the m0 rule."""

from __future__ import annotations

import pytest
import torch

from ovseg_core.corrclip.map_correction import map_correction


def test_mode_per_region_and_unsegmented_untouched() -> None:
    labels = torch.tensor([[1, 2, 2, 3], [4, 4, 5, 3]])
    regions = torch.tensor([[0, 7, 7, 7], [0, 9, 9, 0]])
    out = map_correction(labels, regions)
    assert out.tolist() == [[1, 2, 2, 2], [4, 4, 4, 3]]
    assert out.dtype == torch.int64


def test_ties_go_to_the_smallest_label() -> None:
    labels = torch.tensor([[5, 2, 5, 2, 9, 0]])
    regions = torch.tensor([[3, 3, 3, 3, 8, 8]])
    out = map_correction(labels, regions, m0_quirk=False)
    assert out.tolist() == [[2, 2, 2, 2, 0, 0]]


def test_m0_quirk_smallest_id_is_not_corrected() -> None:
    labels = torch.tensor([[1, 2, 2, 3, 3, 4]])
    regions = torch.tensor([[5, 5, 5, 6, 6, 6]])  # no unsegmented pixel
    assert map_correction(labels, regions).tolist() == [[1, 2, 2, 3, 3, 3]]
    assert map_correction(labels, regions, m0_quirk=False).tolist() == [[2, 2, 2, 3, 3, 3]]


def test_matches_a_per_region_loop_on_random_maps() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (40, 50))
    regions = torch.randint(0, 30, (40, 50))
    out = map_correction(labels, regions)
    expected = labels.clone()
    for rid in regions.unique():
        if rid == 0:
            continue
        inside = regions == rid
        counts = torch.bincount(labels[inside], minlength=6)
        expected[inside] = int(torch.nonzero(counts == counts.max())[0])
    assert torch.equal(out, expected)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same"):
        map_correction(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        map_correction(torch.full((2, 2), -1), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        map_correction(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
