"""Tests for ovseg_core.features.dino: last-block q + k features, positional embeddings, inputs."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ovseg_core.features.clip import normalize_clip
from ovseg_core.features.dino import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dino_grid,
    dino_input_from_clip,
    dino_qk_features,
    normalize_imagenet,
)


def _vit(dynamic: bool = True, reg_tokens: int = 0, img_size: int | tuple[int, int] = 64) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0,
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
def test_timm_option_matches_the_forward_features_computation(size: tuple[int, int]) -> None:
    """pos_interpolation='timm' is the earlier behaviour: timm's forward_features with its resampling."""
    model = _vit()
    torch.manual_seed(1)
    crops = torch.randn(2, 3, *size)
    feats = dino_qk_features(model, crops, pos_interpolation="timm")
    gh, gw = size[0] // 8, size[1] // 8
    assert dino_grid(model, *size) == (gh, gw)
    assert feats.shape == (2, gh, gw, 48) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.reshape(2, gh * gw, 48), _explicit(model, crops), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, gh, gw))


def _reference_pos_embed(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino interpolate_pos_encoding, written out: (g + 0.1) / sqrt(N) scale factors."""
    n = pos_embed.shape[1] - 1
    side = math.sqrt(n)
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(h0), int(w0))
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], dim=1)


@pytest.mark.parametrize("size", [(336, 336), (336, 280)])
def test_default_uses_dinos_positional_interpolation(size: tuple[int, int]) -> None:
    """A 28x28-grid model on 42x42 and 42x35 grids equals a native-size copy holding the reference embedding."""
    model = _vit(img_size=224)  # 28 x 28 training grid
    native = _vit(dynamic=False, img_size=size)
    state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    native.load_state_dict(state, strict=False)
    with torch.no_grad():
        native.pos_embed.copy_(_reference_pos_embed(model.pos_embed, *size, 8))
    torch.manual_seed(2)
    crops = torch.randn(1, 3, *size)
    gh, gw = size[0] // 8, size[1] // 8
    expected = _explicit(native, crops).reshape(1, gh, gw, 48)
    got = dino_qk_features(model, crops)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    # timm's resampling (the earlier default) is measurably different
    timm = dino_qk_features(model, crops, pos_interpolation="timm")
    assert (timm - expected).abs().max() > 1e-3
    # a non-dynamic model works too: the tokens are built outside forward_features
    torch.testing.assert_close(dino_qk_features(_vit(dynamic=False, img_size=224), crops), got)


def test_default_at_the_training_grid_leaves_the_embedding_unchanged() -> None:
    model = _vit()
    crops = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dino_qk_features(model, crops), dino_qk_features(model, crops, "timm"))


def test_register_tokens_are_dropped() -> None:
    model = _vit(reg_tokens=2)
    crops = torch.randn(1, 3, 64, 64)
    feats = dino_qk_features(model, crops, pos_interpolation="timm")
    assert feats.shape == (1, 8, 8, 48)
    torch.testing.assert_close(feats.reshape(1, 64, 48), _explicit(model, crops), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pos_interpolation='timm'"):
        dino_qk_features(model, crops)


def test_dino_input_from_clip_is_the_references_unnormalise_then_normalise() -> None:
    torch.manual_seed(3)
    image = torch.rand(1, 3, 8, 8) * 255
    clip = torch.nn.functional.pad(normalize_clip(image), (0, 0, 2, 2))  # zero-padded CLIP crop
    got = dino_input_from_clip(clip)
    openai_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    openai_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(got, ((clip * openai_std + openai_mean) - imagenet_mean) / imagenet_std)
    # real pixels: the ImageNet normalisation of the image, to the constants' precision
    torch.testing.assert_close(got[..., 2:10, :], normalize_imagenet(image), rtol=0, atol=1e-4)
    # padding: the CLIP mean colour in DINO's input space, not 0
    torch.testing.assert_close(got[0, :, 0, 0], ((openai_mean - imagenet_mean) / imagenet_std).reshape(3))
    assert got[0, :, 0, 0].abs().min() > 5e-3
    with pytest.raises(ValueError, match="CLIP-normalised floats"):
        dino_input_from_clip(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


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
        dino_qk_features(_vit(dynamic=False), torch.randn(1, 3, 80, 64), pos_interpolation="timm")
    with pytest.raises(ValueError, match="pos_interpolation must be one of"):
        dino_qk_features(model, torch.randn(1, 3, 64, 64), pos_interpolation="bilinear")
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


@pytest.mark.parametrize("pos", ["dino", "timm"])
def test_threads_sharing_one_model_each_get_their_own_features(pos: str) -> None:
    """Several local workers of one process share a cached model: every thread's forward runs through every
    registered hook, and each call keeps its own output (it used to see two and raise). Independent expectation:
    the explicit q + k of each thread's own crops, computed alone."""
    model = _vit()
    crops = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [_explicit(model, c).reshape(2, 8, 8, -1) for c in crops]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(25):
                    got[i].append(dino_qk_features(model, crops[i], pos_interpolation=pos))
        except BaseException as e:  # noqa: BLE001 - reported in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        assert len(got[i]) == 25
        for out in got[i]:
            torch.testing.assert_close(out, want[i], rtol=1e-5, atol=1e-6)
    assert len(model.blocks[-1].attn.qkv._forward_hooks) == 0
