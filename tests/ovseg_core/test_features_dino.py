"""Tests for ovseg_core.features.dino: last-block q + k features and ImageNet normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ovseg_core.features.dino import IMAGENET_MEAN, IMAGENET_STD, dino_grid, dino_qk_features, normalize_imagenet


def _vit(dynamic: bool = True, reg_tokens: int = 0) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0,
        dynamic_img_size=dynamic, reg_tokens=reg_tokens,
    ).eval()


def _explicit(model: VisionTransformer, crops: torch.Tensor) -> torch.Tensor:
    """q + k of the last block from its input: norm1, then the attn.qkv weights."""
    captured: list[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model.forward_features(crops)
    finally:
        handle.remove()
    block = model.blocks[-1]
    with torch.no_grad():
        x = block.norm1(captured[0])
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        dim = w.shape[0] // 3
        q = F.linear(x, w[:dim], b[:dim])
        k = F.linear(x, w[dim : 2 * dim], b[dim : 2 * dim])
    return F.normalize(q + k, dim=-1)[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("size", [(64, 64), (80, 48)])
def test_qk_features_match_explicit_computation(size: tuple[int, int]) -> None:
    model = _vit()
    torch.manual_seed(1)
    crops = torch.randn(2, 3, *size)
    feats = dino_qk_features(model, crops)
    gh, gw = size[0] // 8, size[1] // 8
    assert dino_grid(model, *size) == (gh, gw)
    assert feats.shape == (2, gh, gw, 48) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.reshape(2, gh * gw, 48), _explicit(model, crops), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, gh, gw))


def test_register_tokens_are_dropped() -> None:
    model = _vit(reg_tokens=2)
    crops = torch.randn(1, 3, 64, 64)
    feats = dino_qk_features(model, crops)
    assert feats.shape == (1, 8, 8, 48)
    torch.testing.assert_close(feats.reshape(1, 64, 48), _explicit(model, crops), rtol=1e-5, atol=1e-6)


def test_batch_items_are_independent() -> None:
    model = _vit()
    crops = torch.randn(3, 3, 64, 64)
    together = dino_qk_features(model, crops)
    alone = dino_qk_features(model, crops[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)


def test_no_hooks_left_behind() -> None:
    model = _vit()
    qkv = model.blocks[-1].attn.qkv
    crops = torch.randn(1, 3, 64, 64)
    first = dino_qk_features(model, crops)
    second = dino_qk_features(model, crops)
    assert len(qkv._forward_hooks) == 0
    assert torch.equal(first, second)


def test_hook_removed_when_forward_fails() -> None:
    model = _vit()

    def _fail(*_args: object) -> None:
        raise RuntimeError("boom")

    failing = model.blocks[0].register_forward_pre_hook(_fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            dino_qk_features(model, torch.randn(1, 3, 64, 64))
    finally:
        failing.remove()
    assert len(model.blocks[-1].attn.qkv._forward_hooks) == 0


def test_bad_inputs() -> None:
    model = _vit()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dino_qk_features(model, torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the DINO patch size"):
        dino_qk_features(model, torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        dino_qk_features(_vit(dynamic=False), torch.randn(1, 3, 80, 64))
    with pytest.raises(TypeError, match="attn.qkv"):
        dino_qk_features(torch.nn.Linear(2, 2), torch.randn(1, 3, 64, 64))


def test_normalize_imagenet_known_values() -> None:
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    at_mean = normalize_imagenet((mean * 255).expand(2, 3, 3, 3).clone())
    assert at_mean.dtype == torch.float32 and at_mean.shape == (2, 3, 3, 3)
    torch.testing.assert_close(at_mean, torch.zeros(2, 3, 3, 3), rtol=0, atol=1e-5)
    zeros = normalize_imagenet(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    torch.testing.assert_close(zeros, -mean / std)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_imagenet(torch.zeros(1, 1, 4, 4))
