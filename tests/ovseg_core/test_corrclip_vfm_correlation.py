"""VFM correlation (CorrCLIPv2): per-window features equal the dense formula of the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.corrclip import bilinear_matrix, correlation_grid, similarity, vfm_window_features
from ovseg_core.windows import plan_windows


def _dense_reference(vfm_map: torch.Tensor, plan, clip_patch: int) -> torch.Tensor:
    """The reference's steps literally: full-resolution map, normalise, crop, replicate-pad, resize, normalise."""
    big = F.interpolate(vfm_map[None], size=plan.resized_hw, mode="bilinear", align_corners=False)
    big = F.normalize(big, dim=1)
    hp, wp = plan.padded_hw
    grid = (hp // clip_patch * 2, wp // clip_patch * 2)
    out = []
    for win in plan.windows:
        crop = big[:, :, win.y1:win.y2, win.x1:win.x2]
        top, bottom, left, right = win.pad
        if any(win.pad):
            crop = F.pad(crop, (left, right, top, bottom), mode="replicate")
        feats = F.interpolate(crop, size=grid, mode="bilinear").flatten(2).transpose(1, 2)
        out.append(F.normalize(feats, dim=-1).reshape(*grid, -1))
    return torch.stack(out)


@pytest.mark.parametrize(
    "orig_hw, short_side, crop, stride, map_hw, clip_patch",
    [
        ((512, 683), 448, 336, 112, (32, 43), 14),  # ADE20K-like, ViT-L/14: 48 x 48 grid, no padding
        ((512, 683), 448, 336, 112, (32, 43), 16),  # ViT-B/16: 42 x 42
        ((1024, 2048), 224, 224, 112, (64, 128), 16),  # Cityscapes-like, 224 crops padded to 224 (= 4 x 56)
        ((300, 451), 200, 150, 70, (19, 28), 14),  # padded windows (150 -> 168), odd stride
        ((90, 500), 60, 336, 112, (6, 31), 14),  # crop larger than the image: one small padded row of windows
    ],
)
def test_equals_the_dense_reference(orig_hw, short_side, crop, stride, map_hw, clip_patch):
    plan = plan_windows(orig_hw, short_side, crop, stride, pad_multiple=56)
    vfm_map = torch.randn(24, *map_hw, generator=torch.Generator().manual_seed(0))
    got = vfm_window_features(vfm_map, plan, clip_patch)
    expected = _dense_reference(vfm_map, plan, clip_patch)
    assert got.shape == expected.shape == (len(plan.windows), *correlation_grid(plan.padded_hw, clip_patch), 24)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    # S = F F^T is the cosine similarity of unit vectors
    s = similarity(got)
    assert torch.allclose(s.diagonal(dim1=1, dim2=2), torch.ones(1), atol=1e-5)


def test_window_ranges_and_dtype():
    plan = plan_windows((300, 451), 200, 150, 70, pad_multiple=56)
    vfm_map = torch.randn(8, 19, 28, generator=torch.Generator().manual_seed(1))
    whole = vfm_window_features(vfm_map, plan, 14)
    assert torch.equal(vfm_window_features(vfm_map, plan, 14, start=2, stop=5), whole[2:5])
    assert vfm_window_features(vfm_map, plan, 14, start=3, stop=3).shape == (0, *whole.shape[1:])
    half = vfm_window_features(vfm_map.half(), plan, 14, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), whole, atol=5e-3, rtol=0)


def test_replicate_padding_repeats_the_edge():
    # a map varying only along x; a window padded left and right: the padded columns repeat the edge values
    plan = plan_windows((40, 40), 40, 40, 40, pad_multiple=56)  # one 40 x 40 window padded by 8 on each side
    ramp = torch.stack([torch.linspace(-1, 1, 10).expand(10, 10), torch.ones(10, 10)])  # (2, 10, 10)
    feats = vfm_window_features(ramp, plan, 14)[0]  # 56 // 14 * 2 = 8 x 8 grid
    assert feats.shape == (8, 8, 2)
    assert torch.allclose(feats[:, 0], feats[:, 0][:1].expand(8, 2))  # rows equal (no y variation)
    expected = _dense_reference(ramp, plan, 14)[0]
    torch.testing.assert_close(feats, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_in, n_out", [(5, 17), (17, 5), (7, 7), (48, 336), (336, 48), (1, 4), (4, 1)])
def test_bilinear_matrix_is_pytorch_bilinear(n_in, n_out):
    x = torch.randn(n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = F.interpolate(x.view(1, 1, 1, -1), size=(1, n_out), mode="bilinear", align_corners=False).flatten()
    torch.testing.assert_close(bilinear_matrix(n_in, n_out) @ x, expected)
    assert torch.allclose(bilinear_matrix(n_in, n_out).sum(1), torch.ones(n_out, dtype=torch.float64))


def test_correlation_grid_is_twice_the_clip_grid():
    assert correlation_grid((336, 336), 16) == (42, 42)  # ViT-B/16 at 336: v1's DINO /8 grid
    assert correlation_grid((336, 336), 14) == (48, 48)  # ViT-L/14 at 336
    assert correlation_grid((224, 224), 16) == (28, 28)
    assert correlation_grid((280, 336), 16) == (34, 42)  # 280 // 16 = 17 (the patch conv floors)
    with pytest.raises(ValueError, match="at least one 14x14 CLIP patch"):
        correlation_grid((10, 336), 14)


def test_bad_inputs():
    plan = plan_windows((40, 40), 40, 40, 40, pad_multiple=56)
    with pytest.raises(ValueError, match=r"float \(C, h, w\) map"):
        vfm_window_features(torch.zeros(2, 4, 4, dtype=torch.int64), plan, 14)
    with pytest.raises(ValueError, match=r"window range 0\.\.5 is outside 0\.\.1"):
        vfm_window_features(torch.zeros(2, 4, 4), plan, 14, stop=5)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        bilinear_matrix(0, 3)
