"""SC-CLIP (Self-Calibrated CLIP): training-free dense features from a CLIP ViT.

One module per method step: :mod:`.anomaly_detection`, :mod:`.anomaly_repair`,
:mod:`.self_adjusting` (attention enhancement, feature aggregation), :mod:`.multi_level_fusion`;
:mod:`.config` holds the hyperparameters and presets, :mod:`.pipeline` the per-window entry point.
The design document's training-free extensions (named options, off by default), one module each:
:mod:`.dynamic_anomaly_detection`, :mod:`.boundary_aware_repair`, :mod:`.progressive_calibration`,
:mod:`.selective_calibration`.
"""

from ovseg_core.scclip.anomaly_detection import detect_anomalies, lof_scores
from ovseg_core.scclip.anomaly_repair import repair_anomalies
from ovseg_core.scclip.config import PRESETS, SCCLIPConfig
from ovseg_core.scclip.pipeline import required_blocks, scclip_window_features, scclip_window_outputs

__all__ = [
    "PRESETS",
    "SCCLIPConfig",
    "detect_anomalies",
    "lof_scores",
    "repair_anomalies",
    "required_blocks",
    "scclip_window_features",
    "scclip_window_outputs",
]
