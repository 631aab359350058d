"""CorrCLIP hyperparameters (paper defaults) and the CLIP block aggregates the method reads.

Defaults reproduce the authors' reference code (``CorrCLIPv1``, "paper mode"). Every
component of the paper's Table 2 ablation can be switched off, and every deviation from the
reference (e.g. fixing the m0 quirk) is a named field whose default is the reference behaviour.
CorrCLIPv2 (method ``corrclipv2``) is the same config with ``mask_clustering=False`` and
``similarity="vfm"`` (``ovseg_core.methods.CORRCLIPV2_DEFAULTS``); everything else is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "PADDING_MODES",
    "CorrCLIPConfig",
    "SIMILARITY_SOURCES",
    "num_spatial_blocks",
    "required_blocks",
    "spatial_block_range",
]

# Sources of the patch-similarity matrix S: "dino_qk" (CorrCLIP v1: the last DINO block's q + k)
# and "vfm" (CorrCLIPv2: a vision foundation model's dense map, corrclip.vfm_correlation). The
# paper's "uniform" row of Table 5 is ``value_reconstruction=False``.
SIMILARITY_SOURCES: tuple[str, ...] = ("dino_qk", "vfm")

# How padded pixels of a window (crop side not a multiple of 56) enter the method:
# "reference" = as in CorrCLIPv1, padding is one more region (its own id, larger than every real
# id: the reference pads the mask crop with 10000) in DBSCAN, in E and in the semantic branch,
# and DINO sees the padded CLIP crop converted (features.dino.dino_input_from_clip);
# "ignore" = padding is removed from clustering, E and the MCTs, and DINO sees the ImageNet-
# normalised crop padded with 0 (ovseg's earlier behaviour).
PADDING_MODES: tuple[str, ...] = ("reference", "ignore")

# NUM_SPATIAL of the reference, keyed by the number of CLIP blocks L; other depths use L - 4.
_NUM_SPATIAL_BY_DEPTH: dict[int, int] = {12: 5, 24: 12, 32: 28}


@dataclass(frozen=True)
class CorrCLIPConfig:
    """CorrCLIP per-window hyperparameters.

    Every field defaults to the reference value; ``__post_init__`` raises ``ValueError``
    naming the field and its allowed range.
    """

    # Scope reconstruction: the interaction matrix E is built from the (merged) region map.
    # False: every patch interacts with every (non-padding) patch. Paper: True.
    scope_reconstruction: bool = True
    # Value reconstruction: A = softmax(tau * S) restricted to E. False: uniform attention
    # over E (the "uniform" similarity of the paper's Table 5). Paper: True.
    value_reconstruction: bool = True
    # Multiplier of S inside the softmax (the reference's TAU; same as dividing by 0.25). Paper: 4.0.
    tau: float = 4.0
    # Merge regions with similar mean DINO features by DBSCAN before scope reconstruction. Paper: True
    # (CorrCLIPv2: False, the DBSCAN block is commented out; True there clusters on the VFM features).
    mask_clustering: bool = True
    # DBSCAN neighbourhood radius on the distance max(sim) - sim. Paper: 0.2.
    dbscan_eps: float = 0.2
    # DBSCAN core-point size. Paper: 1 (every region belongs to some cluster).
    dbscan_min_samples: int = 1
    # Reference quirk: the smallest region id present in a window is the "unsegmented" m0 even
    # when the window has no unsegmented (id 0) patch, so a real region is then treated as
    # unsegmented (no DBSCAN feature, similarity-thresholded scope). False = only id 0 is m0.
    # Also used by map correction (the smallest id of the image is never corrected). Paper: True.
    m0_quirk: bool = True
    # Spatial branch: the same value-only path on the mean of lower-block outputs. Paper: True.
    spatial_branch: bool = True
    # Weight of the spatial branch in the fusion. Paper: 1.0.
    alpha: float = 1.0
    # Semantic branch: mask class tokens (one extra token per region). Paper: True.
    semantic_branch: bool = True
    # Weight of the semantic branch in the fusion. Paper: 0.5.
    beta: float = 0.5
    # NUM_SPATIAL: the spatial branch averages the outputs of blocks L-1-NUM_SPATIAL .. L-2
    # (1-based). None: 5 / 12 / 28 for 12 / 24 / 32 blocks, L - 4 otherwise (reference).
    num_spatial: int | None = None
    # Map correction: every original region takes the mode of the predicted labels inside it
    # (applied by the caller after prob_thd, see ``map_correction``). Paper: True.
    map_correction: bool = True
    # Source of the similarity S, one of SIMILARITY_SOURCES. Paper: "dino_qk" (last DINO block's
    # q + k, L2-normalised); CorrCLIPv2 (method corrclipv2): "vfm" (the VFM correlation features).
    similarity: str = "dino_qk"
    # Padded window pixels (region id -1 in the input maps): "reference" = padding is a region of
    # its own (may merge with real regions by DBSCAN, has its block in E and its mask class token;
    # the DINO input is dino_input_from_clip of the padded CLIP crop); "ignore" = padding is
    # dropped from clustering, E and the MCTs, DINO input = ImageNet-normalised crop padded with 0.
    # One of PADDING_MODES. Paper (reference code): "reference".
    padding: str = "reference"

    def __post_init__(self) -> None:
        for name in (
            "scope_reconstruction",
            "value_reconstruction",
            "mask_clustering",
            "m0_quirk",
            "spatial_branch",
            "semantic_branch",
            "map_correction",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau!r}")
        if not (math.isfinite(self.dbscan_eps) and self.dbscan_eps > 0):
            raise ValueError(f"dbscan_eps must be a finite number > 0, got {self.dbscan_eps!r}")
        samples = self.dbscan_min_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"dbscan_min_samples must be an int >= 1, got {self.dbscan_min_samples!r}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.num_spatial is not None and (
            isinstance(self.num_spatial, bool) or not isinstance(self.num_spatial, int) or self.num_spatial < 1
        ):
            raise ValueError(f"num_spatial must be None or an int >= 1, got {self.num_spatial!r}")
        if self.similarity not in SIMILARITY_SOURCES:
            raise ValueError(f"similarity must be one of {SIMILARITY_SOURCES}, got {self.similarity!r}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")


def num_spatial_blocks(cfg: CorrCLIPConfig, num_blocks: int) -> int:
    """NUM_SPATIAL for a tower of ``num_blocks`` blocks (``cfg.num_spatial`` or the reference rule).

    Raises:
        ValueError: if the tower is too shallow (L < 3) or NUM_SPATIAL exceeds L - 2.
    """
    if num_blocks < 3:
        raise ValueError(f"CorrCLIP needs a CLIP tower with at least 3 blocks, got {num_blocks}")
    n = cfg.num_spatial if cfg.num_spatial is not None else _NUM_SPATIAL_BY_DEPTH.get(num_blocks, num_blocks - 4)
    if not 1 <= n <= num_blocks - 2:
        raise ValueError(
            f"num_spatial must be in 1..{num_blocks - 2} for a {num_blocks}-block tower, got {n}; "
            "set CorrCLIPConfig.num_spatial explicitly"
        )
    return n


def spatial_block_range(cfg: CorrCLIPConfig, num_blocks: int) -> tuple[int, int]:
    """1-based inclusive range ``(L-1-NUM_SPATIAL, L-2)`` of blocks averaged by the spatial branch."""
    n = num_spatial_blocks(cfg, num_blocks)
    return num_blocks - 1 - n, num_blocks - 2


def required_blocks(cfg: CorrCLIPConfig, num_blocks: int) -> tuple[str, ...]:
    """Names of the CLIP block aggregates the method reads (``corrclip_window_features(blocks=...)``).

    Grammar: ``"block:i"`` = output of block i (1-based); ``"mean:a-b"`` = mean of the outputs
    of blocks a..b inclusive. Always the penultimate block ``"block:{L-1}"``; with the spatial
    branch also ``"mean:{L-1-NUM_SPATIAL}-{L-2}"``. ViT-B (L = 12): ``("block:11", "mean:6-10")``.
    """
    if num_blocks < 3:
        raise ValueError(f"CorrCLIP needs a CLIP tower with at least 3 blocks, got {num_blocks}")
    names = [f"block:{num_blocks - 1}"]
    if cfg.spatial_branch:
        a, b = spatial_block_range(cfg, num_blocks)
        names.append(f"mean:{a}-{b}")
    return tuple(names)
