"""VFM checkpoints: the official files' keys mapped onto the timm architectures of ``vfm_archs``.

The conversions are timm's own checkpoint filters (the functions ``timm.create_model(...,
pretrained=True)`` applies), fed with the official files' keys:

- C-RADIOv3 (``radio``): the torch.hub file of NVlabs/RADIO holds ``{"args", "state_dict"[,
  "state_dict_ema"]}`` with the backbone under ``base_model.`` and the input conditioner under
  ``input_conditioner.`` (NVlabs/RADIO ``hubconf.radio_model``: the EMA weights are used when
  present); the Hugging Face ``model.safetensors`` holds the same tensors under ``radio_model.``.
  Both are mapped to the Hugging Face names and given to timm's NaFlexViT filter (patch
  projection to a bias-free linear layer, first summary token = CLS, the other summary and
  register tokens = registers, the 128 x 128 position grid kept). Teacher heads and adaptors are
  dropped. The input conditioner is not a weight of the timm model: its mean and std must be
  OpenAI CLIP's, which :func:`ovseg_core.features.vfm_preprocess.vfm_input` applies (checked here).
- DINOv2 (``dinov2``): timm's ViT filter (``mask_token`` dropped, ``cls_token`` + its position folded
  into ``cls_token``, ``register_tokens`` -> ``reg_token``).
- DINOv3 and PE (``dinov3``, ``pe``): timm's Eva filter (DINOv3: ``storage_tokens`` -> registers,
  ``qkv.bias`` split into the q and v biases, k bias fixed to 0 as DINOv3's ``bias_mask`` does;
  PE: ``conv1``/``positional_embedding``/``transformer.resblocks`` renamed). DINOv3's RoPE
  ``periods`` buffer is not a timm weight; :func:`load_vfm_buffers` copies the stored values in
  (the release stores them rounded to bfloat16; timm would recompute them in float32).
"""

from __future__ import annotations

import torch
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import eva, naflexvit, vision_transformer
from torch import nn

__all__ = ["convert_vfm_keys", "load_vfm_buffers"]

_HF_PREFIX = "radio_model."
_HF_BACKBONE = _HF_PREFIX + "model."
_HF_CONDITIONER = _HF_PREFIX + "input_conditioner."
_HUB_BACKBONE = "base_model."
_HUB_CONDITIONER = "input_conditioner."
# Largest tolerated deviation of a stored conditioner constant from OpenAI CLIP's (fp16 files round them).
_CONDITIONER_TOL = 1e-3
_DINOV3_PERIODS = "rope_embed.periods"


def _radio_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone and conditioner tensors of a RADIO checkpoint under the Hugging Face names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_HF_BACKBONE) or k.startswith(_HF_CONDITIONER):
            out[k] = v
        elif k.startswith(_HUB_BACKBONE):
            out[_HF_BACKBONE + k[len(_HUB_BACKBONE):]] = v
        elif k.startswith(_HUB_CONDITIONER):
            out[_HF_CONDITIONER + k[len(_HUB_CONDITIONER):]] = v
    if not any(k.startswith(_HF_BACKBONE) for k in out):
        raise ValueError(
            "not a RADIO checkpoint: no 'base_model.' (torch.hub file) or 'radio_model.model.' (Hugging Face "
            f"model.safetensors) keys; first keys: {sorted(sd)[:5]}"
        )
    return out


def _check_radio_conditioner(sd: dict[str, torch.Tensor]) -> None:
    """The checkpoint's input conditioner must be OpenAI CLIP's mean / std (what the preprocessing applies)."""
    for name, expected in (("norm_mean", OPENAI_CLIP_MEAN), ("norm_std", OPENAI_CLIP_STD)):
        stored = sd.get(_HF_CONDITIONER + name)
        if stored is None:
            continue
        got = stored.float().flatten()
        if got.numel() != 3 or not torch.allclose(got, torch.tensor(expected), atol=_CONDITIONER_TOL):
            raise ValueError(
                f"RADIO checkpoint has input conditioner {name}={got.tolist()}, but ovseg's RADIO preprocessing "
                f"uses OpenAI CLIP's {list(expected)}; this checkpoint is not supported"
            )


def convert_vfm_keys(model: nn.Module, kind: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official VFM checkpoint onto the keys of ``model`` (a ``vfm_archs`` timm model).

    Args:
        model: the timm model built for the architecture.
        kind: the architecture's kind (``radio`` | ``dinov2`` | ``dinov3`` | ``pe``).
        sd: the file's tensors (containers already unwrapped by ``weights.read_state_dict``).
    Returns:
        the state dict to load strictly into ``model``.
    Raises:
        ValueError: a RADIO file without backbone keys or with a non-CLIP input conditioner.
    """
    if kind == "radio":
        hf = _radio_hf_names(sd)
        _check_radio_conditioner(hf)
        return naflexvit.checkpoint_filter_fn({k: v for k, v in hf.items() if k.startswith(_HF_BACKBONE)}, model)
    if kind == "dinov2":
        return vision_transformer.checkpoint_filter_fn(dict(sd), model)
    if kind in ("dinov3", "pe"):
        return eva.checkpoint_filter_fn(dict(sd), model)
    raise ValueError(f"unknown VFM kind {kind!r}")


def load_vfm_buffers(model: nn.Module, kind: str, sd: dict[str, torch.Tensor]) -> None:
    """Copy the stored values of buffers timm recomputes instead of loading (after the strict load).

    DINOv3: ``rope_embed.periods`` into the RoPE module's ``periods``, so the rotary angles use the
    release's (bfloat16-rounded) periods as DINOv3 does. Other kinds: nothing.

    Raises:
        ValueError: stored periods of another shape than the model's.
    """
    if kind != "dinov3" or _DINOV3_PERIODS not in sd:
        return
    periods = model.rope.periods
    stored = sd[_DINOV3_PERIODS]
    if tuple(stored.shape) != tuple(periods.shape):
        raise ValueError(f"{_DINOV3_PERIODS} has shape {tuple(stored.shape)}, the model's RoPE {tuple(periods.shape)}")
    with torch.no_grad():
        periods.copy_(stored.to(periods.dtype))
