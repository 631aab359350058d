"""Tests for ovseg_core.features.sam2_regions: SAM 2 automatic masks as region maps."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

from ovseg_core.backbones import load_backbone
from ovseg_core.features.regions import region_map
from ovseg_core.features.sam2_regions import Sam2RegionConfig, sam2_masks, sam2_regions

VOC_JPEG = Path("voc2012-sample/VOCdevkit/VOC2012/JPEGImages")
# Thresholds off and NMS disabled so that random weights still yield many masks.
PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def voc_image(sample_dir: Path) -> np.ndarray:
    path = sorted((sample_dir / VOC_JPEG).glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def tiny_sam2() -> torch.nn.Module:
    return load_backbone("sam2:tiny@random:0").model


def reference_paint(records: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """The CorrCLIP reference's loop: records sorted by area (stable), painted with ids 1, 2, ..."""
    instance_mask = np.zeros(shape, dtype=np.int64)
    for instance_id, ann in enumerate(sorted(records, key=lambda r: r["area"]), start=1):
        instance_mask[ann["segmentation"]] = instance_id
    return instance_mask


def test_defaults_are_the_reference_on_the_fly_settings() -> None:
    cfg = Sam2RegionConfig()
    assert (cfg.points_per_side, cfg.pred_iou_thresh, cfg.stability_score_thresh, cfg.multimask_output) == (8, 0.4, 0.4, False)
    assert (cfg.mask_threshold, cfg.use_m2m, cfg.min_mask_region_area, cfg.crop_n_layers) == (0.0, False, 0, 0)
    assert Sam2RegionConfig(points_per_side=32).layer_point_grids()[0].shape == (1024, 2)  # the paper's 32 points


def test_config_covers_every_generator_parameter() -> None:
    params = set(inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters) - {"self", "model", "kwargs"}
    assert set(Sam2RegionConfig().generator_kwargs()) == params
    assert Sam2RegionConfig().generator_kwargs()["output_mode"] == "binary_mask"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pred_iou_thresh=1.5), r"Sam2RegionConfig.pred_iou_thresh must be in \[0, 1\], got 1.5"),
        (dict(points_per_side=None), "Sam2RegionConfig: set exactly one of points_per_side and point_grids"),
        (dict(mask_threshold=float("nan")), "Sam2RegionConfig.mask_threshold must be finite"),
        (dict(stability_score_offset=0.0), "Sam2RegionConfig.stability_score_offset must be > 0"),
    ],
)
def test_config_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sam2RegionConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [dict(points_per_side=8), dict(multimask_output=True, points_per_side=4), dict(use_m2m=True, points_per_side=4)]
)
def test_regions_equal_the_reference_painting_of_the_library_generator(tiny_sam2, voc_image, extra) -> None:
    cfg = Sam2RegionConfig(**PERMISSIVE, **extra)
    regions = sam2_regions(tiny_sam2, voc_image, cfg)
    library = dict(multimask_output=False, **PERMISSIVE) | extra  # the library's own default is multimask_output=True
    records = SAM2AutomaticMaskGenerator(tiny_sam2, **library).generate(voc_image)
    assert len(records) == regions.num_regions > 1
    assert regions.ids.shape == voc_image.shape[:2] and regions.ids.dtype == np.int32
    assert np.array_equal(regions.ids, reference_paint(records, voc_image.shape[:2]))
    by_area = sorted(records, key=lambda r: r["area"])
    np.testing.assert_array_equal(regions.areas, [r["area"] for r in by_area])
    np.testing.assert_allclose(regions.scores, [r["predicted_iou"] for r in by_area], rtol=1e-6)


@pytest.mark.slow
def test_reference_defaults_give_a_valid_map(tiny_sam2, voc_image) -> None:
    regions = region_map(tiny_sam2, voc_image, Sam2RegionConfig())  # dispatches to sam2_regions
    assert regions.ids.shape == voc_image.shape[:2]
    assert np.all(regions.scores > 0.4) and np.all(np.diff(regions.areas) >= 0)
    if regions.num_regions == 0:  # random weights: nothing passes the 0.4 thresholds
        assert not regions.ids.any()


def test_masks_in_generator_order(tiny_sam2, voc_image) -> None:
    crop = np.ascontiguousarray(voc_image[:200, :300])
    masks, scores = sam2_masks(tiny_sam2, crop, Sam2RegionConfig(points_per_side=3, **PERMISSIVE))
    assert masks.dtype == bool and masks.shape[1:] == (200, 300) and scores.dtype == np.float32
    assert 0 < masks.shape[0] <= 9  # one mask per point at most


@pytest.mark.slow
def test_bfloat16_autocast_runs_and_stays_close(tiny_sam2, voc_image) -> None:
    cfg = Sam2RegionConfig(**PERMISSIVE)
    fp32 = sam2_regions(tiny_sam2, voc_image, cfg)
    bf16 = sam2_regions(tiny_sam2, voc_image, cfg, compute_dtype=torch.bfloat16)
    assert bf16.ids.shape == fp32.ids.shape and bf16.num_regions > 0
    assert np.mean((bf16.ids > 0) == (fp32.ids > 0)) > 0.9  # coverage barely moves (the ids may renumber)


def test_rejects_bad_inputs(tiny_sam2) -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sam2_regions(tiny_sam2, np.zeros((8, 8), dtype=np.uint8), Sam2RegionConfig())
    with pytest.raises(ValueError, match="float16 on CUDA only"):
        sam2_regions(tiny_sam2, np.zeros((8, 8, 3), dtype=np.uint8), Sam2RegionConfig(), compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="Sam2RegionConfig needs a sam2 SAM2Base model as source, got None"):
        region_map(None, np.zeros((8, 8, 3), dtype=np.uint8), Sam2RegionConfig())


@pytest.mark.slow
def test_real_hiera_t_architecture_equals_the_library(voc_image) -> None:
    """sam2:hiera_t (real architecture, random weights), thresholds off so that masks survive."""
    model = load_backbone("sam2:hiera_t@random:0").model
    cfg = Sam2RegionConfig(**PERMISSIVE)
    regions = sam2_regions(model, voc_image, cfg)
    records = SAM2AutomaticMaskGenerator(model, **cfg.generator_kwargs()).generate(voc_image)
    assert len(records) == regions.num_regions > 1
    assert np.array_equal(regions.ids, reference_paint(records, voc_image.shape[:2]))
