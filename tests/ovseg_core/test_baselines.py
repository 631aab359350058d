"""Baselines (vanilla CLIP, MaskCLIP, ClearCLIP) on a tiny open_clip ViT."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_core import clip_ops
from ovseg_core.baselines import BASELINE_METHODS, baseline_required_blocks, baseline_window_features
from ovseg_core.features.clip import clip_block_outputs


@pytest.fixture(scope="module")
def visual() -> open_clip.transformer.VisionTransformer:
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=12, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_required_blocks() -> None:
    assert baseline_required_blocks("clip", 12) == ("block:12",)
    assert baseline_required_blocks("maskclip", 12) == ("block:11",)
    assert baseline_required_blocks("clearclip", 24) == ("block:23",)


def test_vanilla_clip_cls_path_agrees_with_open_clip_forward(visual, crops) -> None:
    last = clip_block_outputs(visual, crops, baseline_required_blocks("clip", 12))["block:12"]
    with torch.no_grad():
        pooled = visual(crops)
    torch.testing.assert_close(clip_ops.project(visual, last[:, 0]), pooled, atol=1e-5, rtol=1e-5)
    # and its patch path is the same projection of the same tokens
    feats = baseline_window_features(visual, crops, "clip")
    torch.testing.assert_close(feats.reshape(2, 196, 32), clip_ops.project(visual, last[:, 1:]))


def test_vanilla_clip_patch_tokens_agree_with_open_clip_output_tokens(visual, crops) -> None:
    twin = open_clip.transformer.VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=12, heads=4, mlp_ratio=4.0, output_dim=32, output_tokens=True
    ).eval()
    twin.load_state_dict(visual.state_dict())
    with torch.no_grad():
        _, tokens = twin(crops)
    feats = baseline_window_features(visual, crops, "clip")
    torch.testing.assert_close(feats.reshape(2, 196, 32), tokens @ visual.proj, atol=1e-5, rtol=1e-5)


def test_maskclip_is_the_value_path_of_the_last_block(visual, crops) -> None:
    pen = clip_block_outputs(visual, crops, ["block:11"])["block:11"]
    last = visual.transformer.resblocks[-1]
    w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
    v = F.linear(last.ln_1(pen), w[128:], b[128:])
    expected = visual.ln_post(last.attn.out_proj(v[:, 1:])) @ visual.proj
    torch.testing.assert_close(baseline_window_features(visual, crops, "maskclip").reshape(2, 196, 32), expected)


def test_clearclip_is_query_query_attention_without_residual_or_ffn(visual, crops) -> None:
    pen = clip_block_outputs(visual, crops, ["block:11"])["block:11"]
    last = visual.transformer.resblocks[-1]
    w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
    h = last.ln_1(pen)
    q = F.linear(h, w[:64], b[:64])
    v = F.linear(h, w[128:], b[128:])
    outs = []
    for hd in range(4):
        sl = slice(16 * hd, 16 * (hd + 1))
        a = torch.softmax(q[..., sl] @ q[..., sl].transpose(-1, -2) / 4.0, dim=-1)  # over CLS + patches
        outs.append(a @ v[..., sl])
    expected = visual.ln_post(last.attn.out_proj(torch.cat(outs, -1))[:, 1:]) @ visual.proj
    got = baseline_window_features(visual, crops, "clearclip").reshape(2, 196, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_cached_blocks_give_identical_results(visual, crops, method: str) -> None:
    cached = clip_block_outputs(visual, crops, baseline_required_blocks(method, 12))
    computed = baseline_window_features(visual, crops, method)
    assert computed.shape == (2, 14, 14, 32) and computed.dtype == torch.float32
    assert torch.equal(baseline_window_features(visual, crops, method, blocks=cached), computed)


def test_methods_differ(visual, crops) -> None:
    outs = [baseline_window_features(visual, crops[:1], m) for m in BASELINE_METHODS]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_bad_inputs(visual, crops) -> None:
    with pytest.raises(ValueError, match="unknown baseline method 'sclip'"):
        baseline_window_features(visual, crops, "sclip")
    with pytest.raises(ValueError, match="unknown baseline method"):
        baseline_required_blocks("CLIP", 12)
    with pytest.raises(ValueError, match=r"cached blocks lack \['block:11'\]"):
        baseline_window_features(visual, crops, "maskclip", blocks={"block:12": torch.zeros(2, 197, 64)})
