"""Per-window entry point: wiring, precomputed blocks/semantic paths, batching, switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ovseg_core import clip_ops
from ovseg_core.corrclip import (
    CorrCLIPConfig,
    cluster_masks,
    corrclip_window_features,
    feature_refinement,
    mask_class_tokens,
    required_blocks,
    resize_regions,
    scope_reconstruction,
    similarity,
    value_reconstruction,
)

CFG = CorrCLIPConfig(num_spatial=2)  # a 4-block tower: spatial branch = blocks 1..2


@pytest.fixture(scope="module")
def visual() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=224, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32).eval()


@pytest.fixture(scope="module")
def window() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 64x64 crops (CLIP grid 4x4), DINO q+k on an 8x8 grid, blocky region maps with padding."""
    torch.manual_seed(1)
    crops = torch.randn(2, 3, 64, 64)
    coarse = torch.randint(0, 6, (2, 4, 4))
    coarse[:, 0, :3] = torch.tensor([0, 1, 2])  # every window has regions 0, 1 and 2
    regions = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
    regions[1, :, 56:] = -1  # padded strip in window 1
    # q+k features follow the regions; regions 1 and 2 look alike, so DBSCAN merges them
    directions = torch.randn(6, 16)
    directions[2] = directions[1]
    qk = directions[coarse.clamp_min(0)].repeat_interleave(2, 1).repeat_interleave(2, 2)
    qk = F.normalize(qk + 0.3 * torch.randn(2, 8, 8, 16), dim=-1)
    return crops, qk, regions


def _blocks(visual: VisionTransformer, crops: torch.Tensor, cfg: CorrCLIPConfig) -> dict[str, torch.Tensor]:
    tokens_in, _ = clip_ops.embed_tokens(visual, crops)
    _, kept = clip_ops.run_blocks(visual, tokens_in, 1, 3, keep=(1, 2, 3))
    names = required_blocks(cfg, 4)
    out = {names[0]: kept[3]}
    if cfg.spatial_branch:
        out[names[1]] = (kept[1] + kept[2]) / 2
    return out


def test_equals_the_composition_of_the_step_functions(visual, window) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        out = corrclip_window_features(visual, crops, qk, regions, CFG)
        merged = cluster_masks(qk, resize_regions(regions, (8, 8)), CFG)
        s = similarity(qk)
        attn = value_reconstruction(s, scope_reconstruction(s, merged.reshape(2, -1), CFG), CFG)
        blocks = _blocks(visual, crops, CFG)
        tokens_in, _ = clip_ops.embed_tokens(visual, crops)
        semantic = mask_class_tokens(visual, tokens_in, resize_regions(merged, (4, 4)), CFG)
        expected = feature_refinement(
            visual, blocks["block:3"], blocks["mean:1-2"], semantic, attn, (4, 4), (8, 8), CFG
        )
    assert out.shape == (2, 8, 8, 32)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, expected, atol=1e-5)


def test_given_blocks_equal_computed_path(visual, window) -> None:
    crops, qk, regions = window
    for cfg in (CFG, CorrCLIPConfig(num_spatial=2, spatial_branch=False, semantic_branch=False)):
        with torch.no_grad():
            computed = corrclip_window_features(visual, crops, qk, regions, cfg)
            given = corrclip_window_features(visual, crops, qk, regions, cfg, blocks=_blocks(visual, crops, cfg))
        assert torch.allclose(computed, given, atol=1e-5)


def test_given_semantic_equals_computed_path(visual, window) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        merged = cluster_masks(qk, resize_regions(regions, (8, 8)), CFG)
        tokens_in, _ = clip_ops.embed_tokens(visual, crops)
        semantic = mask_class_tokens(visual, tokens_in, resize_regions(merged, (4, 4)), CFG)
        computed = corrclip_window_features(visual, crops, qk, regions, CFG)
        given = corrclip_window_features(visual, crops, qk, regions, CFG, blocks=_blocks(visual, crops, CFG), semantic=semantic)
    assert torch.allclose(computed, given, atol=1e-5)


def test_given_merged_equals_computed_path(visual, window) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        merged = cluster_masks(qk, resize_regions(regions, (8, 8)), CFG)
        computed = corrclip_window_features(visual, crops, qk, regions, CFG)
        given = corrclip_window_features(visual, crops, qk, regions, CFG, merged=merged)
        other = corrclip_window_features(visual, crops, qk, regions, CFG, merged=torch.zeros_like(merged))
    assert torch.allclose(computed, given, atol=1e-6)
    assert not torch.allclose(computed, other, atol=1e-3)  # the given map is really used
    with pytest.raises(ValueError, match="merged must be"):
        corrclip_window_features(visual, crops, qk, regions, CFG, merged=merged[:, :4])


