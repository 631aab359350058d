"""Benchmark dataset specs: classes, background, label conversion, per-method presets.

Presets are the published evaluation settings (methods.md section 1 table; CorrCLIPv2:
``corrclipv2.md`` section 1 table, ``CorrCLIPv2/configs/cfg_*.py``). CamVid is in no paper: its
presets are this project's choice (the papers' generic no-background setting: S = 336,
CorrCLIP crop 336/112, SC-CLIP crop 224/112, logit scale 40, no thresholds). ADE-847 and
PASCAL Context-459 are CorrCLIPv2's only: the v1 and SC-CLIP presets there are this project's
choice (v1: CorrCLIPv2's own; SC-CLIP: its generic 336, 224/112, 40).

Class files live in ``ovseg_core/data/classes`` (package data) as ``<bench>_corrclip.txt``,
``<bench>_scclip.txt`` and ``<bench>_corrclipv2.txt``: byte-for-byte copies of the authors'
``cls_*.txt`` files (zdk258/CorrCLIP 103bc18 ``CorrCLIPv1/configs`` and ``CorrCLIPv2/configs``,
SuleBai/SC-CLIP 0417ba9 ``configs``), one class per line. CorrCLIPv2's files equal v1's except
Cityscapes (line 12 ``people, person``, one query) and the two new benchmarks, whose files
(``ade847_corrclipv2.txt``, 847 lines; ``pc459_corrclipv2.txt``, 459 lines) every variant uses. Each family's reference reads them with its own ``get_cls_idx``: the line is
split on one separator into synonyms, each synonym its own text query, and a class scores the
max over its queries. The separator differs (:data:`CLASS_SEPARATORS`): CorrCLIP splits on
``"; "`` (its VOC21 / COCO-Object background line = 26 / 16 stuff words, each a query; the
reference then takes the max over them), SC-CLIP on ``", "`` (its background line, the person
and tvmonitor lines carry ``", "`` synonyms). Only newlines are removed; spaces are kept
(PC60's ``"wood "`` line keeps its trailing space, as in both references). CorrCLIPv2 splits on
``"; "`` too (ADE-847's WordNet lists such as ``"building, edifice"`` are one query each).

Differences between the two families' files: CorrCLIP writes "people" for person (VOC, PC59/60,
COCO-Object/Stuff, ADE20K, Cityscapes), a 16-word background for COCO-Object and no synonyms for
VOC person / tvmonitor; SC-CLIP (SCLIP's files) has 7 person synonyms on VOC (8 with "body" on
COCO-Object) and 5 for tvmonitor. Both write multi-word names without spaces in COCO-Stuff and
ADE20K ("trafficlight", "chestofdrawers") and Cityscapes ("trafficlight", "trafficsign").
CamVid (no paper file): ``camvid.txt`` for both families, the 11 SegNet class names in label
order (0 sky .. 10 bicyclist).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

__all__ = [
    "CATSEG_UNLABELLED",
    "CLASS_SEPARATORS",
    "DATASETS",
    "FAMILY_MODELS",
    "LABEL_CONVERSIONS",
    "METHOD_VARIANTS",
    "DatasetSpec",
    "FamilyModels",
    "MethodPreset",
    "class_lines",
    "get_dataset",
]

LABEL_CONVERSIONS = ("none", "reduce_zero_label", "coco_object", "camvid")
METHOD_VARIANTS = ("corrclip", "scclip", "corrclipv2")

# Synonym separator of each family's class files, as its reference ``get_cls_idx`` splits a
# line (CorrCLIP v1 and v2 ``split('; ')``, SC-CLIP ``split(', ')``); pass it to ``parse_class_lines``.
CLASS_SEPARATORS: Mapping[str, str] = MappingProxyType({"corrclip": "; ", "scclip": ", ", "corrclipv2": "; "})
# Unlabelled value of CAT-Seg's 16-bit ``.tif`` labels (ADE-847, PC-459): ``uint16`` 65535.
CATSEG_UNLABELLED = 65535


@dataclass(frozen=True)
class FamilyModels:
    """The backbones a method family's paper uses (backbone names, ``ovseg_core.backbones``)."""

    clip: str  # CLIP image/text towers
    dino: str  # DINO for CorrCLIP's scope reconstruction (methods.md 2.1)
    sam: str  # SAM for CorrCLIP's regions
    vfm: str | None = None  # VFM of CorrCLIPv2's correlation (corrclipv2.md section 5); None: not read
    aux_clip: str | None = None  # CorrCLIPv2's DMCE auxiliary CLIP of the bank (corrclipv2.md section 3); None: none


