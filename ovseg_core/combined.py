"""CorrCLIP + SC-CLIP ("corrclip+scclip", beyond both papers).

SC-CLIP's anomaly repair (and optionally its mid-layer similarity aggregation) applied to the
penultimate CLIP tokens (output of block L-1) that feed CorrCLIP's main branch. CorrCLIP's
entry point ``corrclip_window_features(..., token_transform=...)`` calls the transform built
here on its ``(B, 1 + N, D)`` penultimate tokens with the CLIP grid ``(gh, gw)``:

1. anomaly detection on the patch tokens (SC-CLIP's detector fields);
2. anomaly repair (3x3 valid-neighbour mean);
3. optional mid-layer similarity aggregation: ``x := W @ x`` with ``W`` the thresholded,
   row-normalised cosine similarity of the mid block's patch tokens, repaired at the same
   positions (SC-CLIP's pre-adjust step).

The CLS token is passed through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ovseg_core.scclip.anomaly_detection import detect_anomalies
from ovseg_core.scclip.anomaly_repair import repair_anomalies
from ovseg_core.scclip.config import PRESETS, validate_detector_params
from ovseg_core.scclip.self_adjusting import aggregate, aggregation_weights, cosine_similarity

__all__ = ["CombinedConfig", "TokenTransform", "combined_required_blocks", "combined_token_transform"]

TokenTransform = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
"""Maps ``(B, 1 + N, D)`` penultimate tokens (CLS first) and the grid ``(gh, gw)`` to new tokens."""


@dataclass(frozen=True)
class CombinedConfig:
    """What SC-CLIP contributes to CorrCLIP in the combined method (defaults: repair only)."""

    anomaly_repair: bool = True  # detect and repair anomaly tokens of the penultimate layer (SC-CLIP step 1-2)
    mid_layer_similarity: bool = False  # also aggregate x := W(Sim_mid) @ x (SC-CLIP's pre-adjust step)
    detector: str = "lof"  # "lof" (SC-CLIP paper) | "sklearn_lof" | "l2norm_topk"
    n_neighbors: int = 30  # LOF neighbours, squared Euclidean (SC-CLIP: 30)
    contamination: float = 0.05  # LOF flags scores above the (1 - contamination) quantile (SC-CLIP: 0.05)
    topk: int = 10  # l2norm_topk flags this many largest-norm tokens (SC-CLIP first release: 10)
    adaptive_contamination: bool = False  # extension: also require robust z-score > adaptive_z (see scclip.anomaly_detection)
    adaptive_z: float = 8.0  # robust z-score threshold of adaptive_contamination (see scclip.config)
    lof_eps: float = 1e-10  # added to the mean reachability distance before inverting it
    mid_block: int | None = None  # block of Sim_mid (None -> SC-CLIP pre-adjust preset: 9 for 12 blocks, 17 for 24)
    sim_threshold: float = 0.4  # similarities below this are zeroed in W (SC-CLIP: 0.4)
    row_norm_eps: float = 1e-6  # W rows are divided by (row sum + row_norm_eps) (SC-CLIP: 1e-6)

    def __post_init__(self) -> None:
        validate_detector_params(self)
        if self.mid_block is not None and self.mid_block < 1:
            raise ValueError(f"CombinedConfig.mid_block must be a 1-based block number >= 1 or None, got {self.mid_block}")
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"CombinedConfig.sim_threshold must be a cosine in [-1, 1], got {self.sim_threshold}")
        if not self.row_norm_eps > 0.0:
            raise ValueError(f"CombinedConfig.row_norm_eps must be > 0, got {self.row_norm_eps}")

    def resolved(self, num_blocks: int) -> CombinedConfig:
        """Fill ``mid_block`` from the SC-CLIP preset for ``num_blocks`` and check it is in ``1..L-1``."""
        cfg = self
        if cfg.mid_block is None:
            if num_blocks not in PRESETS:
                raise ValueError(
                    f"no SC-CLIP preset for a {num_blocks}-block tower (presets: {sorted(PRESETS)}); set mid_block explicitly"
                )
            cfg = dataclasses.replace(cfg, mid_block=PRESETS[num_blocks].pre_adjust_block)
        if not 1 <= cfg.mid_block <= num_blocks - 1:  # type: ignore[operator]
            raise ValueError(f"CombinedConfig.mid_block must be in 1..{num_blocks - 1}, got {cfg.mid_block}")
        return cfg


def combined_required_blocks(cfg: CombinedConfig, num_blocks: int) -> tuple[str, ...]:
    """Extra block outputs the transform reads: ``("block:<mid>",)`` with mid-layer similarity, else ``()``."""
    c = cfg.resolved(num_blocks)
    return (f"block:{c.mid_block}",) if c.mid_layer_similarity else ()


def _mid_tokens(
    cfg: CombinedConfig, blocks_or_mid: Mapping[str, torch.Tensor] | torch.Tensor | None, num_blocks: int | None
) -> torch.Tensor | None:
    if not cfg.mid_layer_similarity:
        return None
    if blocks_or_mid is None:
        raise ValueError(
            "CombinedConfig.mid_layer_similarity needs the mid block's tokens: pass blocks (a mapping with "
            "combined_required_blocks(cfg, L)) or the (B, 1 + N, D) tensor itself"
        )
    if isinstance(blocks_or_mid, torch.Tensor):
        return blocks_or_mid
    if cfg.mid_block is None and num_blocks is None:
        raise ValueError("pass num_blocks (or a resolved cfg) to pick the mid block out of a blocks mapping")
    c = cfg if cfg.mid_block is not None else cfg.resolved(num_blocks)  # type: ignore[arg-type]
    name = f"block:{c.mid_block}"
    if name not in blocks_or_mid:
        raise ValueError(f"blocks lack {name!r} (have {sorted(blocks_or_mid)})")
    return blocks_or_mid[name]


def combined_token_transform(
    cfg: CombinedConfig,
    blocks_or_mid: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    num_blocks: int | None = None,
) -> TokenTransform:
    """Build the token transform applied to CorrCLIP's penultimate tokens.

    Args:
        cfg: the combined configuration.
        blocks_or_mid: needed only with ``mid_layer_similarity``: the mid block's output
            ``(B, 1 + N, D)`` of the same crops, or a mapping holding it under
            ``"block:<mid_block>"`` (see :func:`combined_required_blocks`).
        num_blocks: L, to resolve ``mid_block = None`` when a mapping is passed.
    Returns:
        ``transform(tokens (B, 1 + N, D), grid (gh, gw)) -> (B, 1 + N, D)``, same dtype; CLS unchanged.
    """
    mid = _mid_tokens(cfg, blocks_or_mid, num_blocks)

    def transform(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(f"tokens must be (B, 1 + gh*gw, D) for grid {grid}, got {tuple(tokens.shape)}")
        cls, x = tokens[:, :1], tokens[:, 1:]
        # anomaly detection and anomaly repair
        anomalies = detect_anomalies(x, cfg) if cfg.anomaly_repair else None
        if anomalies is not None:
            x = repair_anomalies(x, anomalies, grid)
        # mid-layer similarity aggregation
        if mid is not None:
            if mid.shape[:2] != tokens.shape[:2]:
                raise ValueError(f"mid-block tokens {tuple(mid.shape)} do not match tokens {tuple(tokens.shape)}")
            mid_x = mid[:, 1:].to(x.dtype)
            if anomalies is not None:
                mid_x = repair_anomalies(mid_x, anomalies, grid)
            weights = aggregation_weights(cosine_similarity(mid_x), cfg.sim_threshold, cfg.row_norm_eps)
            x = aggregate(x, weights)
        return torch.cat([cls, x], dim=1)

    return transform
