"""Typed stage parameters: each stage key hashes exactly the parameters its stage reads.

The experiment file becomes typed once, in ``flows.graph``; from there every stage receives
one of these frozen dataclasses (through ``StageContext.params``) and hashes it into its key
(``storage.keys.to_jsonable`` turns it into canonical JSON). Settings that do not change
outputs (device, window batch, weights folder) are run settings, not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ovseg_core.options import later_option
from ovseg_core.window_plan import WindowPlan, plan_windows

if TYPE_CHECKING:  # importing the parameter classes must not import torch (``ovseg cache ls`` reads the stage table)
    from ovseg_core.corrclip.config import CorrCLIPConfig

FEATURE_DTYPES = ("float16", "float32")  # dtypes of stored features (numpy names)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # dtypes networks compute in (torch names)


def array_name(aggregate: str) -> str:
    """Store-safe array name of a CLIP aggregate (``mean:6-10`` -> ``mean_6-10``)."""
    return aggregate.replace(":", "_")


@dataclass(frozen=True)
class WindowParams:
    """Resize and sliding window of a dataset preset (methods.md section 1)."""

    short_side: int  # the resized image's short side S
    crop: int  # window side c
    stride: int  # window stride s
    pad_multiple: int  # windows are zero-padded (centred) to a multiple of this (56 for CorrCLIP, the patch size otherwise)

    def __post_init__(self) -> None:
        for name in ("short_side", "crop", "stride", "pad_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"window.{name} must be an int >= 1, got {v!r}")
        if self.stride > self.crop:
            raise ValueError(f"window.stride ({self.stride}) must not exceed window.crop ({self.crop}): pixels between "
                             "windows would never be predicted; lower the stride")

    def plan(self, orig_hw: tuple[int, int]) -> WindowPlan:
        """The window plan of an image of original size ``(H, W)``."""
        return plan_windows(orig_hw, self.short_side, self.crop, self.stride, self.pad_multiple)


@dataclass(frozen=True)
class TextParams:
    """``text_embeddings``: prompt-ensembled queries of one vocabulary."""

    backbone: str  # CLIP backbone name
    classes: tuple[str, ...]  # class lines as in the class file
    separator: str  # what splits a line into queries: "; " (CorrCLIP's reader), ", " (SC-CLIP's, custom vocabularies)
    templates: str  # template set name (``imagenet80`` | ``single``)
    dtype: str  # compute dtype


@dataclass(frozen=True)
class RegionParams:
    """``sam_masks``: the region source and its full configuration."""

    source: str  # "sam" | "sam2" | "files" | "slic" | "felzenszwalb"
    backbone: str | None  # SAM / SAM 2 backbone name (None for other sources)
    config: Any  # SamRegionConfig | Sam2RegionConfig | RegionFileConfig | SuperpixelConfig
    dtype: str | None  # compute (autocast) dtype of the SAM network (None for other sources)
    files_sha256: str | None = None  # files: digest of every mask file's name and bytes (edited masks recompute)


@dataclass(frozen=True)
class DinoParams:
    """``dino_features``: last-block q+k of every window."""

    backbone: str
    window: WindowParams
    feature_dtype: str  # dtype of the stored features
    dtype: str  # compute dtype
    pos_interpolation: str = "dino"  # "dino": DINO's own (g + 0.1) / G bicubic rule (reference); "timm": timm's resize
    input: str = "from_clip"  # "from_clip": CLIP-normalised padded crops converted as the CorrCLIP reference does;
    # "imagenet": ImageNet-normalised, padded with 0 (CorrCLIPConfig.padding = "ignore")


@dataclass(frozen=True)
class ClipParams:
    """``clip_layers``: the CLIP block aggregates the methods sharing this window need."""

    backbone: str
    window: WindowParams
    blocks: tuple[str, ...]  # aggregate names (``block:11``, ``mean:6-10``, ...), sorted
    feature_dtype: str
    dtype: str

    def array_names(self) -> tuple[str, ...]:
        """The arrays of an item: one per aggregate, named by ``array_name``."""
        return tuple(array_name(b) for b in self.blocks)


@dataclass(frozen=True)
class ClusteringParams:
    """``mask_clustering``: DBSCAN merging of regions per window."""

    window: WindowParams
    config: "CorrCLIPConfig"  # only the clustering fields are set (``Method.clustering_config``)


@dataclass(frozen=True)
class VfmParams:
    """``vfm_features``: one VFM forward over the whole original image, its map at the VFM's token grid."""

    backbone: str  # the VFM (``vfm:radiov3_l``, ...)
    max_side: int | None  # cap on the image's longer side before the VFM's own resize; None: native (reference)
    feature_dtype: str  # dtype of the stored map
    dtype: str  # the forward's autocast dtype ("float32": none; the reference: float16 autocast on CUDA)

    def __post_init__(self) -> None:
        if self.max_side is not None and (isinstance(self.max_side, bool) or not isinstance(self.max_side, int)
                                          or self.max_side < 1):
            raise ValueError(f"models.vfm_max_side must be None or an int >= 1, got {self.max_side!r}")


@dataclass(frozen=True)
class SemanticParams:
    """``mask_class_tokens``: CorrCLIP's semantic-branch tokens."""

    backbone: str
    window: WindowParams
    feature_dtype: str
    dtype: str
    # CorrCLIPv2 (``Method.relabel_config``): the tokens pool over the ``sam_masks`` regions on the correlation
    # grid (twice the CLIP grid) renumbered with this config's ``m0_quirk`` and ``padding``; None (v1): over the
    # ``mask_clustering`` stage's merged map. A later option: v1 keys do not move.
    relabel: "CorrCLIPConfig | None" = later_option(None)


@dataclass(frozen=True)
class ReconstructionParams:
    """``reconstruction``: a method's window features merged into a label map."""

    method: str  # METHODS name
    config: Any  # the method config with only the fields this stage reads (``Method.reconstruction_config``)
    backbone: str
    window: WindowParams
    dtype: str
    logit_scale: float
    prob_thd: float | None  # None: no background threshold (datasets without background)
    area_thd: float | None
    # CorrCLIPv2's memory bank (``tasks.bank_params.BankUse``: which bank, k, fusion weight); None: no bank. A later
    # option: keys of reconstructions without a bank do not move.
    bank: Any = later_option(None)


@dataclass(frozen=True)
class MapCorrectionParams:
    """``map_correction``: each region takes the mode of the predicted labels inside it."""

    m0_quirk: bool  # the smallest id of the image is never corrected (reference)


@dataclass(frozen=True)
class ScoringParams:
    """``scoring``: per-image confusion matrix against the ground truth."""

    spec: str  # dataset spec name
    num_classes: int
    conversion: str  # ground-truth label conversion (``ovseg_core.metrics.convert_labels``)
    ignore_index: int
    strict: bool = False  # ground-truth labels outside the class range raise (default: dropped, as MMSegmentation)