# The papers' backbones per method family, the only table of them (methods.md; corrclipv2.md section 1):
# CorrCLIP uses MetaCLIP ViT-B/16 + DINO ViT-B/8 + SAM ViT-B; SC-CLIP OpenAI ViT-B/16 (it reads no DINO or
# SAM; the CorrCLIP ones are named for combinations); CorrCLIPv2 MetaCLIP ViT-L/14-quickgelu
# (``CorrCLIPv2/configs/base_config.py`` ``_clip_scale='large'``) + C-RADIOv3-L (``vfm_type='radiov3'``), its
# regions the authors' pre-generated EntitySeg masks (``regions: {source: files}``; SAM ViT-B named for
# on-the-fly masks), its bank's DMCE auxiliary CLIP DFN2B-CLIP ViT-B/16 (``aux_model_type=
# 'hf-hub:apple/DFN2B-CLIP-ViT-B-16'``, for the -B and -L models alike). The experiment's ``models`` defaults are CorrCLIP's; ``Method.default_models`` takes the
# roles a method's own paper sets differently from here (corrclipv2: clip and vfm).
FAMILY_MODELS: Mapping[str, FamilyModels] = MappingProxyType({
    "corrclip": FamilyModels("clip:ViT-B-16-quickgelu@metaclip_fullcc", "dino:vitb8", "sam:vit_b"),
    "scclip": FamilyModels("clip:ViT-B-16@openai", "dino:vitb8", "sam:vit_b"),
    "corrclipv2": FamilyModels("clip:ViT-L-14-quickgelu@metaclip_fullcc", "dino:vitb8", "sam:vit_b", "vfm:radiov3_l",
                               "clip:ViT-B-16@dfn2b"),
})


