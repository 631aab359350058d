"""Feature refinement: value-only main/spatial branches, semantic upsampling, fusion weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.feature_refinement import feature_refinement, value_branch

D = 64


@pytest.fixture(scope="module")
def visual() -> VisionTransformer:
    torch.manual_seed(0)
    v = VisionTransformer(image_size=224, patch_size=16, width=D, layers=4, heads=4, mlp_ratio=4.0, output_dim=32).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        v.ln_post.weight.uniform_(0.5, 1.5)
        v.ln_post.bias.normal_()
        v.transformer.resblocks[-1].ln_1.bias.normal_()
    return v


def _manual_main(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """out_proj(V) with V from the last block's in_proj rows [2D:3D], identity attention, CLS dropped."""
    block = visual.transformer.resblocks[-1]
    w, b = block.attn.in_proj_weight[2 * D :], block.attn.in_proj_bias[2 * D :]
    v = F.linear(block.ln_1(tokens), w, b)[:, 1:]
    return block.attn.out_proj(v)


def test_main_branch_known_answer_with_identity_attention(visual: VisionTransformer) -> None:
    torch.manual_seed(1)
    penult = torch.randn(2, 1 + 9, D)
    eye = torch.eye(9).expand(2, 9, 9)
    cfg = CorrCLIPConfig(spatial_branch=False, semantic_branch=False)
    with torch.no_grad():
        out = feature_refinement(visual, penult, None, None, eye, (3, 3), (3, 3), cfg)
        expected = visual.ln_post(_manual_main(visual, penult)) @ visual.proj
    assert out.shape == (2, 3, 3, 32)
    assert torch.allclose(out.reshape(2, 9, 32), expected, atol=1e-5)


def test_value_is_bilinearly_upsampled_before_attention(visual: VisionTransformer) -> None:
    torch.manual_seed(2)
    penult = torch.randn(1, 1 + 4, D)
    eye = torch.eye(16)[None]
    with torch.no_grad():
        out = value_branch(visual, penult, eye, (2, 2), (4, 4))
        block = visual.transformer.resblocks[-1]
        v = F.linear(block.ln_1(penult), block.attn.in_proj_weight[2 * D :], block.attn.in_proj_bias[2 * D :])[:, 1:]
        v = F.interpolate(v.transpose(1, 2).reshape(1, D, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
        expected = block.attn.out_proj(v.flatten(2).transpose(1, 2))
        # attention averages values: uniform A gives the mean upsampled value everywhere
        uniform = value_branch(visual, penult, torch.full((1, 16, 16), 1 / 16), (2, 2), (4, 4))
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(uniform, expected.mean(1, keepdim=True).expand(1, 16, D), atol=1e-5)


def test_fusion_applies_ln_post_per_branch_with_alpha_and_beta(visual: VisionTransformer) -> None:
    torch.manual_seed(3)
    penult, spatial = torch.randn(1, 1 + 4, D), torch.randn(1, 1 + 4, D)
    semantic = torch.randn(1, 2, 2, D)
    attn = torch.softmax(torch.randn(1, 16, 16), -1)
    cfg = CorrCLIPConfig(alpha=0.7, beta=0.3)
    with torch.no_grad():
        out = feature_refinement(visual, penult, spatial, semantic, attn, (2, 2), (4, 4), cfg)
        main = visual.ln_post(value_branch(visual, penult, attn, (2, 2), (4, 4)))
        spat = visual.ln_post(value_branch(visual, spatial, attn, (2, 2), (4, 4)))
        # nearest 2x upsampling: DINO patch (i, j) takes CLIP patch (i // 2, j // 2)
        sem = semantic[0].repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, 16, D)
        expected = (main + 0.7 * spat + 0.3 * visual.ln_post(sem)) @ visual.proj
    assert torch.allclose(out.reshape(1, 16, 32), expected, atol=1e-5)


def test_zero_semantic_tokens_contribute_nothing(visual: VisionTransformer) -> None:
    torch.manual_seed(4)
    penult = torch.randn(1, 1 + 4, D)
    attn = torch.eye(4)[None]
    semantic = torch.randn(1, 2, 2, D)
    semantic[0, 1, 1] = 0
    with torch.no_grad():
        with_sem = feature_refinement(visual, penult, None, semantic, attn, (2, 2), (2, 2), CorrCLIPConfig(spatial_branch=False))
        without = feature_refinement(
            visual, penult, None, None, attn, (2, 2), (2, 2), CorrCLIPConfig(spatial_branch=False, semantic_branch=False)
        )
    assert torch.allclose(with_sem[0, 1, 1], without[0, 1, 1], atol=1e-6)
    assert not torch.allclose(with_sem[0, 0, 0], without[0, 0, 0], atol=1e-3)


def test_bad_inputs(visual: VisionTransformer) -> None:
    penult = torch.randn(1, 5, D)
    attn = torch.eye(4)[None]
    cfg = CorrCLIPConfig()
    with pytest.raises(ValueError, match="spatial_in must be given"):
        feature_refinement(visual, penult, None, torch.zeros(1, 2, 2, D), attn, (2, 2), (2, 2), cfg)
    with pytest.raises(ValueError, match="semantic must be given"):
        feature_refinement(visual, penult, penult, None, attn, (2, 2), (2, 2), cfg)
    with pytest.raises(ValueError, match="A must be"):
        feature_refinement(visual, penult, penult, torch.zeros(1, 2, 2, D), torch.eye(3)[None], (2, 2), (2, 2), cfg)
    with pytest.raises(ValueError, match="penult"):
        feature_refinement(visual, torch.randn(1, 4, D), penult, torch.zeros(1, 2, 2, D), attn, (2, 2), (2, 2), cfg)
