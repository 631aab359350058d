"""CorrCLIP (training-free open-vocabulary segmentation with corrected patch correlations).

One module per method step: ``mask_clustering``, ``scope_reconstruction``,
``value_reconstruction``, ``mask_class_tokens`` + ``feature_refinement``, ``map_correction``;
``pipeline.corrclip_window_features`` is the per-window entry point. CorrCLIPv2's one new step,
``vfm_correlation`` (the VFM's dense map -> per-window correlation features), feeds the same
entry point (method ``corrclipv2`` in ``ovseg_core.methods``).
"""

from ovseg_core.corrclip.config import (
    PADDING_MODES,
    CorrCLIPConfig,
    num_spatial_blocks,
    required_blocks,
    spatial_block_range,
)
from ovseg_core.corrclip.feature_refinement import feature_refinement
from ovseg_core.corrclip.map_correction import map_correction
from ovseg_core.corrclip.mask_class_tokens import mask_class_tokens
from ovseg_core.corrclip.mask_clustering import (
    PADDING_ID,
    REFERENCE_PADDING_ID,
    cluster_masks,
    padding_as_region,
    resize_regions,
)
from ovseg_core.corrclip.pipeline import corrclip_window_features
from ovseg_core.corrclip.scope_reconstruction import scope_reconstruction, similarity
from ovseg_core.corrclip.value_reconstruction import value_reconstruction
from ovseg_core.corrclip.vfm_correlation import bilinear_matrix, correlation_grid, vfm_window_features

__all__ = [
    "PADDING_ID",
    "PADDING_MODES",
    "REFERENCE_PADDING_ID",
    "CorrCLIPConfig",
    "bilinear_matrix",
    "cluster_masks",
    "correlation_grid",
    "corrclip_window_features",
    "feature_refinement",
    "map_correction",
    "mask_class_tokens",
    "num_spatial_blocks",
    "padding_as_region",
    "required_blocks",
    "resize_regions",
    "scope_reconstruction",
    "similarity",
    "spatial_block_range",
    "value_reconstruction",
    "vfm_window_features",
]