@dataclass(frozen=True)
class MethodPreset:
    """Evaluation settings of one method on one dataset."""

    # S of the keep-ratio resize (paper: 336; Cityscapes 448 CorrCLIP / 784 CorrCLIPv2 / 560 SC-CLIP;
    # ADE20K and ADE-847 448 CorrCLIP)
    short_side: int
    crop: int  # sliding-window crop side (paper: CorrCLIP 336, 224 on Cityscapes; SC-CLIP 224)
    stride: int  # sliding-window stride, 0 < stride <= crop (paper: 112)
    # softmax multiplier on cosine logits (paper: CorrCLIP 40; SC-CLIP 40, VOC21 50, COCO-Object 55)
    logit_scale: float
    # winning probability below this -> background; only datasets with background (paper table)
    prob_thd: float | None
    # SC-CLIP VOC21 only (0.1): foreground classes not above this share of the foreground area are dropped
    area_thd: float | None

    def __post_init__(self) -> None:
        if self.short_side <= 0:
            raise ValueError(f"short_side must be > 0, got {self.short_side}")
        if self.crop <= 0:
            raise ValueError(f"crop must be > 0, got {self.crop}")
        if not 0 < self.stride <= self.crop:
            raise ValueError(f"stride must be in 1..crop ({self.crop}), got {self.stride}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.prob_thd is not None and not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be None or in [0, 1], got {self.prob_thd}")
        if self.area_thd is not None and not 0.0 <= self.area_thd <= 1.0:
            raise ValueError(f"area_thd must be None or in [0, 1], got {self.area_thd}")


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: class count, background, label conversion, presets and class files."""

    name: str  # benchmark name as in the papers' tables (e.g. "VOC21")
    num_classes: int  # classes scored after label conversion (VOC21 21, PC60 60, COCO-Object 81, ...)
    has_background: bool  # class 0 is background (VOC21, PC60, COCO-Object); prob_thd only applies then
    reduce_zero_label: bool  # GT 0 -> ignore, others -1 (VOC20, PC59, ADE20K)
    presets: Mapping[str, MethodPreset]  # METHOD_VARIANTS -> settings; baselines use "scclip"
    class_files: Mapping[str, str]  # METHOD_VARIANTS -> file name in ovseg_core/data/classes
    label_conversion: str  # one of LABEL_CONVERSIONS, applied to raw GT before scoring
    # GT value never scored, as the authors' evaluator scores: mmseg IoUMetric's default 255 for
    # every dataset (it is never given the dataset's own ignore_index). On ADE-847 / PC-459 255 is a
    # real class, ignored all the same (reference quirk; see unlabelled_index).
    ignore_index: int = 255
    # The dataset's own unlabelled value when the reference evaluator does not ignore it (CAT-Seg
    # 16-bit labels: 65535, counted in the union through the predictions there). Scoring mode
    # "unlabelled" (ovseg_core.metrics.scoring_ignore_index) ignores it instead and scores class 255.
    unlabelled_index: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {self.num_classes}")
        if self.label_conversion not in LABEL_CONVERSIONS:
            raise ValueError(f"label_conversion must be one of {LABEL_CONVERSIONS}, got {self.label_conversion!r}")
        if self.reduce_zero_label != (self.label_conversion == "reduce_zero_label"):
            raise ValueError(
                f"reduce_zero_label={self.reduce_zero_label} contradicts label_conversion={self.label_conversion!r}"
            )
        if self.unlabelled_index is None and not self.num_classes <= self.ignore_index <= 65535:
            raise ValueError(
                f"ignore_index must be in {self.num_classes}..65535 (outside the classes), got {self.ignore_index}"
            )
        if self.unlabelled_index is not None:
            if not 0 <= self.ignore_index <= 65535:
                raise ValueError(f"ignore_index must be in 0..65535, got {self.ignore_index}")
            if not self.num_classes <= self.unlabelled_index <= 65535:
                raise ValueError(
                    f"unlabelled_index must be in {self.num_classes}..65535 (outside the classes), "
                    f"got {self.unlabelled_index}"
                )
        for attr in ("presets", "class_files"):
            mapping = getattr(self, attr)
            if set(mapping) != set(METHOD_VARIANTS):
                raise ValueError(f"{attr} keys must be {METHOD_VARIANTS}, got {tuple(mapping)}")
            object.__setattr__(self, attr, MappingProxyType(dict(mapping)))
        for variant, preset in self.presets.items():
            if preset.prob_thd is not None and not self.has_background:
                raise ValueError(f"presets[{variant!r}].prob_thd is set but {self.name} has no background class")


def _preset(s: int, crop: int, scale: float, prob: float | None = None, area: float | None = None) -> MethodPreset:
    return MethodPreset(short_side=s, crop=crop, stride=112, logit_scale=scale, prob_thd=prob, area_thd=area)


def _spec(
    name: str,
    num_classes: int,
    corrclip: MethodPreset,
    scclip: MethodPreset,
    files: tuple[str, str],
    conversion: str = "none",
    background: bool = False,
    v2: MethodPreset | None = None,
    v2_file: str | None = None,
    unlabelled: int | None = None,
) -> DatasetSpec:
    """A spec; CorrCLIPv2's preset and class file default to v1's (equal on every v1 benchmark but Cityscapes)."""
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        has_background=background,
        reduce_zero_label=conversion == "reduce_zero_label",
        presets={"corrclip": corrclip, "scclip": scclip, "corrclipv2": v2 or corrclip},
        class_files={"corrclip": files[0], "scclip": files[1], "corrclipv2": v2_file or files[0]},
        label_conversion=conversion,
        unlabelled_index=unlabelled,
    )


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            _spec("VOC21", 21, _preset(336, 336, 40, 0.2), _preset(336, 224, 50, 0.15, 0.1),
                  ("voc21_corrclip.txt", "voc21_scclip.txt"), background=True),
            _spec("VOC20", 20, _preset(336, 336, 40), _preset(336, 224, 40),
                  ("voc20_corrclip.txt", "voc20_scclip.txt"), "reduce_zero_label"),
            _spec("PC60", 60, _preset(336, 336, 40, 0.15), _preset(336, 224, 40, 0.15),
                  ("pc60_corrclip.txt", "pc60_scclip.txt"), background=True),
            _spec("PC59", 59, _preset(336, 336, 40), _preset(336, 224, 40),
                  ("pc59_corrclip.txt", "pc59_scclip.txt"), "reduce_zero_label"),
            _spec("COCO-Object", 81, _preset(336, 336, 40, 0.25), _preset(336, 224, 55, 0.35),
                  ("coco_object_corrclip.txt", "coco_object_scclip.txt"), "coco_object", background=True),
            _spec("COCO-Stuff", 171, _preset(336, 336, 40), _preset(336, 224, 40),
                  ("coco_stuff_corrclip.txt", "coco_stuff_scclip.txt")),
            _spec("ADE20K", 150, _preset(448, 336, 40), _preset(336, 224, 40),
                  ("ade20k_corrclip.txt", "ade20k_scclip.txt"), "reduce_zero_label"),
            _spec("Cityscapes", 19, _preset(448, 224, 40), _preset(560, 224, 40),
                  ("cityscapes_corrclip.txt", "cityscapes_scclip.txt"),
                  v2=_preset(784, 224, 40), v2_file="cityscapes_corrclipv2.txt"),
            _spec("CamVid", 11, _preset(336, 336, 40), _preset(336, 224, 40),
                  ("camvid.txt", "camvid.txt"), "camvid"),
            # CorrCLIPv2's new benchmarks (CAT-Seg 16-bit .tif labels, unlabelled 65535, no background)
            _spec("ADE847", 847, _preset(448, 336, 40), _preset(336, 224, 40),
                  ("ade847_corrclipv2.txt", "ade847_corrclipv2.txt"), v2_file="ade847_corrclipv2.txt",
                  unlabelled=CATSEG_UNLABELLED),
            _spec("PC459", 459, _preset(336, 336, 40), _preset(336, 224, 40),
                  ("pc459_corrclipv2.txt", "pc459_corrclipv2.txt"), v2_file="pc459_corrclipv2.txt",
                  unlabelled=CATSEG_UNLABELLED),
        )
    }
)  # fmt: skip


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a benchmark by name (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    by_lower = {k.lower(): v for k, v in DATASETS.items()}
    try:
        return by_lower[str(name).lower()]
    except KeyError as e:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from e


def class_lines(name: str, variant: str) -> list[str]:
    """Lines of a dataset's class file, exactly as the reference reads them.

    ``readlines()`` with the newline removed: one class per line, nothing stripped (trailing
    spaces are part of the prompt). Parse them into queries with
    ``parse_class_lines(lines, separator=CLASS_SEPARATORS[variant])``.

    Args:
        name: dataset name (see :data:`DATASETS`).
        variant: ``"corrclip"``, ``"scclip"`` (baselines use it) or ``"corrclipv2"``.
    Returns:
        ``num_classes`` strings.
    """
    spec = get_dataset(name)
    if variant not in METHOD_VARIANTS:
        raise ValueError(f"variant must be one of {METHOD_VARIANTS}, got {variant!r}")
    file_name = spec.class_files[variant]
    text = resources.files("ovseg_core").joinpath("data", "classes", file_name).read_text("utf-8")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # readlines() yields no empty line after a final newline
    if len(lines) != spec.num_classes or any(not line.strip() for line in lines):
        raise AssertionError(f"{file_name} must have {spec.num_classes} non-blank lines, got {len(lines)}")
    return lines
