"""SC-CLIP hyperparameters (paper mode by default) and the ViT-B / ViT-L presets.

Block numbers are 1-based: "block i" is the output of the i-th transformer block, i.e. the
authors' ``feats[i - 1]``. Fields left ``None`` are filled from the preset of the tower's
depth by :meth:`SCCLIPConfig.resolved` (L = 12: ViT-B/16, L = 24: ViT-L/14).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

from ovseg_core.options import later_option

__all__ = [
    "CALIBRATION_STEPS",
    "DETECTORS",
    "SELECTIVE_PATHS",
    "PRESETS",
    "DetectorParams",
    "SCCLIPConfig",
    "ScclipPreset",
    "validate_detector_params",
]

DETECTORS: tuple[str, ...] = ("lof", "sklearn_lof", "l2norm_topk")
"""Anomaly detectors: the authors' LOF, scikit-learn's standard LOF, top-k by L2 norm."""

CALIBRATION_STEPS: tuple[str, ...] = ("anomaly_repair", "self_adjusting", "attention_enhancement", "multi_level_fusion")
"""SC-CLIP's calibration steps in the design document's order, named by their :class:`SCCLIPConfig` switches."""

SELECTIVE_PATHS: tuple[str, ...] = ("fast", "balanced", "full")
"""Paths of selective calibration, cheapest first (steps of each: :mod:`ovseg_core.scclip.selective_calibration`)."""


@dataclass(frozen=True)
class ScclipPreset:
    """Depth-dependent SC-CLIP settings of one backbone size (authors' ``clip/model.py``)."""

    pre_adjust_block: int  # block whose (repaired) output gives the mid-layer similarity Sim_mid
    post_adjust_block: int  # block whose output gives the post-adjust similarity W'
    fusion_blocks: tuple[int, int]  # inclusive block range summed by the multi-level fusion
    res_cls: float  # weight of the CLS token added to the last block's attention output


PRESETS: dict[int, ScclipPreset] = {
    12: ScclipPreset(pre_adjust_block=9, post_adjust_block=4, fusion_blocks=(4, 10), res_cls=0.3),
    24: ScclipPreset(pre_adjust_block=17, post_adjust_block=7, fusion_blocks=(9, 20), res_cls=0.1),
}
"""Presets by number of blocks L: 12 = ViT-B/16, 24 = ViT-L/14 (methods.md section 3)."""


class DetectorParams(Protocol):
    """The anomaly-detector fields shared by :class:`SCCLIPConfig` and the combined method's config."""

    detector: str
    n_neighbors: int
    contamination: float
    topk: int
    adaptive_contamination: bool
    adaptive_z: float
    lof_eps: float


def validate_detector_params(cfg: DetectorParams) -> None:
    """Raise ``ValueError`` naming the first detector field outside its allowed range."""
    name = type(cfg).__name__
    if cfg.detector not in DETECTORS:
        raise ValueError(f"{name}.detector must be one of {DETECTORS}, got {cfg.detector!r}")
    if cfg.n_neighbors < 1:
        raise ValueError(f"{name}.n_neighbors must be >= 1, got {cfg.n_neighbors}")
    if not 0.0 <= cfg.contamination < 0.5:
        raise ValueError(f"{name}.contamination must be in [0, 0.5), got {cfg.contamination}")
    if cfg.topk < 0:
        raise ValueError(f"{name}.topk must be >= 0, got {cfg.topk}")
    if not cfg.adaptive_z > 0.0:
        raise ValueError(f"{name}.adaptive_z must be > 0, got {cfg.adaptive_z}")
    if not cfg.lof_eps > 0.0:
        raise ValueError(f"{name}.lof_eps must be > 0, got {cfg.lof_eps}")


def _check_range(field: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"SCCLIPConfig.{field} must be in {interval}, got {value!r}")


def _validate_extensions(cfg: SCCLIPConfig) -> None:
    """Raise ``ValueError`` naming the first extension field (design document options) out of range."""
    _check_range("dynamic_base_ratio", cfg.dynamic_base_ratio, 0.0, 0.5, low_open=True)
    _check_range("dynamic_max_ratio", cfg.dynamic_max_ratio, 0.0, 0.5, low_open=True)
    _check_range("dynamic_entropy_weight", cfg.dynamic_entropy_weight, 0.0, math.inf)
    _check_range("dynamic_contrast_weight", cfg.dynamic_contrast_weight, 0.0, math.inf)
    for field in ("dynamic_lof_neighbors", "dynamic_semantic_neighbors"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SCCLIPConfig.{field} must be an int >= 1, got {value!r}")
    weights = cfg.dynamic_score_weights
    if len(weights) != 3 or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(
            "SCCLIPConfig.dynamic_score_weights must be three weights >= 0 (local, global, semantic) with a "
            f"positive sum, got {weights!r}"
        )
    object.__setattr__(cfg, "dynamic_score_weights", tuple(float(w) for w in weights))
    _check_range("complexity_sim_threshold", cfg.complexity_sim_threshold, -1.0, 1.0)
    _check_range("boundary_gap", cfg.boundary_gap, 0.0, 2.0, low_open=True)
    _check_range("gate_threshold", cfg.gate_threshold, -1.0, 1.0)
    _check_range("gate_entropy_weight", cfg.gate_entropy_weight, 0.0, 1.0)
    _check_range("gate_skip_complexity", cfg.gate_skip_complexity, 0.0, 1.0)
    if cfg.gate_skip_from not in CALIBRATION_STEPS:
        raise ValueError(f"SCCLIPConfig.gate_skip_from must be one of {CALIBRATION_STEPS}, got {cfg.gate_skip_from!r}")
    if not 0.0 <= cfg.selective_fast_below <= cfg.selective_full_from:
        raise ValueError(
            "SCCLIPConfig.selective_fast_below and selective_full_from must satisfy 0 <= fast_below <= full_from, "
            f"got {cfg.selective_fast_below!r} and {cfg.selective_full_from!r}"
        )
    if cfg.selective_force is not None and cfg.selective_force not in SELECTIVE_PATHS:
        raise ValueError(f"SCCLIPConfig.selective_force must be None or one of {SELECTIVE_PATHS}, got {cfg.selective_force!r}")
    if cfg.dynamic_detection and cfg.detector not in ("lof", "sklearn_lof"):
        raise ValueError(
            f"SCCLIPConfig.dynamic_detection scores tokens with LOF; detector must be 'lof' or 'sklearn_lof', got {cfg.detector!r}"
        )
    if cfg.dynamic_detection and cfg.adaptive_contamination:
        raise ValueError(
            "SCCLIPConfig.dynamic_detection and adaptive_contamination both set the number of anomalies; enable at most one"
        )
    for field in ("dynamic_detection", "boundary_aware_repair"):
        if getattr(cfg, field) and not cfg.anomaly_repair:
            raise ValueError(f"SCCLIPConfig.{field} acts on anomaly repair; it needs anomaly_repair=True")


@dataclass(frozen=True)
class SCCLIPConfig:
    """SC-CLIP settings; defaults reproduce the paper (authors' code), every component switchable.

    Use :meth:`vit_b` / :meth:`vit_l` for fully resolved presets, or leave the depth-dependent
    fields ``None`` and call :meth:`resolved` with the tower's number of blocks.
    """

    # --- anomaly detection and repair (paper step 1-2) ---
    anomaly_repair: bool = True  # detect anomalous penultimate patch tokens and repair them (paper: on)
    detector: str = "lof"  # "lof" (paper: authors' LOF, reach-dist uses k-dist(i)) | "sklearn_lof" (standard LOF) | "l2norm_topk" (authors' first release)
    n_neighbors: int = 30  # k of the LOF k-nearest neighbours, squared Euclidean distance (paper: 30)
    contamination: float = 0.05  # LOF detectors flag tokens whose score exceeds the (1 - contamination) quantile (paper: 0.05)
    topk: int = 10  # l2norm_topk flags the topk tokens of largest L2 norm (first release: 10)
    adaptive_contamination: bool = False  # extension (off = paper): also require a robust z-score > adaptive_z, see anomaly_detection
    adaptive_z: float = 8.0  # robust z-score threshold of adaptive_contamination (median, 1.4826 MAD); Gaussian token clouds stay below ~7
    lof_eps: float = 1e-10  # added to the mean reachability distance before inverting it (scikit-learn's 1e-10)
    # --- self-adjusting: attention enhancement and feature aggregation (paper step 3-6) ---
    pre_adjust_block: int | None = None  # block of Sim_mid (None -> preset; ViT-B: 9 = feats[8], ViT-L: 17)
    post_adjust_block: int | None = None  # block of the post-adjust similarity W' (None -> preset; ViT-B: 4, ViT-L: 7)
    self_adjusting: bool = True  # feature aggregation x := W x before (Sim_mid) and after (W') the last block (paper: on)
    attention_enhancement: bool = True  # A = 1/2[softmax(M) + softmax(KK^T/sqrt(d))]; off: A = softmax(KK^T/sqrt(d)) (paper: on)
    sim_threshold: float = 0.4  # cosine similarities below this are zeroed in the aggregation weights (paper: 0.4)
    attn_scale: float = 3.0  # M = attn_scale * (Sim_mid - mean(Sim_mid)), M < 0 -> -inf (paper: 3.0)
    res_cls: float | None = None  # weight of the CLS token added to the attention output (None -> preset; ViT-B 0.3, ViT-L 0.1)
    row_norm_eps: float = 1e-6  # aggregation rows are divided by (row sum + row_norm_eps) (paper: 1e-6)
    # --- multi-level fusion (paper step 7) ---
    multi_level_fusion: bool = True  # second pass over the sum of mid-level block outputs, added to x (paper: on)
    fusion_blocks: tuple[int, int] | None = None  # inclusive summed block range (None -> preset; ViT-B: 4..10, ViT-L: 9..20)
    # --- extensions proposed by the SC-CLIP design document (docs/methods.md section 7); all off = paper ---
    # (1) dynamic anomaly detection (module dynamic_anomaly_detection); acts with anomaly_repair
    dynamic_detection: bool = later_option(False)  # content-adaptive anomaly ratio and a local + global + semantic outlier score instead of the fixed-quantile LOF
    dynamic_base_ratio: float = later_option(0.05)  # ratio = min(max_ratio, base * (1 + entropy_weight * H + contrast_weight * C)) (document: 0.05)
    dynamic_entropy_weight: float = later_option(0.5)  # weight of the spatial entropy H in [0, 1] of the penultimate tokens (document: 0.5)
    dynamic_contrast_weight: float = later_option(0.5)  # weight of the local contrast C in [0, 1] of the penultimate tokens (document: 0.5)
    dynamic_max_ratio: float = later_option(0.15)  # cap of the ratio (document: 15 %; inactive at the document's other values, whose maximum is 10 %)
    dynamic_lof_neighbors: int = later_option(10)  # k of the local LOF score (document: 10; LOF variant from `detector`)
    dynamic_semantic_neighbors: int = later_option(10)  # semantic score: the k tokens most similar to the token at the pre-adjust block (ovseg)
    dynamic_score_weights: tuple[float, float, float] = later_option((1.0, 1.0, 1.0))  # weights of the robust z-scores of the local, global, semantic scores, summed (ovseg)
    complexity_sim_threshold: float = later_option(0.4)  # spatial entropy: tokens whose cosine is >= this count as alike (ovseg; SC-CLIP's aggregation threshold)
    # (1) boundary-aware repair (module boundary_aware_repair); acts with anomaly_repair
    boundary_aware_repair: bool = later_option(False)  # an anomaly on a semantic boundary is repaired from its own side's neighbours only (paper: all valid neighbours)
    boundary_gap: float = later_option(0.2)  # boundary: the 2-means split of the neighbours' mid-layer cosines to the token has group means >= this apart (ovseg)
    # (4) progressive, quality-gated calibration (module progressive_calibration); needs the text embeddings
    progressive_calibration: bool = later_option(False)  # the steps in order; a step is kept per window only if the quality score passes gate_threshold
    gate_threshold: float = later_option(0.0)  # a step is kept when Q(after) - Q(before) >= this; Q in [0, 1] (ovseg)
    gate_entropy_weight: float = later_option(0.5)  # Q = (1 - w) * (agreement + 1) / 2 + w * (1 - prediction entropy) (ovseg)
    gate_skip_complexity: float = later_option(0.0)  # windows whose complexity (H + C) / 2 is below this skip the steps from gate_skip_from on (0: never)
    gate_skip_from: str = later_option("attention_enhancement")  # the first of the later steps skipped on simple windows (a CALIBRATION_STEPS name)
    # (6) selective calibration (module selective_calibration)
    selective_calibration: bool = later_option(False)  # a per-window predictor picks the fast, balanced or full path (paper: always full)
    selective_fast_below: float = later_option(8.0)  # need (largest robust z-score of the LOF scores) below this: fast path (ovseg)
    selective_full_from: float = later_option(32.0)  # need at or above this: full path; in between: balanced (ovseg)
    selective_force: str | None = later_option(None)  # "fast" | "balanced" | "full": every window takes this path (ablations); None: the predictor picks

    def __post_init__(self) -> None:
        validate_detector_params(self)
        for field in ("pre_adjust_block", "post_adjust_block"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"SCCLIPConfig.{field} must be a 1-based block number >= 1 or None, got {value}")
        if self.fusion_blocks is not None:
            fb = self.fusion_blocks
            if len(fb) != 2 or not 1 <= fb[0] <= fb[1]:
                raise ValueError(
                    f"SCCLIPConfig.fusion_blocks must be (first, last) with 1 <= first <= last, or None; got {fb}"
                )
            object.__setattr__(self, "fusion_blocks", (int(fb[0]), int(fb[1])))
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"SCCLIPConfig.sim_threshold must be a cosine in [-1, 1], got {self.sim_threshold}")
        if not self.attn_scale > 0.0:
            raise ValueError(f"SCCLIPConfig.attn_scale must be > 0, got {self.attn_scale}")
        if self.res_cls is not None and self.res_cls < 0.0:
            raise ValueError(f"SCCLIPConfig.res_cls must be >= 0 or None, got {self.res_cls}")
        if not self.row_norm_eps > 0.0:
            raise ValueError(f"SCCLIPConfig.row_norm_eps must be > 0, got {self.row_norm_eps}")
        _validate_extensions(self)

    @property
    def is_resolved(self) -> bool:
        """True when no depth-dependent field is ``None``."""
        return None not in (self.pre_adjust_block, self.post_adjust_block, self.fusion_blocks, self.res_cls)

    def resolved(self, num_blocks: int) -> SCCLIPConfig:
        """Fill ``None`` fields from the preset for ``num_blocks`` and check blocks against it.

        Args:
            num_blocks: L, the number of blocks of the CLIP tower (12 or 24 have presets; any L
                works when every depth-dependent field is set explicitly).
        Raises:
            ValueError: no preset for L while a field is ``None``, or a block outside ``1..L-1``.
        """
        cfg = self
        if not cfg.is_resolved:
            if num_blocks not in PRESETS:
                raise ValueError(
                    f"no SC-CLIP preset for a {num_blocks}-block tower (presets: {sorted(PRESETS)}); "
                    "set pre_adjust_block, post_adjust_block, fusion_blocks and res_cls explicitly"
                )
            p = PRESETS[num_blocks]
            cfg = dataclasses.replace(
                cfg,
                pre_adjust_block=p.pre_adjust_block if cfg.pre_adjust_block is None else cfg.pre_adjust_block,
                post_adjust_block=p.post_adjust_block if cfg.post_adjust_block is None else cfg.post_adjust_block,
                fusion_blocks=p.fusion_blocks if cfg.fusion_blocks is None else cfg.fusion_blocks,
                res_cls=p.res_cls if cfg.res_cls is None else cfg.res_cls,
            )
        last = num_blocks - 1
        for field, value in (
            ("pre_adjust_block", cfg.pre_adjust_block),
            ("post_adjust_block", cfg.post_adjust_block),
            ("fusion_blocks", cfg.fusion_blocks[1]),  # type: ignore[index]
        ):
            if not 1 <= value <= last:  # type: ignore[operator]
                raise ValueError(
                    f"SCCLIPConfig.{field} must use blocks 1..{last} (before the last block) of a "
                    f"{num_blocks}-block tower, got {getattr(cfg, field)}"
                )
        return cfg

    @classmethod
    def vit_b(cls, **overrides: object) -> SCCLIPConfig:
        """Paper settings for CLIP ViT-B/16 (12 blocks), fully resolved."""
        return cls(**overrides).resolved(12)  # type: ignore[arg-type]

    @classmethod
    def vit_l(cls, **overrides: object) -> SCCLIPConfig:
        """Paper settings for CLIP ViT-L/14 (24 blocks), fully resolved."""
        return cls(**overrides).resolved(24)  # type: ignore[arg-type]
