"""Backbone names: the registry of architectures and the parsed form of a name.

A name is ``family:arch[@weights]``:

- ``family`` is ``clip``, ``dino``, ``sam`` (segment-anything v1), ``sam2`` (SAM 2) or ``vfm`` (the
  vision foundation models of CorrCLIPv2's correlation, :mod:`ovseg_core.backbones.vfm_archs`);
- ``arch`` is one of the registered architectures (:data:`CLIP_ARCHS`, :data:`DINO_ARCHS`,
  :data:`SAM_ARCHS`, :data:`SAM2_ARCHS`, ``VFM_ARCHS``, plus the tiny test configurations
  :data:`TINY_ARCHS`);
- ``weights`` is an open_clip pretrained tag (CLIP), ``official`` (DINO/SAM/SAM 2/VFM, the authors'
  release; for SAM 2 the July 2024 release the CorrCLIP reference uses), ``sam2.1`` (SAM 2 only:
  the September 2024 SAM 2.1 release), ``random`` / ``random:SEED`` (the real architecture with
  seeded random weights), or a local checkpoint path. Without ``@`` the architecture's default weights are used (tiny
  configurations are always random unless a local checkpoint is given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import open_clip

from ..names import closest_name
from .vfm_archs import TINY_VFM_ARCHS, VFM_ARCHS

__all__ = [
    "CLIP_ARCHS",
    "CLIP_EXTRA_TAGS",
    "DINO_ARCHS",
    "FAMILIES",
    "OFFICIAL",
    "RANDOM",
    "SAM2_1",
    "SAM2_ARCHS",
    "SAM_ARCHS",
    "TINY_ARCHS",
    "BackboneSpec",
    "list_backbones",
    "parse_backbone",
]

FAMILIES: tuple[str, ...] = ("clip", "dino", "sam", "sam2", "vfm")
RANDOM = "random"
OFFICIAL = "official"
# Weights tag of the SAM 2.1 checkpoints (SAM 2 family only; ``official`` is the SAM 2 release).
SAM2_1 = "sam2.1"

# open_clip architecture -> default pretrained tag (the weight each method's paper uses).
CLIP_ARCHS: dict[str, str] = {
    "ViT-B-16": "openai",
    "ViT-B-16-quickgelu": "metaclip_fullcc",
    "ViT-L-14": "openai",
    "ViT-L-14-quickgelu": "metaclip_fullcc",
    "ViT-H-14": "laion2b_s32b_b79k",
}

# More pretrained tags a method's paper uses besides an architecture's default (open_clip arch -> tags), listed by
# ``list_backbones`` / ``ovseg backbones`` with their official files. ``ViT-B-16@dfn2b``: DFN2B-CLIP ViT-B/16
# (Apple, hf-hub ``apple/DFN2B-CLIP-ViT-B-16``, QuickGELU, 512-d), CorrCLIPv2's DMCE auxiliary CLIP
# (``aux_model_type='hf-hub:apple/DFN2B-CLIP-ViT-B-16'``, bank store ``{bank}_dfnclip_b.pt``).
CLIP_EXTRA_TAGS: dict[str, tuple[str, ...]] = {
    "ViT-B-16": ("dfn2b",),
}

# our DINO name -> (timm architecture, official file stem in facebookresearch/dino).
DINO_ARCHS: dict[str, tuple[str, str]] = {
    "vitb8": ("vit_base_patch8_224.dino", "dino_vitbase8_pretrain"),
    "vits8": ("vit_small_patch8_224.dino", "dino_deitsmall8_pretrain"),
    "vits16": ("vit_small_patch16_224.dino", "dino_deitsmall16_pretrain"),
    "vitb16": ("vit_base_patch16_224.dino", "dino_vitbase16_pretrain"),
}

# segment_anything registry key -> official checkpoint file name.
SAM_ARCHS: dict[str, str] = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

# SAM 2 architecture (the sam2 package's config name suffix) -> (official SAM 2 file, SAM 2.1 file).
SAM2_ARCHS: dict[str, tuple[str, str]] = {
    "hiera_t": ("sam2_hiera_tiny.pt", "sam2.1_hiera_tiny.pt"),
    "hiera_s": ("sam2_hiera_small.pt", "sam2.1_hiera_small.pt"),
    "hiera_b+": ("sam2_hiera_base_plus.pt", "sam2.1_hiera_base_plus.pt"),
    "hiera_l": ("sam2_hiera_large.pt", "sam2.1_hiera_large.pt"),
}

# Tiny test configurations per family: same classes and code paths, random weights.
TINY_ARCHS: dict[str, tuple[str, ...]] = {
    "clip": ("tiny",),
    "dino": ("tiny8", "tiny16"),
    "sam": ("tiny",),
    "sam2": ("tiny",),
    "vfm": tuple(TINY_VFM_ARCHS),
}

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _archs(family: str) -> tuple[str, ...]:
    full = {"clip": tuple(CLIP_ARCHS), "dino": tuple(DINO_ARCHS), "sam": tuple(SAM_ARCHS), "sam2": tuple(SAM2_ARCHS),
            "vfm": tuple(VFM_ARCHS)}[family]
    return full + TINY_ARCHS[family]


def _is_tiny(family: str, arch: str) -> bool:
    return arch in TINY_ARCHS.get(family, ())


def _clip_tags(arch: str) -> tuple[str, ...]:
    return tuple(open_clip.list_pretrained_tags_by_model(arch))


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.lower().endswith(_CHECKPOINT_SUFFIXES)


def list_backbones() -> list[str]:
    """The registered backbone names with their default weights, tiny configurations last.

    Every name also accepts ``@random``, ``@random:SEED`` or ``@/path/to/checkpoint``; CLIP
    names accept any open_clip pretrained tag of their architecture.
    """
    names = [f"clip:{arch}@{tag}" for arch, tag in CLIP_ARCHS.items()]
    names += [f"clip:{arch}@{tag}" for arch, tags in CLIP_EXTRA_TAGS.items() for tag in tags]
    names += [f"dino:{arch}" for arch in DINO_ARCHS]
    names += [f"sam:{arch}" for arch in SAM_ARCHS]
    names += [f"sam2:{arch}" for arch in SAM2_ARCHS]
    names += [f"vfm:{arch}" for arch in VFM_ARCHS]
    names += [f"{family}:{arch}" for family, archs in TINY_ARCHS.items() for arch in archs]
    return names


def _unknown_name(name: str, why: str) -> ValueError:
    head, at, weights = name.partition("@")
    best = closest_name(head, [n.partition("@")[0] for n in list_backbones()])
    hint = f" (did you mean {best + at + weights!r}?)" if best else ""
    return ValueError(
        f"unknown backbone {name!r}{hint} ({why}); valid names: {', '.join(list_backbones())}; "
        "each optionally with @random, @random:SEED or @/path/to/checkpoint"
    )


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone name (see :func:`parse_backbone`)."""

    # Model family: "clip" (open_clip CLIP), "dino" (timm ViT with DINO weights), "sam" (segment_anything),
    # "sam2" (the sam2 package's SAM2Base), "vfm" (a timm vision foundation model, vfm_archs.VFM_ARCHS).
    family: str
    # Architecture within the family, e.g. "ViT-B-16-quickgelu", "vitb8", "vit_b", or a tiny config "tiny".
    arch: str
    # Weights: an open_clip pretrained tag (CLIP), "official" (DINO/SAM/SAM 2/VFM release), "sam2.1" (SAM 2.1
    # release, SAM 2 family only), "random", or a local path.
    weights: str
    # Seed of the random initialisation; only meaningful when weights == "random" (default 0).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.arch not in _archs(self.family):
            raise ValueError(f"arch for family {self.family!r} must be one of {_archs(self.family)}, got {self.arch!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise ValueError(f"weights must be a non-empty string, got {self.weights!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.weights == RANDOM or self.is_local_file:
            return
        if _is_tiny(self.family, self.arch):
            raise ValueError(
                f"weights of the tiny configuration {self.family}:{self.arch} must be 'random' or a local "
                f"checkpoint path, got {self.weights!r}"
            )
        if self.family == "clip":
            allowed = _clip_tags(self.arch)
        else:
            allowed = (OFFICIAL, SAM2_1) if self.family == "sam2" else (OFFICIAL,)
        if self.weights not in allowed:
            raise ValueError(
                f"weights for {self.family}:{self.arch} must be one of {sorted(allowed) + [RANDOM]} "
                f"or a local checkpoint path, got {self.weights!r}"
            )

    @property
    def is_random(self) -> bool:
        """True when the weights are a seeded random initialisation."""
        return self.weights == RANDOM

    @property
    def is_tiny(self) -> bool:
        """True for the tiny test configurations (``clip:tiny``, ``dino:tiny8``, ...)."""
        return _is_tiny(self.family, self.arch)

    @property
    def is_local_file(self) -> bool:
        """True when ``weights`` names a local checkpoint file rather than a tag."""
        if self.weights in (RANDOM, OFFICIAL):
            return False
        if self.family == "clip" and not self.is_tiny and self.weights in _clip_tags(self.arch):
            return False
        return _looks_like_path(self.weights)

    @property
    def sam2_release(self) -> str:
        """SAM 2 family: ``"2.1"`` for ``@sam2.1`` and for local files named ``sam2.1*``, else ``"2"``.

        The release picks the sam2 package's config (``configs/sam2.1/...`` or ``configs/sam2/...``):
        SAM 2.1 checkpoints hold extra video-memory tensors (``no_obj_embed_spatial``,
        ``obj_ptr_tpos_proj``), so they load only into its config.
        """
        if self.weights == SAM2_1:
            return "2.1"
        if self.is_local_file and os.path.basename(self.weights).startswith("sam2.1"):
            return "2.1"
        return "2"

    @property
    def name(self) -> str:
        """Canonical name; ``parse_backbone(spec.name) == spec``."""
        base = f"{self.family}:{self.arch}"
        if self.is_random:
            return f"{base}@{RANDOM}:{self.seed}"
        if self.weights == OFFICIAL:
            return base
        return f"{base}@{self.weights}"


def parse_backbone(name: str) -> BackboneSpec:
    """Parse ``family:arch[@weights]`` into a :class:`BackboneSpec`.

    Examples: ``clip:ViT-B-16@openai``, ``clip:ViT-B-16`` (default tag), ``dino:vitb8``,
    ``sam:vit_b@random:3``, ``sam2:hiera_l`` (SAM 2), ``sam2:hiera_l@sam2.1``, ``vfm:radiov3_l``, ``clip:tiny``,
    ``dino:vits16@/weights/dino_deitsmall16_pretrain.pth``.

    Raises:
        ValueError: unknown family or architecture (the message lists the valid names), unknown
            pretrained tag, malformed seed, or pretrained tags on a tiny configuration.
    """
    if not isinstance(name, str):
        raise ValueError(f"backbone name must be a string, got {type(name).__name__}")
    head, has_weights, weights = name.partition("@")
    family, _, arch = head.partition(":")
    if family not in FAMILIES:
        raise _unknown_name(name, f"family {family!r} is not one of {FAMILIES}")
    if arch not in _archs(family):
        raise _unknown_name(name, f"architecture {arch!r} is not registered for {family}")
    if not has_weights:
        weights = RANDOM if _is_tiny(family, arch) else CLIP_ARCHS.get(arch, OFFICIAL)
    if not weights:
        raise ValueError(f"backbone {name!r} has an empty weights part after '@'")
    seed = 0
    if weights == RANDOM or weights.startswith(f"{RANDOM}:"):
        seed_text = weights[len(RANDOM) + 1 :] if weights != RANDOM else "0"
        if not seed_text.isdigit():
            raise ValueError(f"seed in backbone {name!r} must be an integer >= 0 (e.g. @random:3), got {seed_text!r}")
        weights, seed = RANDOM, int(seed_text)
    elif family == "clip" and not _is_tiny(family, arch) and not _looks_like_path(weights):
        weights = weights.lower().replace("-", "_")  # open_clip's tag normalisation
    elif _looks_like_path(weights):
        weights = os.fspath(weights)
    return BackboneSpec(family=family, arch=arch, weights=weights, seed=seed)
