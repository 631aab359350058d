"""Region pooling of bank values, keys and inference queries (ovseg_core.bank.pooling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_core.bank.config import PoolingConfig
from ovseg_core.bank.pooling import pool_keys, pool_values, region_queries
from ovseg_core.bank.region_sums import select_regions

# A 2 x 3 map with C = 2: pixel (y, x) -> (c0, c1).
PIXELS = [[(1.0, 0.0), (3.0, 4.0), (0.0, 2.0)], [(6.0, 8.0), (0.0, 5.0), (1.0, 1.0)]]
REGIONS = np.array([[0, 2, 2], [5, 2, 0]], dtype=np.int64)


def _fmap() -> torch.Tensor:
    return torch.tensor(PIXELS, dtype=torch.float32).permute(2, 0, 1).contiguous()  # (2, 2, 3)


def test_values_are_unit_region_means_in_ascending_id_order_without_id_0():
    pooled = pool_values(_fmap(), REGIONS)
    # region 2: pixels (3,4), (0,2), (0,5) -> mean (1, 11/3) -> / sqrt(130)/3; region 5: (6,8) -> (0.6, 0.8)
    expected = np.array([[3 / math.sqrt(130), 11 / math.sqrt(130)], [0.6, 0.8]])
    assert pooled.features.dtype == np.float16
    np.testing.assert_allclose(pooled.features.astype(np.float64), expected, atol=1e-3)
    assert pooled.mask_ids.tolist() == [2, 5]
    assert pooled.areas.tolist() == [3, 1]


def test_keys_average_per_pixel_unit_vectors_and_are_not_renormalised():
    pooled = pool_keys(_fmap(), REGIONS)
    # region 2: (0.6, 0.8), (0, 1), (0, 1) -> (0.2, 2.8 / 3) (norm 0.955, kept)
    expected = np.array([[0.2, 2.8 / 3], [0.6, 0.8]])
    np.testing.assert_allclose(pooled.features.astype(np.float64), expected, atol=1e-3)
    assert pooled.features.dtype == np.float16
    assert pooled.mask_ids.tolist() == [2, 5]


def test_negative_ids_are_regions_like_any_non_zero_id():
    regions = np.array([[-1, 0, 0], [3, 3, -1]])
    pooled = pool_values(_fmap(), regions)
    assert pooled.mask_ids.tolist() == [-1, 3]
    assert pooled.areas.tolist() == [2, 2]
    # id -1: (1,0) and (1,1) -> mean (1, 0.5)
    np.testing.assert_allclose(pooled.features[0].astype(np.float64), np.array([1, 0.5]) / math.sqrt(1.25), atol=1e-3)


def test_bool_mask_stack_one_region_per_slice_overlaps_allowed():
    masks = np.zeros((3, 2, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = True
    masks[1, 0, 1] = masks[1, 1, 1] = True  # overlaps slice 0 at (0, 1); slice 2 stays empty
    values = pool_values(_fmap(), masks)
    assert values.mask_ids.tolist() == [0, 1, 2]
    assert values.areas.tolist() == [2, 2, 0]
    # slice 0: (1,0), (3,4) -> (2, 2); slice 1: (3,4), (0,5) -> (1.5, 4.5)
    np.testing.assert_allclose(values.features[0].astype(np.float64), [math.sqrt(0.5)] * 2, atol=1e-3)
    np.testing.assert_allclose(values.features[1].astype(np.float64), np.array([1.5, 4.5]) / math.sqrt(22.5), atol=1e-3)
    # empty slice: the reference's mean over nothing (NaN) by default ...
    assert np.isnan(values.features[2]).all()
    assert np.isnan(pool_keys(_fmap(), masks).features[2]).all()
    # ... or a zero row with empty_region="zero"; other rows unchanged
    zero = pool_values(_fmap(), masks, PoolingConfig(empty_region="zero"))
    assert (zero.features[2] == 0).all()
    np.testing.assert_array_equal(zero.features[:2], values.features[:2])


def _reference_pool(fmap: torch.Tensor, regions: np.ndarray, unit_pixels: bool, ids: list[int]) -> np.ndarray:
    """The reference's order of operations on the whole upsampled map (float64 means)."""
    full = F.interpolate(fmap[None], size=regions.shape, mode="bilinear", align_corners=False)[0]
    if unit_pixels:
        full = F.normalize(full, dim=0)
    pix = full.permute(1, 2, 0).double().numpy()
    return np.stack([pix[regions == v].mean(axis=0) for v in ids])


