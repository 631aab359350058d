"""The method registry: the only place a segmentation method's name exists.

Like ``sam_model_registry`` or open_clip's factory, ``METHODS`` maps a name to what the
pipeline needs to know about the method: its config (built and validated from the
experiment's ``params``), the CLIP block aggregates it reads, whether it uses CorrCLIP's
region inputs (SAM regions, mask class tokens, map correction) and which correlation source
(``dino_qk``: DINO features + mask clustering; ``vfm``: a VFM's dense map, CorrCLIPv2), its
per-window feature function, its default backbones, and which config fields each of its stages
reads (so that a stage key hashes exactly those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.baselines import BASELINE_METHODS, baseline_required_blocks, baseline_window_features
from ovseg_core.config_fields import CLUSTERING_FIELDS, NOT_READ_BY_RECONSTRUCTION, unread_by_reconstruction
from ovseg_core.combined import CombinedConfig, combined_required_blocks, combined_token_transform
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.config import required_blocks as corrclip_required_blocks
from ovseg_core.corrclip.pipeline import corrclip_window_features
from ovseg_core.datasets import FAMILY_MODELS
from ovseg_core.names import did_you_mean
from ovseg_core.scclip.config import SCCLIPConfig
from ovseg_core.scclip.pipeline import required_blocks as scclip_required_blocks
from ovseg_core.scclip.pipeline import scclip_window_outputs

__all__ = ["CORRCLIPV2_DEFAULTS", "CORRCLIPV2_MODELS", "CORRELATIONS", "METHODS", "Method", "WindowInputs",
           "WindowRecord", "get_method", "CLUSTERING_FIELDS", "NOT_READ_BY_RECONSTRUCTION"]

# Sources of the patch correlation S of the methods with regions: "dino_qk" (the dino_features and
# mask_clustering stages, CorrCLIP v1), "vfm" (a VFM's dense map, ovseg_core.corrclip.vfm_correlation,
# CorrCLIPv2).
CORRELATIONS: tuple[str, ...] = ("dino_qk", "vfm")


@dataclass(frozen=True)
class WindowInputs:
    """Inputs of a method's window features besides crops and CLIP blocks.

    Attributes:
        qk: ``(B, hd, wd, C)`` L2-normalised DINO q+k features.
        regions: ``(B, H, W) int64`` region ids at crop resolution.
        merged: ``(B, hd, wd) int64`` mask-clustering output (on the correlation grid).
        semantic: ``(B, gh, gw, D)`` mask class tokens, or None.
        vfm: ``(B, hc, wc, C)`` L2-normalised VFM features on the correlation grid (CorrCLIPv2;
            ``ovseg_core.corrclip.vfm_correlation.vfm_window_features``).
        text: ``(Q, E)`` L2-normalised query embeddings shared by every window (read by SC-CLIP's
            ``progressive_calibration``, whose quality score looks at the predictions).
        logit_scale: the prediction's softmax scale, with ``text``.
    """

    qk: torch.Tensor | None = None
    regions: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    semantic: torch.Tensor | None = None
    vfm: torch.Tensor | None = None
    text: torch.Tensor | None = None
    logit_scale: float | None = None


WindowFeatures = Callable[[nn.Module, torch.Tensor, Any, Mapping[str, torch.Tensor], WindowInputs], torch.Tensor]
WindowRecord = dict[str, torch.Tensor]
"""Per-window facts a method reports besides its features: ``{name: (B,) bool or integer tensor}``."""
WindowOutputs = Callable[[nn.Module, torch.Tensor, Any, Mapping[str, torch.Tensor], WindowInputs],
                         tuple[torch.Tensor, WindowRecord]]


@dataclass(frozen=True)
class Method:
    """One segmentation method.

    Attributes:
        name: registry name (``methods[].method`` in experiment files).
        family: ``"corrclip"``, ``"scclip"`` or ``"corrclipv2"``: whose dataset presets and class
            files it uses (``ovseg_core.datasets.METHOD_VARIANTS``).
        build: ``(params, num_blocks) -> config`` (validated; errors name the field).
        required_blocks: ``(config, num_blocks) -> aggregate names`` read from ``clip_layers``.
        window_features: ``(visual, crops, config, blocks, inputs) -> (B, h, w, E)`` features.
        uses_regions: reads SAM regions (CorrCLIP family: scope reconstruction, mask class tokens,
            map correction).
        correlation: with regions, the source of the correlation S (one of ``CORRELATIONS``):
            ``"dino_qk"`` reads the dino_features and mask_clustering stages, ``"vfm"`` a VFM's
            dense map (``WindowInputs.vfm``; no mask clustering stage).
        default_models: backbones the method's paper uses, by role (``clip``, ``vfm``); empty: the
            experiment's defaults.
        window_outputs: ``window_features`` plus a :data:`WindowRecord` (SC-CLIP's extensions
            report their per-window choices); None: the method records nothing.
    """

    name: str
    family: str
    build: Callable[[Mapping[str, Any], int], Any]
    required_blocks: Callable[[Any, int], tuple[str, ...]]
    window_features: WindowFeatures
    uses_regions: bool = False
    correlation: str = "dino_qk"
    default_models: Mapping[str, str] = dataclasses.field(default_factory=dict)
    window_outputs: WindowOutputs | None = None

    def __post_init__(self) -> None:
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"Method.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")

    def features_and_record(self, visual: nn.Module, crops: torch.Tensor, cfg: Any,
                            blocks: Mapping[str, torch.Tensor] | None, inputs: WindowInputs
                            ) -> tuple[torch.Tensor, WindowRecord]:
        """``(B, h, w, E)`` window features and the per-window record (``{}`` for methods without one)."""
        if self.window_outputs is None:
            return self.window_features(visual, crops, cfg, blocks, inputs), {}  # type: ignore[arg-type]
        return self.window_outputs(visual, crops, cfg, blocks, inputs)  # type: ignore[arg-type]

    def corrclip_config(self, cfg: Any) -> CorrCLIPConfig | None:
        """The CorrCLIP part of a config (None for methods without regions)."""
        if not self.uses_regions:
            return None
        return cfg[0] if isinstance(cfg, tuple) else cfg

    def semantic_branch(self, cfg: Any) -> bool:
        c = self.corrclip_config(cfg)
        return bool(c is not None and c.semantic_branch)

    def map_correction(self, cfg: Any) -> bool:
        c = self.corrclip_config(cfg)
        return bool(c is not None and c.map_correction)

    def clustering_config(self, cfg: Any) -> CorrCLIPConfig | None:
        """A CorrCLIP config holding only the fields mask clustering reads (others at their defaults).

        None for methods without regions and for the ``vfm`` correlation (no mask clustering stage).
        """
        c = self.corrclip_config(cfg)
        if c is None or self.correlation != "dino_qk":
            return None
        return CorrCLIPConfig(**{f: getattr(c, f) for f in CLUSTERING_FIELDS})

    def relabel_config(self, cfg: Any) -> CorrCLIPConfig | None:
        """The config of the region relabelling the ``vfm`` correlation's semantic branch pools over.

        Without DBSCAN (CorrCLIPv2's default) the merged map of a window is the region map on the
        correlation grid renumbered by ``cluster_masks(None, ...)``, which reads ``m0_quirk`` and
        ``padding`` only: the mask class tokens are then a stage of their own over ``sam_masks``,
        keyed by these two fields (other fields at their defaults). None for the ``dino_qk``
        correlation (its tokens read the ``mask_clustering`` stage), without the semantic branch, and
        with ``mask_clustering=True`` (the DBSCAN option reads the VFM features: the reconstruction
        computes the tokens itself).
        """
        c = self.corrclip_config(cfg)
        if c is None or self.correlation != "vfm" or not c.semantic_branch or c.mask_clustering:
            return None
        return CorrCLIPConfig(mask_clustering=False, m0_quirk=c.m0_quirk, padding=c.padding)

    def semantic_stage(self, cfg: Any) -> bool:
        """The semantic branch reads its tokens from the ``mask_class_tokens`` stage.

        True for the ``dino_qk`` correlation with the branch on, and for ``vfm`` without DBSCAN
        (:meth:`relabel_config`); ``vfm`` with ``mask_clustering=True`` computes them in the reconstruction.
        """
        if not self.semantic_branch(cfg):
            return False
        return self.correlation == "dino_qk" or self.relabel_config(cfg) is not None

    def reconstruction_config(self, cfg: Any) -> Any:
        """The config with the fields reconstruction does not read reset to their defaults.

        ``dino_qk``: every field of ``NOT_READ_BY_RECONSTRUCTION``; ``vfm``: only ``map_correction``
        (its reconstruction relabels the regions itself, reading the clustering fields and ``m0_quirk``).
        """
        c = self.corrclip_config(cfg)
        if c is None:
            return cfg
        defaults = CorrCLIPConfig()
        not_read = unread_by_reconstruction(self.correlation)
        reset = dataclasses.replace(c, **{f: getattr(defaults, f) for f in not_read})
        return (reset, cfg[1]) if isinstance(cfg, tuple) else reset


def _check_keys(cls: type, params: Mapping[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for k in params:
        if k not in names:
            raise ValueError(f"{where}: unknown key {k!r}{did_you_mean(k, names)} for {cls.__name__}; valid keys: {sorted(names)}")


def _make(cls: type, params: Mapping[str, Any], where: str) -> Any:
    _check_keys(cls, params, where)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _build_corrclip(params: Mapping[str, Any], num_blocks: int) -> CorrCLIPConfig:
    return _make(CorrCLIPConfig, params, "corrclip params")


def _build_scclip(params: Mapping[str, Any], num_blocks: int) -> SCCLIPConfig:
    return _make(SCCLIPConfig, params, "scclip params").resolved(num_blocks)


def _build_combined(params: Mapping[str, Any], num_blocks: int) -> tuple[CorrCLIPConfig, CombinedConfig]:
    corr = {k: v for k, v in params.items() if k != "scclip"}
    return (_make(CorrCLIPConfig, corr, "corrclip+scclip params"),
            _make(CombinedConfig, dict(params.get("scclip") or {}), "corrclip+scclip params.scclip"))


def _build_none(name: str) -> Callable[[Mapping[str, Any], int], None]:
    def build(params: Mapping[str, Any], num_blocks: int) -> None:
        if params:
            raise ValueError(f"method {name!r} takes no params, got {sorted(params)}")
        return None
    return build


# CorrCLIPv2 defaults that differ from CorrCLIPConfig's (v1) defaults: no DBSCAN mask merging
# (commented out in CorrCLIPv2/open_clip/transformer.py), the correlation from a VFM.
CORRCLIPV2_DEFAULTS: Mapping[str, Any] = MappingProxyType({"mask_clustering": False, "similarity": "vfm"})
# The backbones CorrCLIPv2's paper sets differently from the experiment's (CorrCLIP's) defaults, by role;
# the names are FAMILY_MODELS["corrclipv2"]'s (ovseg_core.datasets: the one table of the papers' backbones).
CORRCLIPV2_MODELS: Mapping[str, str] = MappingProxyType({role: str(getattr(FAMILY_MODELS["corrclipv2"], role))
                                                         for role in ("clip", "vfm")})


def _build_corrclipv2(params: Mapping[str, Any], num_blocks: int) -> CorrCLIPConfig:
    cfg = _make(CorrCLIPConfig, {**CORRCLIPV2_DEFAULTS, **params}, "corrclipv2 params")
    if cfg.similarity != "vfm":
        raise ValueError(f"corrclipv2 params: similarity must be 'vfm' (its correlation is a VFM's), got "
                         f"{cfg.similarity!r}; use method corrclip for the DINO q+k correlation")
    return cfg


def _corrclipv2_features(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                         inputs: WindowInputs) -> torch.Tensor:
    if inputs.vfm is None or inputs.regions is None:
        raise ValueError("CorrCLIPv2 needs VFM correlation features and region windows (WindowInputs.vfm, .regions); "
                         "make them with ovseg_core.corrclip.vfm_correlation.vfm_window_features")
    return corrclip_window_features(visual, crops, inputs.vfm, inputs.regions, cfg, blocks=blocks,
                                    semantic=inputs.semantic, merged=inputs.merged)


def _corrclip_features(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                       inputs: WindowInputs) -> torch.Tensor:
    corr, transform = cfg, None
    if isinstance(cfg, tuple):
        corr = cfg[0]
        transform = combined_token_transform(cfg[1], blocks, num_blocks=clip_ops.num_blocks(visual))
    if inputs.qk is None or inputs.regions is None:
        raise ValueError("CorrCLIP needs DINO q+k features and region windows (WindowInputs.qk, .regions)")
    return corrclip_window_features(visual, crops, inputs.qk, inputs.regions, corr, blocks=blocks,
                                    semantic=inputs.semantic, token_transform=transform, merged=inputs.merged)


def _scclip_outputs(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                    inputs: WindowInputs) -> tuple[torch.Tensor, WindowRecord]:
    return scclip_window_outputs(visual, crops, cfg, blocks=blocks, text=inputs.text, logit_scale=inputs.logit_scale)


def _scclip_features(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                     inputs: WindowInputs) -> torch.Tensor:
    return _scclip_outputs(visual, crops, cfg, blocks, inputs)[0]


def _baseline(name: str) -> Method:
    def features(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                 inputs: WindowInputs) -> torch.Tensor:
        return baseline_window_features(visual, crops, name, blocks=blocks)

    return Method(name, "scclip", _build_none(name), lambda cfg, n: tuple(baseline_required_blocks(name, n)), features)


def _scclip_blocks(cfg: SCCLIPConfig, num_blocks: int) -> tuple[str, ...]:
    return tuple(scclip_required_blocks(cfg, num_blocks))


def _combined_blocks(cfg: tuple[CorrCLIPConfig, CombinedConfig], num_blocks: int) -> tuple[str, ...]:
    return tuple(sorted(set(corrclip_required_blocks(cfg[0], num_blocks))
                        | set(combined_required_blocks(cfg[1], num_blocks))))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("corrclip", "corrclip", _build_corrclip, lambda cfg, n: tuple(corrclip_required_blocks(cfg, n)),
           _corrclip_features, uses_regions=True),
    Method("scclip", "scclip", _build_scclip, _scclip_blocks, _scclip_features, window_outputs=_scclip_outputs),
    *(_baseline(name) for name in BASELINE_METHODS),
    Method("corrclip+scclip", "corrclip", _build_combined, _combined_blocks, _corrclip_features, uses_regions=True),
    Method("corrclipv2", "corrclipv2", _build_corrclipv2, lambda cfg, n: tuple(corrclip_required_blocks(cfg, n)),
           _corrclipv2_features, uses_regions=True, correlation="vfm", default_models=CORRCLIPV2_MODELS),
)}


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; valid methods: {', '.join(METHODS)}") from None