def test_batch_equals_single_windows(visual, window) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        both = corrclip_window_features(visual, crops, qk, regions, CFG)
        for w in range(2):
            alone = corrclip_window_features(visual, crops[w : w + 1], qk[w : w + 1], regions[w : w + 1], CFG)
            assert torch.allclose(both[w], alone[0], atol=1e-5)


def test_token_transform_applies_to_the_main_branch_only(visual, window) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        plain = corrclip_window_features(visual, crops, qk, regions, CFG)
        identity = corrclip_window_features(visual, crops, qk, regions, CFG, token_transform=lambda t, grid: t)
        seen: list[tuple[int, int]] = []

        shift = torch.randn(1, 17, 64)  # not a per-token affine map: ln_1 would undo those

        def shifted(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            seen.append(grid)
            return tokens + shift

        changed = corrclip_window_features(visual, crops, qk, regions, CFG, token_transform=shifted)
    assert torch.equal(plain, identity)
    assert seen == [(4, 4)]
    assert not torch.allclose(plain, changed, atol=1e-3)
    with pytest.raises(ValueError, match="token_transform"):
        corrclip_window_features(visual, crops, qk, regions, CFG, token_transform=lambda t, grid: t[:, 1:])


@pytest.mark.parametrize(
    "overrides",
    [
        {"scope_reconstruction": False},
        {"value_reconstruction": False},
        {"mask_clustering": False, "m0_quirk": False},
        {"spatial_branch": False, "semantic_branch": False},
        {
            "scope_reconstruction": False,
            "value_reconstruction": False,
            "mask_clustering": False,
            "spatial_branch": False,
            "semantic_branch": False,
        },
    ],
)
def test_ablation_switches_run_and_change_the_output(visual, window, overrides: dict) -> None:
    crops, qk, regions = window
    with torch.no_grad():
        paper = corrclip_window_features(visual, crops, qk, regions, CFG)
        out = corrclip_window_features(visual, crops, qk, regions, CorrCLIPConfig(num_spatial=2, **overrides))
    assert out.shape == paper.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, paper, atol=1e-4)


def test_bad_inputs(visual, window) -> None:
    crops, qk, regions = window
    with pytest.raises(ValueError, match="crop resolution"):
        corrclip_window_features(visual, crops, qk, regions[:, :32], CFG)
    with pytest.raises(ValueError, match="required_blocks"):
        corrclip_window_features(visual, crops, qk, regions, CFG, blocks={"block:3": torch.zeros(2, 17, 64)})
    with pytest.raises(ValueError, match="semantic_branch is False"):
        corrclip_window_features(
            visual, crops, qk, regions, CorrCLIPConfig(num_spatial=2, semantic_branch=False), semantic=torch.zeros(2, 4, 4, 64)
        )
    with pytest.raises(ValueError, match="qk must be"):
        corrclip_window_features(visual, crops, qk[:1], regions, CFG)


def test_a_280_crop_with_patch_16_uses_the_floor_clip_grid(visual) -> None:
    """A window padded to 280 (5 x 56): CLIP /16 sees a 17x17 grid over pixels 0..271, DINO /8 a 35x35 grid."""
    torch.manual_seed(5)
    crops = torch.randn(1, 3, 280, 280)
    qk = F.normalize(torch.randn(1, 35, 35, 16), dim=-1)
    regions = torch.randint(0, 4, (1, 7, 7)).repeat_interleave(40, 1).repeat_interleave(40, 2)
    with torch.no_grad():
        out = corrclip_window_features(visual, crops, qk, regions, CFG)
        # the CLIP part equals the one of the crop cut to 272 = 17 * 16 pixels
        cut = crops[:, :, :272, :272]
        merged = cluster_masks(qk, resize_regions(regions, (35, 35)), CFG)
        tokens_in, grid = clip_ops.embed_tokens(visual, cut)
        semantic = mask_class_tokens(visual, tokens_in, resize_regions(merged, (17, 17)), CFG)
        given = corrclip_window_features(visual, crops, qk, regions, CFG, blocks=_blocks(visual, cut, CFG), semantic=semantic)
    assert grid == (17, 17)
    assert out.shape == (1, 35, 35, 32) and torch.isfinite(out).all()
    assert torch.allclose(out, given, atol=1e-5)
