"""SAM 2 architectures: the sam2 package's own config files, instantiated offline with random weights.

The sam2 package describes each model by a YAML file (``configs/sam2/sam2_hiera_l.yaml``, ...)
that ``sam2.build_sam.build_sam2`` composes through Hydra's global state. Here the same file is
read with OmegaConf from the installed package and instantiated with ``hydra.utils.instantiate``,
which gives the model ``build_sam2(config, ckpt_path=None, apply_postprocessing=False)`` builds
(the CorrCLIP reference passes ``apply_postprocessing=False``: no dynamic multimask fallback), but
neither needs nor changes Hydra's global configuration and never touches the network.

``sam2:tiny`` is ``sam2_hiera_t.yaml`` shrunk by :data:`TINY_OVERRIDES` (Hiera width 8 with 5
blocks, 32-channel neck and SAM heads, a one-layer memory path): same classes and code paths,
1024 px input, about 0.65 M parameters.

The sam2 package is imported only when a SAM 2 model is built (it initialises Hydra on import).
"""

from __future__ import annotations

import inspect
from importlib import resources
from typing import Any

from torch import nn

from .spec import BackboneSpec

__all__ = ["TINY_OVERRIDES", "build_sam2_model", "sam2_config", "sam2_config_name", "sam2_geometry"]

# Dotlist overrides turning sam2_hiera_t.yaml into the tiny test configuration. Hiera's global
# attention block must not be a stage's first (pooling) block, hence stages [1, 1, 2, 1].
TINY_OVERRIDES: tuple[str, ...] = (
    "model.image_encoder.trunk.embed_dim=8",
    "model.image_encoder.trunk.stages=[1,1,2,1]",
    "model.image_encoder.trunk.global_att_blocks=[3]",
    "model.image_encoder.neck.d_model=32",
    "model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "model.memory_attention.d_model=32",
    "model.memory_attention.num_layers=1",
    "model.memory_attention.layer.d_model=32",
    "model.memory_attention.layer.dim_feedforward=64",
    "model.memory_attention.layer.self_attention.embedding_dim=32",
    "model.memory_attention.layer.cross_attention.embedding_dim=32",
    "model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "model.memory_encoder.out_dim=16",
    "model.memory_encoder.in_dim=32",
    "model.memory_encoder.mask_downsampler.embed_dim=32",
    "model.memory_encoder.fuser.layer.dim=32",
    "model.memory_encoder.fuser.num_layers=1",
    "model.memory_encoder.position_encoding.num_pos_feats=16",
)
# Stride of SAM2Base's image embedding when the config does not set backbone_stride (its default).
_DEFAULT_BACKBONE_STRIDE = 16


def sam2_config_name(spec: BackboneSpec) -> str:
    """The sam2 package's config file of ``spec``, e.g. ``configs/sam2/sam2_hiera_l.yaml``."""
    if spec.family != "sam2":
        raise ValueError(f"sam2_config_name needs a sam2:* backbone, got {spec.name}")
    arch = "hiera_t" if spec.is_tiny else spec.arch
    if spec.sam2_release == "2.1":
        return f"configs/sam2.1/sam2.1_{arch}.yaml"
    return f"configs/sam2/sam2_{arch}.yaml"


def sam2_config(spec: BackboneSpec) -> Any:
    """The resolved OmegaConf config of ``spec`` (tiny overrides applied), read from the installed package."""
    from omegaconf import OmegaConf

    name = sam2_config_name(spec)
    try:
        text = resources.files("sam2").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{spec.name} needs the sam2 package (sam2==1.1.0); run `make install`, which builds it "
            "with SAM2_BUILD_CUDA=0 and --no-build-isolation"
        ) from e
    cfg = OmegaConf.create(text)
    if spec.is_tiny:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(TINY_OVERRIDES)))
    OmegaConf.resolve(cfg)
    return cfg


def build_sam2_model(spec: BackboneSpec) -> nn.Module:
    """``sam2.modeling.sam2_base.SAM2Base`` of ``spec`` with random weights from the global RNG.

    The caller seeds and forks the RNG (:func:`ovseg_core.backbones.builders.build_model`).
    """
    from hydra.utils import instantiate

    return instantiate(sam2_config(spec).model, _recursive_=True)


def sam2_geometry(spec: BackboneSpec) -> tuple[int, int]:
    """(image-embedding stride in pixels, number of Hiera blocks), read from the config without building.

    A field the config leaves out takes the class default (``hiera_b+`` keeps Hiera's default stages).
    """
    from sam2.modeling.backbones.hieradet import Hiera

    model = sam2_config(spec).model
    stride = int(model.get("backbone_stride", _DEFAULT_BACKBONE_STRIDE))
    stages = model.image_encoder.trunk.get("stages", inspect.signature(Hiera).parameters["stages"].default)
    return stride, int(sum(stages))
