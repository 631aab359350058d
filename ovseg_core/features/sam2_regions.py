"""Region maps from SAM 2 automatic masks (the region source of the CorrCLIP paper).

CorrCLIP step 1, *region masks* (methods.md §2.1). The paper's numbers use SAM 2 masks
pre-generated at 32 points per side (read them with :mod:`ovseg_core.features.region_files`);
the reference's on-the-fly option (``CorrCLIPv1/corrclip_segmentor.py``, ``set_mask_generator``
and ``generate_mask`` for ``mask_generator='sam2'``) is what :class:`Sam2RegionConfig`
defaults to:

- model ``build_sam2("sam2_hiera_l.yaml", "sam2_hiera_large.pt", apply_postprocessing=False)``,
  i.e. backbone ``sam2:hiera_l`` (:mod:`ovseg_core.backbones`), in half precision with
  ``torch.autocast(float16)`` on the GPU;
- ``SAM2AutomaticMaskGenerator(points_per_side=8, pred_iou_thresh=0.4,
  stability_score_thresh=0.4, multimask_output=False)``, library defaults otherwise;
- the records sorted by ``area`` ascending (a stable sort) and painted with ids 1, 2, ... so
  larger masks overwrite smaller ones; 0 = unsegmented. :func:`sam2_regions` paints the same way
  (:func:`~ovseg_core.features.regions.paint_region_map`).

The paper's pre-generation setting is ``Sam2RegionConfig(points_per_side=32)`` on ``sam2:hiera_l``
(its other parameters are given in the paper, not in the code).

Masks come from :func:`~ovseg_core.features.automatic_masks.generate_masks` over the library's
``SAM2ImagePredictor`` (the pieces ``SAM2AutomaticMaskGenerator`` itself calls, including its
private ``_features`` and ``_transforms``), which returns the library generator's masks without its
RLE round trip and without upsampling masks the IoU filter drops; ``use_m2m=True`` runs the
library generator itself.

Precision: ``compute_dtype`` runs the network under ``torch.autocast`` in that dtype (the
reference: ``float16`` on CUDA); load the model in float32 (``load_backbone(..., dtype=torch.float32)``):
on CPU the sam2 code cannot mix bfloat16 weights with its float32 layer norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .automatic_masks import AutomaticMaskConfig, generate_masks, network_autocast
from .region_painting import RegionMap, check_rgb_image, paint_region_map

__all__ = ["Sam2RegionConfig", "sam2_masks", "sam2_regions"]


@dataclass(frozen=True)
class Sam2RegionConfig(AutomaticMaskConfig):
    """Every ``SAM2AutomaticMaskGenerator`` parameter (sam2 1.1.0) but ``output_mode``.

    Shared fields and their defaults: :class:`~ovseg_core.features.regions.AutomaticMaskConfig`
    (the CorrCLIP on-the-fly reference: 8 points per side, thresholds 0.4, single-mask output).
    The paper's pre-generated masks used ``points_per_side=32``. With ``min_mask_region_area > 0``
    the library fills holes with its CUDA kernel (skipped with a warning when it is not built, as
    on CPU) and removes small regions with opencv (``cv2``, not installed by default).
    """

    mask_threshold: float = 0.0  # logit above which a pixel is in the mask; library default 0.0
    use_m2m: bool = False  # one refinement pass feeding each mask back as a prompt; library default False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not np.isfinite(self.mask_threshold):
            raise ValueError(f"Sam2RegionConfig.mask_threshold must be finite, got {self.mask_threshold}")

    def generator_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``SAM2AutomaticMaskGenerator`` for this config (binary masks)."""
        grids = None if self.point_grids is None else self.layer_point_grids()
        return {
            "points_per_side": self.points_per_side,
            "points_per_batch": self.points_per_batch,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "stability_score_offset": self.stability_score_offset,
            "mask_threshold": self.mask_threshold,
            "box_nms_thresh": self.box_nms_thresh,
            "crop_n_layers": self.crop_n_layers,
            "crop_nms_thresh": self.crop_nms_thresh,
            "crop_overlap_ratio": self.crop_overlap_ratio,
            "crop_n_points_downscale_factor": self.crop_n_points_downscale_factor,
            "point_grids": grids,
            "min_mask_region_area": self.min_mask_region_area,
            "output_mode": "binary_mask",
            "use_m2m": self.use_m2m,
            "multimask_output": self.multimask_output,
        }


