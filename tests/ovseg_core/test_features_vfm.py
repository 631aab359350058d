"""VFM preprocessing (sizes per backbone, normalisation, cap) and dense features of the four kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.backbones import load_backbone
from ovseg_core.features.vfm import pe_abs_pos_embed, pe_rope_table, vfm_dense_features
from ovseg_core.features.vfm_preprocess import (
    capped_size,
    nearest_multiple,
    vfm_input,
    vfm_input_size,
    vfm_token_grid,
)

from . import vfm_reference as ref

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
CLIP = (torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711]))


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- sizes (hand-computed) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, patch, hw, expected",
    [
        # RADIO get_nearest_supported_resolution: round(side / 16) * 16, Python round (halves to even), min 16
        ("radio", 16, (75, 130), (80, 128)),  # 4.69 -> 5, 8.125 -> 8
        ("radio", 16, (24, 40), (32, 32)),  # 1.5 -> 2, 2.5 -> 2 (ties to even)
        ("radio", 16, (7, 9), (16, 16)),  # 0.44 -> 0 -> min 16, 0.56 -> 1
        ("radio", 16, (1080, 1920), (1088, 1920)),  # 67.5 -> 68, 120
        ("radio", 16, (512, 683), (512, 688)),  # ADE20K-like: 42.69 -> 43
        # DINOv2: nearest multiple of 14
        ("dinov2", 14, (75, 130), (70, 126)),  # 5.36 -> 5, 9.29 -> 9
        ("dinov2", 14, (21, 35), (28, 28)),  # 1.5 -> 2, 2.5 -> 2
        ("dinov2", 14, (500, 375), (504, 378)),  # 35.71 -> 36, 26.79 -> 27
        ("dinov2", 14, (518, 518), (518, 518)),
        # DINOv3: nearest multiple of 16
        ("dinov3", 16, (500, 375), (496, 368)),  # 31.25 -> 31, 23.44 -> 23
        ("dinov3", 16, (8, 100), (16, 96)),  # 0.5 -> 0 -> min 16, 6.25 -> 6
        # PE: native size, no resize
        ("pe", 14, (500, 375), (500, 375)),
    ],
)
def test_input_sizes(kind, patch, hw, expected):
    assert vfm_input_size(kind, hw, patch) == expected
    assert vfm_token_grid(kind, hw, patch) == (expected[0] // patch, expected[1] // patch)


def test_pe_grid_floors_and_nearest_multiple():
    assert vfm_token_grid("pe", (500, 375), 14) == (35, 26)  # 500 // 14, 375 // 14
    assert nearest_multiple(88, 16) == 96 and nearest_multiple(72, 16) == 64  # 5.5 -> 6, 4.5 -> 4
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        vfm_token_grid("pe", (13, 100), 14)
    with pytest.raises(ValueError, match="VFM kind must be one of"):
        vfm_input_size("dino", (10, 10), 8)


def test_size_cap():
    assert capped_size((1000, 600), None) == (1000, 600)
    assert capped_size((1000, 600), 1000) == (1000, 600)
    assert capped_size((1000, 600), 500) == (500, 300)
    assert capped_size((333, 1001), 500) == (166, 500)  # 333 * 500 / 1001 = 166.33
    with pytest.raises(ValueError, match="max_side must be None or an int >= 1"):
        capped_size((10, 10), 0)


# --- normalisation --------------------------------------------------------------------------


def test_radio_input_is_resized_then_conditioned():
    img = _image(75, 130)
    x = vfm_input(img, "radio", 16)
    expected = F.interpolate(img[None].float() / 255, size=(80, 128), mode="bilinear", align_corners=False)
    expected = (expected - CLIP[0].view(3, 1, 1)) / CLIP[1].view(3, 1, 1)
    assert x.shape == (1, 3, 80, 128) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_dino_input_is_normalised_then_resized_only_when_needed():
    img = _image(70, 126)
    x = vfm_input(img, "dinov2", 14)
    exact = (img[None].float() / 255 - IMAGENET[0].view(3, 1, 1)) / IMAGENET[1].view(3, 1, 1)
    assert torch.equal(x, exact)  # multiples of 14: no resize at all
    img = _image(75, 130)
    x = vfm_input(img, "dinov3", 16)
    normed = (img[None].float() / 255 - IMAGENET[0].view(3, 1, 1)) / IMAGENET[1].view(3, 1, 1)
    torch.testing.assert_close(x, F.interpolate(normed, size=(80, 128), mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=0)


def test_pe_input_keeps_the_native_size():
    img = _image(75, 130)
    x = vfm_input(img, "pe", 14)
    assert torch.equal(x, (img[None].float() / 255 - 0.5) / 0.5)


def test_cap_shrinks_before_the_vfm_rounding():
    img = _image(100, 300)
    x = vfm_input(img, "radio", 16, max_side=150)  # capped to 50 x 150, then 48 x 144
    assert x.shape[-2:] == (48, 144)
    assert vfm_input(img, "pe", 14, max_side=150).shape[-2:] == (50, 150)


def test_bad_image_shape():
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\) RGB"):
        vfm_input(torch.zeros(1, 3, 32, 32), "radio", 16)


# --- dense features -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, hw, grid",
    [
        ("vfm:tiny_radiov3", "radio", (75, 130), (5, 8)),
        ("vfm:tiny_dinov2", "dinov2", (75, 130), (5, 9)),
        ("vfm:tiny_dinov3", "dinov3", (75, 130), (5, 8)),
        ("vfm:tiny_pe", "pe", (75, 130), (5, 9)),
    ],
)
def test_dense_map_shape_and_layout(name, kind, hw, grid):
    bb = load_backbone(name)
    img = _image(*hw)
    fmap = vfm_dense_features(bb.model, kind, bb.patch_size, img)
    assert fmap.shape == (64, *grid) and fmap.dtype == torch.float32
    if kind != "pe":  # row-major token order: the map equals the model's own patch tokens reshaped
        with torch.no_grad():
            tokens = bb.model.forward_features(vfm_input(img, kind, bb.patch_size))[0, bb.model.num_prefix_tokens:]
        torch.testing.assert_close(fmap, tokens.T.reshape(64, *grid))


@pytest.mark.parametrize("hw", [(448, 448), (75, 130), (150, 98)])
def test_pe_dense_map_matches_pe(tmp_path, hw):
    sd, blocks = ref.pe_checkpoint(seed=11)
    path = tmp_path / "PE-Spatial-L14-448.pt"
    torch.save(sd, path)
    model = load_backbone(f"vfm:tiny_pe@{path}").model
    img = _image(*hw, seed=3)
    fmap = vfm_dense_features(model, "pe", 14, img)
    expected = ref.pe_reference(sd, blocks, vfm_input(img, "pe", 14))
    gh, gw = hw[0] // 14, hw[1] // 14
    torch.testing.assert_close(fmap, expected.T.reshape(64, gh, gw), atol=2e-4, rtol=0)


def test_pe_pieces_by_hand():
    # grid 1 x 2, head dim 8: frequencies 1 and 1/100 (10000^(-2i/4)), x = 1, 2, y = 1
    table = pe_rope_table((1, 2), 8)
    angles = torch.tensor([[1, 1, 0.01, 0.01, 1, 1, 0.01, 0.01], [2, 2, 0.02, 0.02, 1, 1, 0.01, 0.01]])
    torch.testing.assert_close(table, torch.cat([angles.sin(), angles.cos()], dim=-1))
    pos = torch.arange((1 + 4) * 2, dtype=torch.float32).reshape(1, 5, 2)
    assert torch.equal(pe_abs_pos_embed(pos, (2, 2)), pos)
    out = pe_abs_pos_embed(pos, (1, 1))  # a 2x2 grid averaged to one position, CLS kept
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0], [5.0, 6.0]]]))


def test_autocast_runs_the_forward_in_lower_precision():
    bb = load_backbone("vfm:tiny_dinov2")
    img = _image(56, 56)
    full = vfm_dense_features(bb.model, "dinov2", 14, img)
    low = vfm_dense_features(bb.model, "dinov2", 14, img, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(full, low)
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.1)
