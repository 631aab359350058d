"""SC-CLIP multi-level fusion: the two-pass sum."""

from __future__ import annotations

import open_clip
import pytest
import torch

from ovseg_core.scclip.multi_level_fusion import multi_level_fusion
from ovseg_core.scclip.self_adjusting import aggregation_weights, cosine_similarity, self_adjusted_attention


@pytest.fixture(scope="module")
def block() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.transformer.ResidualAttentionBlock(16, 4).eval()


def test_fusion_adds_the_second_pass_to_the_first(block: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    outputs = [torch.randn(2, 1 + 9, 16, generator=g) for _ in range(7)]  # blocks 4..10
    level_sum = torch.stack(outputs).sum(0)
    x = torch.randn(2, 9, 16, generator=g)
    sim = cosine_similarity(torch.randn(2, 9, 8, generator=g))
    w_post = aggregation_weights(cosine_similarity(torch.randn(2, 9, 4, generator=g)), 0.4, 1e-6)
    out = multi_level_fusion(x, level_sum, block, sim, w_post, 3.0, 0.3)
    second = self_adjusted_attention(block, level_sum[:, 1:], level_sum[:, 0], sim, 3.0, 0.3)
    torch.testing.assert_close(out, x + w_post @ second)
    # the CLS of the *sum* enters with weight res_cls: changing it shifts the output by W' @ (0.3 * delta)
    shifted = level_sum.clone()
    shifted[:, 0] += 1.0
    delta = multi_level_fusion(x, shifted, block, sim, w_post, 3.0, 0.3) - out
    torch.testing.assert_close(delta, w_post @ torch.full((2, 9, 16), 0.3), atol=1e-5, rtol=1e-5)


def test_fusion_without_aggregation_or_enhancement(block: torch.nn.Module) -> None:
    level_sum, x = torch.randn(1, 5, 16), torch.randn(1, 4, 16)
    out = multi_level_fusion(x, level_sum, block, None, None, 3.0, 0.1)
    torch.testing.assert_close(out, x + self_adjusted_attention(block, level_sum[:, 1:], level_sum[:, 0], None, 3.0, 0.1))


def test_shape_mismatch_is_rejected(block: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"level_sum must be \(B, 1 \+ N, D\)"):
        multi_level_fusion(torch.randn(1, 4, 16), torch.randn(1, 4, 16), block, None, None, 3.0, 0.3)
