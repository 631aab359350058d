"""Tests for ovseg_core.features.clip: aggregate names, one-pass block outputs, CLIP normalisation."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import VisionTransformer

from ovseg_core import clip_ops
from ovseg_core.features.clip import (
    CLIP_MEAN,
    CLIP_STD,
    Aggregate,
    clip_block_outputs,
    normalize_clip,
    parse_aggregate,
)


@pytest.fixture(scope="module")
def visual() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()


def test_parse_aggregate_names() -> None:
    assert parse_aggregate("block:3") == Aggregate("block", 3, 3)
    assert parse_aggregate("block:0", num_blocks=4) == Aggregate("block", 0, 0)
    assert parse_aggregate("mean:6-10") == Aggregate("mean", 6, 10)
    assert parse_aggregate("sum:4-10", num_blocks=12).blocks == range(4, 11)
    assert parse_aggregate("sum:2-2").name == "sum:2-2"
    assert parse_aggregate("mean:6-10").name == "mean:6-10"


@pytest.mark.parametrize("name", ["block", "block:", "block:-1", "blk:2", "mean:3", "sum:1-", "mean:a-b", "max:1-2", ""])
def test_parse_aggregate_rejects_malformed(name: str) -> None:
    with pytest.raises(ValueError, match="bad aggregate name"):
        parse_aggregate(name)


def test_parse_aggregate_rejects_reversed_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="start 5 > stop 3"):
        parse_aggregate("mean:5-3")
    with pytest.raises(ValueError, match="needs block 5 but the tower has blocks 0..4"):
        parse_aggregate("block:5", num_blocks=4)
    with pytest.raises(ValueError, match="needs block 13"):
        parse_aggregate("sum:4-13", num_blocks=12)
    with pytest.raises(ValueError, match="Aggregate.kind"):
        Aggregate("max", 1, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start == stop"):
        Aggregate("block", 1, 2)


def test_final_block_through_project_equals_open_clip_forward(visual: VisionTransformer) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    out = clip_block_outputs(visual, x, ["block:4"])["block:4"]
    assert out.shape == (2, 1 + 14 * 14, 64) and out.dtype == torch.float32
    with torch.no_grad():
        expected = visual(x)
    assert torch.equal(clip_ops.project(visual, out[:, 0]), expected)


def test_aggregates_equal_explicit_computation(visual: VisionTransformer) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 3, 160, 128)  # non-square, non-native grid: 10 x 8 tokens
    names = ["block:0", "block:2", "mean:1-3", "sum:2-4", "mean:0-1"]
    got = clip_block_outputs(visual, x, names)
    assert list(got) == names
    with torch.no_grad():
        tokens, grid = clip_ops.embed_tokens(visual, x)
        assert grid == (10, 8)
        outs = [tokens]
        for block in clip_ops.blocks_of(visual):
            outs.append(block(outs[-1]))
    assert torch.equal(got["block:0"], outs[0])
    assert torch.equal(got["block:2"], outs[2])
    torch.testing.assert_close(got["mean:1-3"], (outs[1] + outs[2] + outs[3]) / 3)
    torch.testing.assert_close(got["sum:2-4"], outs[2] + outs[3] + outs[4])
    torch.testing.assert_close(got["mean:0-1"], (outs[0] + outs[1]) / 2)
    for value in got.values():
        assert value.shape == (3, 1 + 80, 64)


def test_stops_after_last_needed_block(visual: VisionTransformer) -> None:
    calls: list[int] = []
    handles = [
        block.register_forward_hook(lambda *_args, i=i: calls.append(i))
        for i, block in enumerate(clip_ops.blocks_of(visual), start=1)
    ]
    try:
        clip_block_outputs(visual, torch.randn(1, 3, 64, 64), ["block:1", "mean:1-2"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1, 2]


def test_block_outputs_bad_inputs(visual: VisionTransformer) -> None:
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="at least one aggregate"):
        clip_block_outputs(visual, x, [])
    with pytest.raises(ValueError, match="needs block 5"):
        clip_block_outputs(visual, x, ["block:5"])
    with pytest.raises(ValueError, match="smaller than the patch size"):
        clip_block_outputs(visual, torch.randn(1, 3, 8, 64), ["block:1"])


def test_sides_not_a_multiple_of_the_patch_drop_the_remainder(visual: VisionTransformer) -> None:
    """As the references' patch convolution: a 70-pixel side with patch 16 gives 4 tokens over pixels 0..63."""
    torch.manual_seed(4)
    x = torch.randn(1, 3, 70, 64)
    got = clip_block_outputs(visual, x, ["block:0", "block:2"])
    cut = clip_block_outputs(visual, x[:, :, :64], ["block:0", "block:2"])
    assert got["block:0"].shape == (1, 1 + 4 * 4, 64)
    for name in got:
        torch.testing.assert_close(got[name], cut[name])


def test_normalize_clip_known_values() -> None:
    mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    at_mean = normalize_clip(mean.expand(2, 3, 4, 5).clone())
    assert at_mean.dtype == torch.float32 and at_mean.shape == (2, 3, 4, 5)
    torch.testing.assert_close(at_mean, torch.zeros(2, 3, 4, 5))
    one_std_up = normalize_clip((mean + std).expand(1, 3, 2, 2).clone())
    torch.testing.assert_close(one_std_up, torch.ones(1, 3, 2, 2))
    u8 = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    expected = (255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(normalize_clip(u8).reshape(3), expected)
    assert CLIP_MEAN == (122.771, 116.746, 104.094) and CLIP_STD == (68.501, 66.632, 70.323)


def test_normalize_clip_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_clip(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_clip(torch.zeros(2, 2))
