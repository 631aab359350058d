"""Tests for ovseg_core.features.regions: painting, SAM and superpixel region maps, nearest resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ovseg_core.features.regions import (
    RegionMap,
    SamRegionConfig,
    SuperpixelConfig,
    paint_regions,
    region_map,
    resize_regions_nearest,
    sam_masks,
    sam_regions,
    superpixel_regions,
)

VOC_JPEG = Path("voc2012-sample/VOCdevkit/VOC2012/JPEGImages")


@pytest.fixture(scope="module")
def voc_image(sample_dir: Path) -> np.ndarray:
    path = sorted((sample_dir / VOC_JPEG).glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def small_image(voc_image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(voc_image[100:260, 50:250])


@pytest.fixture(scope="module")
def tiny_sam() -> Sam:
    """Random-weight SAM of the real architecture: 1024 input, tiny widths, windowed attention."""
    torch.manual_seed(0)
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=dim,
            window_size=16, global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16,
        ),
    ).eval()


# Thresholds off and NMS disabled so that random weights still yield many masks.
PERMISSIVE = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def _box(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ------------------------------------------------------------------ painting


def test_paint_ascending_area_larger_overwrites_smaller() -> None:
    big = _box(6, 8, 0, 4, 0, 6)  # area 24
    small = _box(6, 8, 1, 3, 1, 3)  # area 4, fully inside big
    medium = _box(6, 8, 3, 6, 4, 8)  # area 12, overlaps big in rows 3, cols 4..5
    ids = paint_regions([big, small, medium])
    assert ids.dtype == np.int32 and ids.shape == (6, 8)
    expected = np.zeros((6, 8), dtype=np.int32)
    expected[3:6, 4:8] = 2  # medium gets id 2
    expected[0:4, 0:6] = 3  # big (id 3) painted last, overwrites small (id 1) and the overlap with medium
    assert np.array_equal(ids, expected)
    assert 1 not in ids  # the small mask is fully overwritten: its id survives in the metadata only


def test_paint_stack_equals_sequence_and_ties_keep_input_order() -> None:
    a = _box(4, 4, 0, 2, 0, 2)
    b = _box(4, 4, 1, 3, 1, 3)  # same area as a, overlapping
    ids = paint_regions(np.stack([a, b]))
    assert np.array_equal(ids, paint_regions([a, b]))
    assert ids[1, 1] == 2 and ids[0, 0] == 1 and ids[2, 2] == 2 and ids[3, 3] == 0
    assert np.array_equal(paint_regions(np.zeros((0, 3, 5), dtype=bool)), np.zeros((3, 5), dtype=np.int32))


def test_paint_disjoint_masks_ids_dense_in_area_order() -> None:
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [1, 9, 3, 7, 4]))[:24].reshape(4, 6)
    masks = np.stack([labels == k for k in range(5)])
    ids = paint_regions(masks)
    assert sorted(np.unique(ids).tolist()) == [1, 2, 3, 4, 5]
    areas = [int((ids == z).sum()) for z in range(1, 6)]
    assert areas == sorted(areas)
    for k in range(5):  # each input mask maps to one id
        assert np.unique(ids[masks[k]]).size == 1


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (np.zeros((2, 3), dtype=bool), r"\(Z, H, W\)"),
        (np.zeros((1, 2, 3), dtype=np.uint8), "boolean"),
        ([np.zeros((2, 3), dtype=bool), np.zeros((3, 3), dtype=bool)], "one shared size"),
        ([], "empty sequence"),
    ],
)
def test_paint_rejects(masks, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paint_regions(masks)


def test_region_map_validation() -> None:
    ids = np.array([[0, 1], [2, 2]], dtype=np.int32)
    ok = RegionMap(ids=ids, scores=np.ones(2, np.float32), areas=np.array([1, 2], np.int64))
    assert ok.num_regions == 2
    with pytest.raises(ValueError, match="int32"):
        RegionMap(ids=ids.astype(np.int64), scores=np.ones(2, np.float32), areas=np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match=r"areas must be a \(2,\) int64"):
        RegionMap(ids=ids, scores=np.ones(2, np.float32), areas=np.array([1], np.int64))
    with pytest.raises(ValueError, match="ids must lie in 0..1"):
        RegionMap(ids=ids, scores=np.ones(1, np.float32), areas=np.array([1], np.int64))


# ------------------------------------------------------------------ SAM


def test_sam_config_defaults_and_validation() -> None:
    cfg = SamRegionConfig()
    assert (cfg.points_per_side, cfg.pred_iou_thresh, cfg.stability_score_thresh) == (8, 0.4, 0.4)
    assert (cfg.min_mask_region_area, cfg.crop_n_layers, cfg.multimask_output) == (0, 0, False)
    assert [g.shape for g in cfg.layer_point_grids()] == [(64, 2)]
    with pytest.raises(ValueError, match="pred_iou_thresh must be in"):
        SamRegionConfig(pred_iou_thresh=1.5)
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        SamRegionConfig(points_per_side=None)
    with pytest.raises(ValueError, match="needs crop_n_layers \\+ 1 = 2 grids"):
        SamRegionConfig(points_per_side=None, point_grids=(((0.5, 0.5),),), crop_n_layers=1)
    with pytest.raises(ValueError, match="crop_overlap_ratio"):
        SamRegionConfig(crop_overlap_ratio=1.0)
    with pytest.raises(ValueError, match="points_per_side must be >= 1"):
        SamRegionConfig(points_per_side=0)
    grid = SamRegionConfig(points_per_side=None, point_grids=(((0.25, 0.5), (0.75, 0.5)),))
    assert grid.layer_point_grids()[0].shape == (2, 2)


def test_sam_regions_paper_defaults_give_valid_map(tiny_sam: Sam, voc_image: np.ndarray) -> None:
    regions = sam_regions(tiny_sam, voc_image, SamRegionConfig())
    assert regions.ids.shape == voc_image.shape[:2] and regions.ids.dtype == np.int32
    z = regions.num_regions
    assert regions.scores.shape == (z,) and regions.areas.shape == (z,)
    assert np.all(np.diff(regions.areas) >= 0)
    if z == 0:  # random weights: nothing passes the 0.4 thresholds
        assert not regions.ids.any()
    else:
        assert np.all(regions.scores > 0.4)


def test_sam_regions_single_mask_per_point_and_painting(tiny_sam: Sam, small_image: np.ndarray) -> None:
    cfg = SamRegionConfig(**PERMISSIVE)
    masks, scores = sam_masks(tiny_sam, small_image, cfg)
    assert masks.dtype == bool and masks.shape[1:] == small_image.shape[:2]
    assert 0 < masks.shape[0] <= 16  # one mask per point at most (4 x 4 points)
    regions = region_map(tiny_sam, small_image, cfg)  # dispatches to sam_regions
    assert np.array_equal(regions.ids, paint_regions(masks))
    order = np.argsort(masks.sum(axis=(1, 2)), kind="stable")
    np.testing.assert_array_equal(regions.scores, scores[order])
    np.testing.assert_array_equal(regions.areas, masks.sum(axis=(1, 2))[order])


@pytest.mark.slow
def test_sam_multimask_equals_library_generator(tiny_sam: Sam, small_image: np.ndarray) -> None:
    cfg = SamRegionConfig(multimask_output=True, **PERMISSIVE)
    masks, scores = sam_masks(tiny_sam, small_image, cfg)
    records = SamAutomaticMaskGenerator(
        tiny_sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    ).generate(small_image)
    assert masks.shape[0] == len(records) > 16  # three candidates per point
    assert np.array_equal(masks, np.stack([r["segmentation"] for r in records]))
    np.testing.assert_allclose(scores, [r["predicted_iou"] for r in records], rtol=1e-6)


def test_sam_rejects_bad_image(tiny_sam: Sam) -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sam_regions(tiny_sam, np.zeros((8, 8, 3), dtype=np.float32), SamRegionConfig())
    with pytest.raises(ValueError, match="SamRegionConfig needs a segment-anything Sam model as source"):
        region_map(None, np.zeros((8, 8, 3), dtype=np.uint8), SamRegionConfig())


# ------------------------------------------------------------------ superpixels


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixels_on_real_image(voc_image: np.ndarray, method: str) -> None:
    regions = superpixel_regions(voc_image, SuperpixelConfig(method=method))
    z = regions.num_regions
    assert regions.ids.shape == voc_image.shape[:2] and regions.ids.dtype == np.int32
    assert 10 < z < 2000
    assert np.array_equal(np.unique(regions.ids), np.arange(1, z + 1))  # dense, every pixel segmented
    counts = np.bincount(regions.ids.ravel(), minlength=z + 1)[1:]
    assert np.array_equal(counts, regions.areas) and np.all(np.diff(regions.areas) >= 0)
    assert np.all(regions.scores == 1.0)
    assert np.array_equal(region_map(None, voc_image, SuperpixelConfig(method=method)).ids, regions.ids)


def test_superpixel_config_validation() -> None:
    with pytest.raises(ValueError, match="method must be 'slic' or 'felzenszwalb'"):
        SuperpixelConfig(method="watershed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_segments must be >= 1"):
        SuperpixelConfig(n_segments=0)
    with pytest.raises(ValueError, match="felzenszwalb_sigma must be >= 0"):
        SuperpixelConfig(felzenszwalb_sigma=-1.0)
    with pytest.raises(ValueError, match="cfg must be a SamRegionConfig, Sam2RegionConfig or SuperpixelConfig"):
        region_map(None, np.zeros((4, 4, 3), np.uint8), object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ resize


@pytest.mark.parametrize(("src", "dst"), [((7, 5), (3, 11)), ((513, 375), (42, 42)), ((336, 336), (21, 21)), ((4, 4), (8, 8))])
def test_resize_matches_torch_nearest(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, size=src).astype(np.int32)
    expected = F.interpolate(torch.from_numpy(ids)[None, None].float(), size=dst, mode="nearest")[0, 0]
    got = resize_regions_nearest(ids, dst)
    assert isinstance(got, np.ndarray) and got.dtype == np.int32 and got.shape == dst
    assert np.array_equal(got, expected.numpy().astype(np.int32))
    got_t = resize_regions_nearest(torch.from_numpy(ids).long()[None], dst)
    assert got_t.dtype == torch.int64 and got_t.shape == (1, *dst)
    assert torch.equal(got_t[0], expected.long())


def test_resize_keeps_large_ids_exact() -> None:
    ids = np.array([[2**31 - 1, 16_777_217]], dtype=np.int64)  # not representable in float32
    assert np.array_equal(resize_regions_nearest(ids, (2, 4)), np.repeat(np.repeat(ids, 2, 0), 2, 1))


def test_resize_rejects() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        resize_regions_nearest(np.zeros(4, np.int32), (2, 2))
    with pytest.raises(ValueError, match="h, w >= 1"):
        resize_regions_nearest(np.zeros((4, 4), np.int32), (0, 2))
