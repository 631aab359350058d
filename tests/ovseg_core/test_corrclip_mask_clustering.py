"""Mask clustering: nearest resize, the m0 rule (and its quirk), DBSCAN merging, padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.mask_clustering import REFERENCE_PADDING_ID, cluster_masks, padding_as_region, resize_regions


def _unit(*angles: float) -> torch.Tensor:
    """Unit vectors in the plane (padded to 3 channels) at the given angles (radians)."""
    return torch.tensor([[math.cos(a), math.sin(a), 0.0] for a in angles])


def test_resize_regions_matches_interpolate_nearest() -> None:
    regions = torch.randint(-1, 50, (2, 17, 23))
    out = resize_regions(regions, (7, 9))
    ref = F.interpolate(regions[:, None].float(), size=(7, 9), mode="nearest")[:, 0].long()
    assert out.dtype == torch.int64 and torch.equal(out, ref)
    assert torch.equal(resize_regions(regions, (17, 23)), regions)


def test_resize_regions_rejects_float_maps() -> None:
    with pytest.raises(ValueError, match="integer"):
        resize_regions(torch.zeros(1, 4, 4), (2, 2))


def test_m0_quirk_smallest_id_is_unsegmented_without_clustering() -> None:
    regions = torch.tensor([[[3, 3, 5, 7]]])
    qk = torch.ones(1, 1, 4, 3) / math.sqrt(3)
    quirk = cluster_masks(qk, regions, CorrCLIPConfig(mask_clustering=False))
    fixed = cluster_masks(qk, regions, CorrCLIPConfig(mask_clustering=False, m0_quirk=False))
    assert quirk.tolist() == [[[0, 0, 1, 2]]]  # region 3 became "unsegmented"
    assert fixed.tolist() == [[[1, 1, 2, 3]]]  # no id 0 -> no m0
    with_zero = torch.tensor([[[0, 4, 4, 9]]])
    for m0_quirk in (True, False):
        out = cluster_masks(qk, with_zero, CorrCLIPConfig(mask_clustering=False, m0_quirk=m0_quirk))
        assert out.tolist() == [[[0, 1, 1, 2]]]


def test_dbscan_merges_similar_regions_and_chains() -> None:
    # regions 1..4: 1-2 cos 0.9 (dist 0.1), 2-3 cos 0.9, 1-3 cos ~0.62 (dist ~0.38), 4 far away.
    step = math.acos(0.9)
    feats = _unit(0.0, step, 2 * step, 2.0)
    regions = torch.tensor([[[0, 1, 1, 2, 3, 4, 4, 0]]])
    qk = torch.stack([_unit(2.0)[0], feats[0], feats[0], feats[1], feats[2], feats[3], feats[3], _unit(2.0)[0]])
    merged = cluster_masks(qk.reshape(1, 1, 8, 3), regions, CorrCLIPConfig())
    flat = merged.reshape(-1)
    assert flat[0] == 0 and flat[7] == 0  # m0 stays 0 even though its feature equals region 4's
    assert flat[1] == flat[2] == flat[3] == flat[4]  # chained through region 2
    assert flat[5] == flat[6] and flat[5] != flat[1] and int(flat[5]) >= 1 and int(flat[1]) >= 1


def test_dbscan_eps_threshold() -> None:
    regions = torch.tensor([[[0, 1, 2]]])
    for cos, merged_expected in ((0.85, True), (0.75, False)):  # distance 0.15 < 0.2 < 0.25
        qk = torch.cat([_unit(1.5), _unit(0.0, math.acos(cos))]).reshape(1, 1, 3, 3)
        flat = cluster_masks(qk, regions, CorrCLIPConfig()).reshape(-1)
        assert bool(flat[1] == flat[2]) is merged_expected


def test_region_feature_is_the_mean_over_the_region() -> None:
    # Region 1's patches at angles -0.7 and 0.7 average to direction 0, where region 2 lies.
    regions = torch.tensor([[[0, 1, 1, 2]]])
    qk = torch.cat([_unit(2.5), _unit(-0.7, 0.7, 0.0)]).reshape(1, 1, 4, 3)
    flat = cluster_masks(qk, regions, CorrCLIPConfig(dbscan_eps=0.05)).reshape(-1)
    # Patches alone are at distance 1 - cos(0.7) = 0.235 > eps, the region mean is exactly at 0.
    assert flat[1] == flat[2] == flat[3]


def test_m0_quirk_excludes_the_smallest_region_from_dbscan() -> None:
    regions = torch.tensor([[[1, 1, 2, 2]]])  # no unsegmented patch, two identical regions
    qk = _unit(0.3, 0.3, 0.3, 0.3).reshape(1, 1, 4, 3)
    assert cluster_masks(qk, regions, CorrCLIPConfig()).tolist() == [[[0, 0, 1, 1]]]
    assert cluster_masks(qk, regions, CorrCLIPConfig(m0_quirk=False)).tolist() == [[[1, 1, 1, 1]]]


def test_no_merging_with_fewer_than_two_regions_and_switch_off() -> None:
    regions = torch.tensor([[[0, 5, 5, 9]]])
    qk = _unit(0.0, 0.0, 0.0, 0.0).reshape(1, 1, 4, 3)
    assert cluster_masks(qk, regions, CorrCLIPConfig(mask_clustering=False)).tolist() == [[[0, 1, 1, 2]]]
    merged = cluster_masks(qk, regions, CorrCLIPConfig()).reshape(-1)
    assert merged[0] == 0 and merged[1] == merged[3]
    one_region = torch.tensor([[[0, 5, 5, 5]]])
    assert cluster_masks(qk, one_region, CorrCLIPConfig()).tolist() == [[[0, 1, 1, 1]]]


def test_dbscan_noise_regions_stay_alone() -> None:
    regions = torch.tensor([[[0, 1, 2, 3]]])
    qk = torch.cat([_unit(2.0), _unit(0.0, 0.1, 1.2)]).reshape(1, 1, 4, 3)
    flat = cluster_masks(qk, regions, CorrCLIPConfig(dbscan_min_samples=2)).reshape(-1)
    assert flat[1] == flat[2] and flat[3] != flat[1] and int(flat[3]) >= 1


def test_ignored_padding_never_forms_a_region_and_batches_are_independent() -> None:
    torch.manual_seed(0)
    qk = F.normalize(torch.randn(2, 4, 4, 8), dim=-1)
    regions = torch.randint(0, 6, (2, 4, 4))
    regions[0, :, 0] = -1
    cfg = CorrCLIPConfig(padding="ignore")
    merged = cluster_masks(qk, regions, cfg)
    assert torch.equal(merged == -1, regions == -1)
    for w in range(2):
        alone = cluster_masks(qk[w : w + 1], regions[w : w + 1], cfg)[0]
        assert torch.equal(alone, merged[w])
    valid = regions != -1
    # merging only unions regions: patches of one original region share a merged id
    for w in range(2):
        for rid in regions[w][valid[w]].unique():
            assert merged[w][regions[w] == rid].unique().numel() == 1


def test_reference_padding_is_a_region_that_dbscan_can_merge() -> None:
    """CorrCLIPv1 pads the mask crop with 10000: padding is clustered like any region (never m0)."""
    regions = torch.tensor([[[0, 1, 2, -1]]])
    qk = torch.cat([_unit(0.0), _unit(1.5), _unit(3.0), _unit(3.05)]).reshape(1, 1, 4, 3)  # region 2 ~ padding
    ref = cluster_masks(qk, regions, CorrCLIPConfig()).reshape(-1).tolist()
    assert ref[0] == 0 and ref[2] == ref[3] and ref[1] != ref[2] and min(ref[1:]) >= 1
    ignored = cluster_masks(qk, regions, CorrCLIPConfig(padding="ignore")).reshape(-1).tolist()
    assert ignored[0] == 0 and ignored[3] == -1 and ignored[1] != ignored[2]
    # without padding the two modes agree
    torch.manual_seed(1)
    qk = F.normalize(torch.randn(2, 4, 4, 8), dim=-1)
    regions = torch.randint(0, 6, (2, 4, 4))
    assert torch.equal(cluster_masks(qk, regions, CorrCLIPConfig()), cluster_masks(qk, regions, CorrCLIPConfig(padding="ignore")))


def test_padding_as_region_ids() -> None:
    assert padding_as_region(torch.tensor([[[3, -1]]])).tolist() == [[[3, REFERENCE_PADDING_ID]]]
    assert REFERENCE_PADDING_ID == 10000
    assert padding_as_region(torch.tensor([[[12000, -1]]])).tolist() == [[[12000, 12001]]]
    assert padding_as_region(torch.tensor([[[0, 4]]])).tolist() == [[[0, 4]]]


def test_bad_inputs() -> None:
    qk = F.normalize(torch.randn(1, 2, 2, 4), dim=-1)
    with pytest.raises(ValueError, match="DINO grid"):
        cluster_masks(qk, torch.zeros(1, 3, 2, dtype=torch.long), CorrCLIPConfig())
    with pytest.raises(ValueError, match=">= -1"):
        cluster_masks(qk, torch.full((1, 2, 2), -2), CorrCLIPConfig())
    with pytest.raises(ValueError, match="integer"):
        cluster_masks(qk, torch.zeros(1, 2, 2), CorrCLIPConfig())
