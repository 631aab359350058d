"""The optimised automatic mask generation equals the library generators (SAM v1 and SAM 2).

Real sample images, random weights of several seeds, several parameter sets; the expectation is
the library's own ``generate`` (segment-anything's predictor forced to single-mask output where
the config asks for it) and the CorrCLIP reference's painting loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import calculate_stability_score

from ovseg_core.backbones import load_backbone
from ovseg_core.features.automatic_masks import stability_scores
from ovseg_core.features.regions import SamRegionConfig, sam_masks, sam_regions
from ovseg_core.features.sam2_regions import Sam2RegionConfig, sam2_masks, sam2_regions

VOC_JPEG = Path("voc2012-sample/VOCdevkit/VOC2012/JPEGImages")
SETTINGS = [
    # (points per side, pred_iou / stability thresholds, box NMS, multimask, crop layers, crop NMS)
    dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, multimask_output=True),
    dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
         crop_n_layers=1, crop_nms_thresh=1.0, points_per_batch=5),
    dict(points_per_side=6, pred_iou_thresh=0.47, stability_score_thresh=0.2, box_nms_thresh=0.95, multimask_output=True),
]


class SingleMaskPredictor(SamPredictor):
    """segment-anything's predictor with single-mask output (its generator always asks for 3)."""

    def predict_torch(self, *args, multimask_output: bool = True, **kwargs):
        return super().predict_torch(*args, multimask_output=False, **kwargs)


def reference_paint(records: list[dict], shape: tuple[int, int]) -> np.ndarray:
    ids = np.zeros(shape, dtype=np.int64)
    for instance_id, ann in enumerate(sorted(records, key=lambda r: r["area"]), start=1):
        ids[ann["segmentation"]] = instance_id
    return ids


def library_v1(model: torch.nn.Module, image: np.ndarray, cfg: SamRegionConfig) -> list[dict]:
    fields = {k: v for k, v in cfg.__dict__.items() if k not in ("multimask_output", "point_grids")}
    generator = SamAutomaticMaskGenerator(model, **fields)
    if not cfg.multimask_output:
        generator.predictor = SingleMaskPredictor(model)
    return generator.generate(image)


@pytest.fixture(scope="module")
def images(sample_dir: Path) -> list[np.ndarray]:
    paths = sorted((sample_dir / VOC_JPEG).glob("*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths[:4]]


def assert_same(masks: np.ndarray, scores: np.ndarray, records: list[dict], regions, shape) -> None:
    assert masks.shape[0] == len(records)
    if records:
        assert np.array_equal(masks, np.stack([r["segmentation"] for r in records]))
        assert np.array_equal(scores, np.asarray([r["predicted_iou"] for r in records], dtype=np.float32))
    assert np.array_equal(regions.ids, reference_paint(records, shape))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_sam_v1_equals_the_library_generator(images, seed, setting) -> None:
    model = load_backbone(f"sam:tiny@random:{seed}").model
    image = images[(seed + setting) % len(images)]
    cfg = SamRegionConfig(**SETTINGS[setting])
    masks, scores = sam_masks(model, image, cfg)
    records = library_v1(model, image, cfg)
    assert_same(masks, scores, records, sam_regions(model, image, cfg), image.shape[:2])
    if cfg.box_nms_thresh == 1.0:  # without NMS every prompt's mask survives: a many-mask comparison
        assert len(records) > 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_sam2_equals_the_library_generator(images, seed, setting) -> None:
    model = load_backbone(f"sam2:tiny@random:{seed}").model
    image = images[(seed + setting) % len(images)]
    cfg = Sam2RegionConfig(**SETTINGS[setting])
    masks, scores = sam2_masks(model, image, cfg)
    records = SAM2AutomaticMaskGenerator(model, **cfg.generator_kwargs()).generate(image)
    assert_same(masks, scores, records, sam2_regions(model, image, cfg), image.shape[:2])
    if cfg.box_nms_thresh == 1.0:
        assert len(records) > 1


def test_stability_scores_equal_the_library_formula() -> None:
    logits = torch.randn(6, 37, 53) * 3
    for threshold, offset in ((0.0, 1.0), (0.5, 0.25)):
        assert torch.equal(stability_scores(logits, threshold, offset), calculate_stability_score(logits, threshold, offset))


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="opencv is installed")
def test_small_region_removal_needs_opencv(images) -> None:
    model = load_backbone("sam:tiny").model
    cfg = SamRegionConfig(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=10)
    with pytest.raises(ImportError, match=r"SamRegionConfig.min_mask_region_area > 0 needs opencv-python \(cv2\)"):
        sam_masks(model, images[0], cfg)


@pytest.mark.slow
def test_bfloat16_compute_runs_in_autocast(images) -> None:
    model = load_backbone("sam:tiny").model
    cfg = SamRegionConfig(**SETTINGS[0])
    fp32 = sam_regions(model, images[0], cfg)
    bf16 = sam_regions(model, images[0], cfg, compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights untouched
    assert bf16.ids.shape == fp32.ids.shape and bf16.scores.dtype == np.float32
    with pytest.raises(ValueError, match="float16 on CUDA only"):
        sam_regions(model, images[0], cfg, compute_dtype=torch.float16)


@pytest.mark.slow
def test_sam_vit_b_random_equals_the_library_generator(images) -> None:
    """The bench's model (real vit_b architecture, random weights), paper thresholds off."""
    model = load_backbone("sam:vit_b@random:0").model
    cfg = SamRegionConfig(**SETTINGS[0])
    masks, scores = sam_masks(model, images[1], cfg)
    records = library_v1(model, images[1], cfg)
    assert_same(masks, scores, records, sam_regions(model, images[1], cfg), images[1].shape[:2])
