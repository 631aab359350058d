"""Mask class tokens: attention-mask semantics, unchanged main path, per-region dependence."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import VisionTransformer

from ovseg_core import clip_ops
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.mask_class_tokens import (
    compact_region_index,
    mask_class_tokens,
    mask_class_tokens_with_blocks,
    mct_attention_allowed,
)


def _tower(layers: int) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=layers, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()


def test_compact_region_index_per_window() -> None:
    grid = torch.tensor([[[5, 0], [5, -1]], [[2, 2], [9, 4]]])
    local, counts = compact_region_index(grid)
    assert counts.tolist() == [2, 3]
    assert local.tolist() == [[1, 0, 1, -1], [0, 0, 2, 1]]


def test_attention_allowed_known_answer() -> None:
    local = torch.tensor([[0, 1, 0, -1]])  # 4 patches, 2 regions, one padding patch
    allowed = mct_attention_allowed(local, num_mct=3)[0].int()
    # order: CLS, p0..p3, MCT0..MCT2
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0, 0, 0],  # CLS: CLS + patches only
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0, 0],  # MCT0: CLS + p0 + p2, not itself nor other MCTs
            [1, 0, 1, 0, 0, 0, 0, 0],  # MCT1: CLS + p1
            [1, 0, 0, 0, 0, 0, 0, 0],  # padded slot: CLS only
        ]
    )
    assert torch.equal(allowed, expected)


def test_patch_and_cls_outputs_equal_a_plain_forward() -> None:
    visual = _tower(4)
    torch.manual_seed(1)
    tokens_in = torch.randn(2, 1 + 16, 64)
    grid = torch.randint(0, 5, (2, 4, 4))
    grid[1, 0] = -1
    with torch.no_grad():
        _, kept = mask_class_tokens_with_blocks(visual, tokens_in, grid, keep=(1, 2, 3, 4))
        _, plain = clip_ops.run_blocks(visual, tokens_in, 1, 4, keep=(1, 2, 3, 4))
    for i in (1, 2, 3, 4):
        assert torch.allclose(kept[i], plain[i], atol=1e-5)


def _manual_mct(visual: VisionTransformer, tokens_in: torch.Tensor, patch_idx: torch.Tensor) -> torch.Tensor:
    """One-block MCT: query = CLS copy, keys/values = CLS + the region's patches; residual + FFN."""
    block = clip_ops.blocks_of(visual)[0]
    cls = tokens_in[:, :1]
    kv = block.ln_1(torch.cat([cls, tokens_in[:, 1 + patch_idx]], dim=1))
    y = cls + block.attn(block.ln_1(cls), kv, kv, need_weights=False)[0]
    return (y + block.mlp(block.ln_2(y)))[0, 0]


def test_mct_is_the_block_output_over_cls_and_its_region_only() -> None:
    visual = _tower(1)
    torch.manual_seed(2)
    tokens_in = torch.randn(1, 1 + 16, 64)
    grid = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [3, 3, 2, 1], [3, 3, 3, -1]])[None]
    with torch.no_grad():
        semantic = mask_class_tokens(visual, tokens_in, grid, CorrCLIPConfig())
        flat = semantic.reshape(16, 64)
        for rid in range(4):
            idx = torch.nonzero(grid.reshape(-1) == rid)[:, 0]
            expected = _manual_mct(visual, tokens_in, idx)
            assert torch.allclose(flat[idx], expected.expand(len(idx), 64), atol=1e-5)
    assert torch.all(flat[15] == 0)  # padding patch: no MCT


def test_mct_depends_only_on_cls_and_its_region() -> None:
    visual = _tower(1)
    torch.manual_seed(3)
    tokens_in = torch.randn(1, 1 + 16, 64)
    grid = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])[None]
    in_r1 = (grid.reshape(-1) == 1).nonzero()[:, 0]
    with torch.no_grad():
        base = mask_class_tokens(visual, tokens_in, grid, CorrCLIPConfig()).reshape(16, 64)
        outside = tokens_in.clone()
        outside[0, 1 + (grid.reshape(-1) != 1).nonzero()[:, 0]] += torch.randn(12, 64)  # not a constant shift: ln_1 removes those
        moved_out = mask_class_tokens(visual, outside, grid, CorrCLIPConfig()).reshape(16, 64)
        inside = tokens_in.clone()
        inside[0, 1 + in_r1[0]] += torch.randn(64)
        moved_in = mask_class_tokens(visual, inside, grid, CorrCLIPConfig()).reshape(16, 64)
    assert torch.allclose(moved_out[in_r1], base[in_r1], atol=1e-6)
    assert not torch.allclose(moved_out[grid.reshape(-1) == 0], base[grid.reshape(-1) == 0], atol=1e-3)
    assert not torch.allclose(moved_in[in_r1], base[in_r1], atol=1e-3)


def test_batch_with_different_region_counts_equals_single_windows() -> None:
    visual = _tower(3)
    torch.manual_seed(4)
    tokens_in = torch.randn(2, 1 + 16, 64)
    grid = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.arange(16).reshape(4, 4) % 7])
    with torch.no_grad():
        both = mask_class_tokens(visual, tokens_in, grid, CorrCLIPConfig())
        for w in range(2):
            alone = mask_class_tokens(visual, tokens_in[w : w + 1], grid[w : w + 1], CorrCLIPConfig())
            assert torch.allclose(both[w], alone[0], atol=1e-5)


def test_bad_inputs() -> None:
    visual = _tower(1)
    tokens_in = torch.randn(1, 17, 64)
    with pytest.raises(ValueError, match="semantic_branch"):
        mask_class_tokens(visual, tokens_in, torch.zeros(1, 4, 4, dtype=torch.long), CorrCLIPConfig(semantic_branch=False))
    with pytest.raises(ValueError, match="patch tokens"):
        mask_class_tokens(visual, tokens_in, torch.zeros(1, 3, 4, dtype=torch.long), CorrCLIPConfig())
    with pytest.raises(ValueError, match="integer ids"):
        mask_class_tokens(visual, tokens_in, torch.zeros(1, 4, 4), CorrCLIPConfig())