class _Sam2PromptDecoder:
    """:class:`~ovseg_core.features.automatic_masks.PromptDecoder` over sam2's ``SAM2ImagePredictor``."""

    def __init__(self, sam2_model: nn.Module, cfg: Sam2RegionConfig) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = sam2_model
        # As SAM2AutomaticMaskGenerator builds it (hole filling up to min_mask_region_area).
        self.predictor = SAM2ImagePredictor(
            sam2_model, max_hole_area=cfg.min_mask_region_area, max_sprinkle_area=cfg.min_mask_region_area
        )

    def set_image(self, crop: np.ndarray) -> None:
        self.predictor.set_image(crop)
        self.crop_hw = crop.shape[:2]

    def decode(self, points: np.ndarray, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # As SAM2AutomaticMaskGenerator._process_batch and SAM2ImagePredictor._predict do.
        predictor, model = self.predictor, self.model
        coords = torch.as_tensor(points, dtype=torch.float32, device=predictor.device)
        coords = predictor._transforms.transform_coords(coords, normalize=True, orig_hw=self.crop_hw)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = model.sam_prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        features = predictor._features
        low_res, iou_preds, _, _ = model.sam_mask_decoder(
            image_embeddings=features["image_embed"][-1].unsqueeze(0),
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=coords.shape[0] > 1,
            high_res_features=[level[-1].unsqueeze(0) for level in features["high_res_feats"]],
        )
        return low_res.flatten(0, 1)[:, None], iou_preds.flatten(0, 1)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        return self.predictor._transforms.postprocess_masks(low_res, self.crop_hw)[:, 0]


def _library_masks(sam2_model: nn.Module, image: np.ndarray, cfg: Sam2RegionConfig, compute_dtype: torch.dtype):
    """``SAM2AutomaticMaskGenerator.generate`` itself (for ``use_m2m``): masks and predicted IoUs."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(sam2_model, **cfg.generator_kwargs())
    try:
        with network_autocast(sam2_model, compute_dtype):
            records = generator.generate(image)
    except ImportError as e:
        raise ImportError("Sam2RegionConfig.min_mask_region_area > 0 needs opencv-python (cv2)") from e
    height, width = image.shape[:2]
    if not records:
        return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
    masks = np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])
    return masks, np.asarray([r["predicted_iou"] for r in records], dtype=np.float32)


@torch.no_grad()
def sam2_masks(
    sam2_model: nn.Module, image: np.ndarray, cfg: Sam2RegionConfig, *, compute_dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    """SAM 2 automatic masks at the image's resolution, as ``SAM2AutomaticMaskGenerator.generate`` gives them.

    Args:
        sam2_model: a sam2 ``SAM2Base`` (``load_backbone("sam2:...").model``); its device is used.
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters.
        compute_dtype: autocast dtype of the network (see the module docstring).
    Returns:
        masks ``(Z, H, W) bool`` and their predicted IoUs ``(Z,) float32``, in the generator's order.
    """
    check_rgb_image(image)
    if cfg.use_m2m:
        return _library_masks(sam2_model, image, cfg, compute_dtype)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    return generate_masks(
        _Sam2PromptDecoder(sam2_model, cfg),
        sam2_model,
        image,
        cfg,
        mask_threshold=cfg.mask_threshold,
        postprocess_small_regions=SAM2AutomaticMaskGenerator.postprocess_small_regions,
        compute_dtype=compute_dtype,
    )


def sam2_regions(
    sam2_model: nn.Module, image: np.ndarray, cfg: Sam2RegionConfig, *, compute_dtype: torch.dtype = torch.float32
) -> RegionMap:
    """CorrCLIP region masks from SAM 2: automatic masks painted by ascending area, original resolution.

    Args:
        sam2_model: a sam2 ``SAM2Base``.
        image: ``(H, W, 3) uint8`` RGB.
        cfg: generation parameters (reference defaults in :class:`Sam2RegionConfig`).
        compute_dtype: autocast dtype of the network (see the module docstring).
    Returns:
        a :class:`RegionMap`; all zeros with ``Z = 0`` when no mask survives the filters.
    """
    masks, scores = sam2_masks(sam2_model, image, cfg, compute_dtype=compute_dtype)
    return paint_region_map(masks, scores)
