"""The method registry: the only place a segmentation method's name exists.

Like ``sam_model_registry`` or open_clip's factory, ``METHODS`` maps a name to what the
pipeline needs to know about the method: its config (built and validated from the
experiment's ``params``), the CLIP block aggregates it reads, whether it uses CorrCLIP's
region inputs (SAM regions, DINO features, mask clustering, mask class tokens, map
correction), its per-window feature function, and which config fields each of its stages
reads (so that a stage key hashes exactly those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.baselines import BASELINE_METHODS, baseline_required_blocks, baseline_window_features
from ovseg_core.combined import CombinedConfig, combined_required_blocks, combined_token_transform
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.config import required_blocks as corrclip_required_blocks
from ovseg_core.corrclip.pipeline import corrclip_window_features
from ovseg_core.names import did_you_mean
from ovseg_core.scclip.config import SCCLIPConfig
from ovseg_core.scclip.pipeline import required_blocks as scclip_required_blocks
from ovseg_core.scclip.pipeline import scclip_window_features

__all__ = ["METHODS", "Method", "WindowInputs", "get_method", "CLUSTERING_FIELDS", "NOT_READ_BY_RECONSTRUCTION"]

# CorrCLIP fields read by mask clustering (``cluster_masks``); the mask_clustering stage key hashes only these.
CLUSTERING_FIELDS: tuple[str, ...] = ("mask_clustering", "dbscan_eps", "dbscan_min_samples", "m0_quirk", "padding")
# CorrCLIP fields the reconstruction stage does not read (they act through its upstream keys or
# in map correction); every other field enters the reconstruction key.
NOT_READ_BY_RECONSTRUCTION: tuple[str, ...] = ("mask_clustering", "dbscan_eps", "dbscan_min_samples", "m0_quirk",
                                               "map_correction")


@dataclass(frozen=True)
class WindowInputs:
    """Per-window inputs of the CorrCLIP family besides crops and CLIP blocks (all ``(B, ...)``).

    Attributes:
        qk: ``(B, hd, wd, C)`` L2-normalised DINO q+k features.
        regions: ``(B, H, W) int64`` region ids at crop resolution.
        merged: ``(B, hd, wd) int64`` mask-clustering output.
        semantic: ``(B, gh, gw, D)`` mask class tokens, or None.
    """

    qk: torch.Tensor | None = None
    regions: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    semantic: torch.Tensor | None = None


WindowFeatures = Callable[[nn.Module, torch.Tensor, Any, Mapping[str, torch.Tensor], WindowInputs], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One segmentation method.

    Attributes:
        name: registry name (``methods[].method`` in experiment files).
        family: ``"corrclip"`` or ``"scclip"``: whose dataset presets and class files it uses.
        build: ``(params, num_blocks) -> config`` (validated; errors name the field).
        required_blocks: ``(config, num_blocks) -> aggregate names`` read from ``clip_layers``.
        window_features: ``(visual, crops, config, blocks, inputs) -> (B, h, w, E)`` features.
        uses_regions: reads SAM regions, DINO features and mask clustering (CorrCLIP family).
    """

    name: str
    family: str
    build: Callable[[Mapping[str, Any], int], Any]
    required_blocks: Callable[[Any, int], tuple[str, ...]]
    window_features: WindowFeatures
    uses_regions: bool = False

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
        """A CorrCLIP config holding only the fields mask clustering reads (others at their defaults)."""
        c = self.corrclip_config(cfg)
        if c is None:
            return None
        return CorrCLIPConfig(**{f: getattr(c, f) for f in CLUSTERING_FIELDS})

    def reconstruction_config(self, cfg: Any) -> Any:
        """The config with the fields reconstruction does not read reset to their defaults."""
        c = self.corrclip_config(cfg)
        if c is None:
            return cfg
        defaults = CorrCLIPConfig()
        reset = dataclasses.replace(c, **{f: getattr(defaults, f) for f in NOT_READ_BY_RECONSTRUCTION})
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


def _scclip_features(visual: nn.Module, crops: torch.Tensor, cfg: Any, blocks: Mapping[str, torch.Tensor],
                     inputs: WindowInputs) -> torch.Tensor:
    return scclip_window_features(visual, crops, cfg, blocks=blocks)


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
    Method("scclip", "scclip", _build_scclip, _scclip_blocks, _scclip_features),
    *(_baseline(name) for name in BASELINE_METHODS),
    Method("corrclip+scclip", "corrclip", _build_combined, _combined_blocks, _corrclip_features, uses_regions=True),
)}


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; valid methods: {', '.join(METHODS)}") from None