@pytest.mark.parametrize("size", [(20, 31), (5, 4), (7, 9)])
@pytest.mark.parametrize("band_rows", [1, 3, 64])
def test_banded_upsampling_equals_whole_map_interpolation(size, band_rows):
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(6, 7, 9, generator=gen)
    regions = np.random.default_rng(1).integers(0, 5, size=size)
    regions[0, 0], regions[-1, -1] = 0, 4  # ids 0 and 4 present
    ids = sorted(set(np.unique(regions).tolist()))
    q_ids, labels, queries = region_queries(fmap, regions, band_rows=band_rows)
    expected = _reference_pool(fmap, regions, True, ids)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert q_ids.tolist() == ids  # every distinct id, 0 included
    assert queries.dtype == np.float32
    np.testing.assert_allclose(queries, expected, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(q_ids)[labels], regions)
    cfg = PoolingConfig(band_rows=band_rows)
    keys = pool_keys(fmap, regions, cfg)
    np.testing.assert_allclose(keys.features.astype(np.float64), _reference_pool(fmap, regions, True, ids[1:]), atol=1e-3)
    values = pool_values(fmap, regions, cfg)
    plain = _reference_pool(fmap, regions, False, ids[1:])
    np.testing.assert_allclose(values.features.astype(np.float64), plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-3)


def test_queries_of_a_same_size_map_are_normalised_region_means():
    q_ids, labels, queries = region_queries(_fmap(), REGIONS)
    assert q_ids.tolist() == [0, 2, 5]
    # id 0: (1,0) and (1,1)/sqrt2 -> mean, then unit
    m0 = np.array([1 + math.sqrt(0.5), math.sqrt(0.5)]) / 2
    np.testing.assert_allclose(queries[0], m0 / np.linalg.norm(m0), atol=1e-6)
    np.testing.assert_allclose(queries[1], np.array([0.2, 2.8 / 3]) / math.hypot(0.2, 2.8 / 3), atol=1e-6)
    np.testing.assert_array_equal(labels, [[0, 1, 1], [2, 1, 0]])


def test_select_regions_order_and_bad_inputs():
    sel = select_regions(torch.tensor([[7, 0], [7, 2]]))
    assert sel.mask_ids.tolist() == [2, 7] and sel.areas.tolist() == [1, 2]
    np.testing.assert_array_equal(sel.labels, [[1, -1], [1, 0]])
    with pytest.raises(ValueError, match="integer map or an"):
        select_regions(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="bool stack"):
        select_regions(np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="include_zero"):
        select_regions(np.zeros((2, 2, 2), dtype=bool), include_zero=True)
    with pytest.raises(ValueError, match=r"\(C, h, w\) floating"):
        pool_values(torch.zeros(2, 3, dtype=torch.float32), REGIONS)
    with pytest.raises(ValueError, match="band_rows"):
        PoolingConfig(band_rows=0)
    with pytest.raises(ValueError, match="empty_region"):
        PoolingConfig(empty_region="skip")


@pytest.mark.parametrize("size", [(40, 50), (6, 5)])  # token-weight path, banded path
def test_bool_stack_upsampled_pooling_equals_whole_map_interpolation(size):
    gen = torch.Generator().manual_seed(3)
    fmap = torch.randn(8, 5, 6, generator=gen)
    rng = np.random.default_rng(4)
    masks = rng.random((3, *size)) < 0.4  # overlapping slices
    full = F.interpolate(fmap[None], size=size, mode="bilinear", align_corners=False)[0]
    unit = F.normalize(full, dim=0).permute(1, 2, 0).double().numpy()
    plain = full.permute(1, 2, 0).double().numpy()
    expected_keys = np.stack([unit[m].mean(0) for m in masks])
    expected_values = np.stack([plain[m].mean(0) for m in masks])
    expected_values /= np.linalg.norm(expected_values, axis=1, keepdims=True)
    np.testing.assert_allclose(pool_keys(fmap, masks).features.astype(np.float64), expected_keys, atol=1e-3)
    np.testing.assert_allclose(pool_values(fmap, masks).features.astype(np.float64), expected_values, atol=1e-3)
    assert pool_keys(fmap, masks).areas.tolist() == masks.reshape(3, -1).sum(1).tolist()


def test_sparse_and_dense_id_ranges_select_the_same_regions():
    dense = np.array([[0, 9, 9], [4, 0, -2]])
    sparse = np.where(dense == 9, 2**40, dense)  # same order, ids spanning more than the counting range
    a, b = select_regions(dense), select_regions(sparse)
    assert a.mask_ids.tolist() == [-2, 4, 9] and b.mask_ids.tolist() == [-2, 4, 2**40]
    assert a.areas.tolist() == b.areas.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels, [[-1, 2, 2], [1, -1, 0]])
