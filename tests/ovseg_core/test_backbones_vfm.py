"""VFM backbones: official checkpoint layouts load into the timm architectures and compute what the
authors' models compute (independent references in ``vfm_reference``), names and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovseg_core.backbones import load_backbone, official_weight_file, weights_identity
from ovseg_core.backbones.vfm_archs import TINY_VFM_ARCHS, VFM_ARCHS, vfm_arch
from ovseg_core.features.vfm_preprocess import VFM_KINDS

from . import vfm_reference as ref

ATOL = 2e-4


def _save(tmp_path: Path, name: str, obj: dict) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)[0, model.num_prefix_tokens:]


# --- registry -------------------------------------------------------------------------------


def test_registry_rows_name_official_files_and_kinds():
    assert {a.kind for a in VFM_ARCHS.values()} == set(VFM_KINDS)
    assert {a.kind for a in TINY_VFM_ARCHS.values()} == set(VFM_KINDS)
    for name, arch in VFM_ARCHS.items():
        assert official_weight_file(f"vfm:{name}") == (arch.file, arch.url)
        assert arch.page and arch.page.startswith("https://")
    with pytest.raises(ValueError, match="unknown VFM architecture 'radio'.*radiov3_l"):
        vfm_arch("radio")


def test_missing_official_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"c-radio-v3_l_half\.pth\.tar.*huggingface\.co/nvidia/C-RADIOv3-L"):
        weights_identity("vfm:radiov3_l", weights_dir=tmp_path)


# --- C-RADIOv3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(48, 80), (96, 32)])
def test_radio_hub_file_loads_and_matches_radio(tmp_path, hw):
    ckpt, blocks = ref.radio_checkpoint(seed=1)
    path = _save(tmp_path, "c-radio.pth.tar", ckpt)  # holds an argparse.Namespace next to the tensors
    model = load_backbone(f"vfm:tiny_radiov3@{path}").model
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    expected = ref.radio_reference(ckpt["state_dict"], blocks, x)
    torch.testing.assert_close(_features(model, x), expected, atol=ATOL, rtol=0)


def test_radio_hugging_face_file_gives_the_same_model(tmp_path):
    hub, _ = ref.radio_checkpoint(seed=3)
    hf, _ = ref.radio_checkpoint(seed=3, hub_format=False)
    a = load_backbone(f"vfm:tiny_radiov3@{_save(tmp_path, 'hub.pth.tar', hub)}").model
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    b = load_backbone(f"vfm:tiny_radiov3@{path}").model
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_radio_prefers_the_ema_weights(tmp_path):
    ckpt, blocks = ref.radio_checkpoint(seed=4)
    other, _ = ref.radio_checkpoint(seed=5)
    ckpt = {"args": ckpt["args"], "state_dict": other["state_dict"], "state_dict_ema": ckpt["state_dict"]}
    model = load_backbone(f"vfm:tiny_radiov3@{_save(tmp_path, 'ema.pth.tar', ckpt)}").model
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_features(model, x), ref.radio_reference(ckpt["state_dict_ema"], blocks, x),
                               atol=ATOL, rtol=0)


def test_radio_with_another_input_conditioner_is_refused(tmp_path):
    ckpt, _ = ref.radio_checkpoint(seed=1)
    ckpt["state_dict"]["input_conditioner.norm_mean"] = torch.full((3, 1, 1), 0.5)
    with pytest.raises(ValueError, match=r"input conditioner norm_mean=\[0\.5, 0\.5, 0\.5\]"):
        load_backbone(f"vfm:tiny_radiov3@{_save(tmp_path, 'bad.pth.tar', ckpt)}")


def test_radio_loader_refuses_a_file_of_another_model(tmp_path):
    sd, _ = ref.dinov2_checkpoint()
    with pytest.raises(ValueError, match="not a RADIO checkpoint"):
        load_backbone(f"vfm:tiny_radiov3@{_save(tmp_path, 'dino.pth', sd)}")


# --- DINOv2 / DINOv3 ------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(518, 518), (70, 126), (280, 42)])
def test_dinov2_file_loads_and_matches_dinov2(tmp_path, hw):
    sd, blocks = ref.dinov2_checkpoint(seed=6)
    model = load_backbone(f"vfm:tiny_dinov2@{_save(tmp_path, 'dinov2_vitl14_reg4_pretrain.pth', sd)}").model
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_features(model, x), ref.dinov2_reference(sd, blocks, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("hw", [(64, 112), (224, 224)])
def test_dinov3_file_loads_and_matches_dinov3(tmp_path, hw):
    sd, blocks = ref.dinov3_checkpoint(seed=8)
    model = load_backbone(f"vfm:tiny_dinov3@{_save(tmp_path, 'dinov3.pth', sd)}").model
    assert torch.equal(model.rope.periods, sd["rope_embed.periods"])  # the stored (bf16-rounded) periods
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(_features(model, x), ref.dinov3_reference(sd, blocks, x), atol=ATOL, rtol=0)


def test_dinov3_stored_periods_matter(tmp_path):
    # without the copy of the stored periods the RoPE would use timm's recomputed ones
    sd, blocks = ref.dinov3_checkpoint(seed=8)
    model = load_backbone(f"vfm:tiny_dinov3@{_save(tmp_path, 'dinov3.pth', sd)}").model
    x = torch.randn(1, 3, 64, 112, generator=torch.Generator().manual_seed(9))
    good = _features(model, x)
    model.rope.periods.copy_(model.rope._compute_periods())
    assert (good - _features(model, x)).abs().max() > 1e-3


def test_pe_file_loads_into_the_timm_model(tmp_path):
    sd, _ = ref.pe_checkpoint(seed=10)
    model = load_backbone(f"vfm:tiny_pe@{_save(tmp_path, 'PE-Spatial-L14-448.pt', sd)}").model
    torch.testing.assert_close(model.pos_embed[0], sd["positional_embedding"])
    torch.testing.assert_close(model.cls_token.flatten(), sd["class_embedding"])
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, sd["transformer.resblocks.1.attn.in_proj_weight"])


@pytest.mark.parametrize("wrap", ["weights", "visual"])
def test_pe_file_layouts_its_loader_accepts(tmp_path, wrap):
    # PE's load_ckpt accepts {"weights": sd} and keys under "visual." (a CLIP checkpoint's vision tower)
    sd, _ = ref.pe_checkpoint(seed=12)
    plain = load_backbone(f"vfm:tiny_pe@{_save(tmp_path, 'plain.pt', sd)}").model
    obj = {"weights": sd} if wrap == "weights" else {f"visual.{k}": v for k, v in sd.items()}
    other = load_backbone(f"vfm:tiny_pe@{_save(tmp_path, 'wrapped.pt', obj)}").model
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in other.state_dict().items())


def test_wrong_family_file_names_the_problem(tmp_path):
    sd, _ = ref.dinov2_checkpoint()
    with pytest.raises(ValueError, match="does not fit vfm:tiny_dinov3"):
        load_backbone(f"vfm:tiny_dinov3@{_save(tmp_path, 'x.pth', sd)}")
