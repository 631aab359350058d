"""SC-CLIP self-adjusting: attention enhancement and feature aggregation."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_core.scclip import SCCLIPConfig, detect_anomalies, repair_anomalies
from ovseg_core.scclip.self_adjusting import (
    aggregate,
    aggregation_weights,
    cosine_similarity,
    enhanced_attention,
    self_adjusted_attention,
)


def test_enhanced_attention_known_answer_with_zero_keys() -> None:
    sim = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean 0.5 -> M = 3 * [[.5, -.5], [-.5, .5]] -> off-diagonal -inf
    k = torch.zeros(1, 1, 2, 4)  # key-key attention uniform
    expected = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    torch.testing.assert_close(enhanced_attention(k, sim, 3.0)[0, 0], expected)


def test_enhanced_attention_known_answer_with_keys_and_heads() -> None:
    sim = torch.tensor([[[1.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # mean 4.2 / 9
    k = torch.zeros(1, 2, 3, 1)
    k[0, 0, 0, 0] = 1.0  # head 0: K K^T = e_00, dh = 1
    attn = enhanced_attention(k, sim, 3.0)
    mean = 4.2 / 9
    m_row0 = torch.tensor([3 * (1 - mean), 3 * (0.6 - mean)])  # third entry negative -> -inf
    sm0 = torch.softmax(m_row0, 0)
    kk_row0 = torch.tensor([math.e, 1.0, 1.0]) / (math.e + 2)
    expected_row0 = 0.5 * (torch.cat([sm0, torch.zeros(1)]) + kk_row0)
    torch.testing.assert_close(attn[0, 0, 0], expected_row0)
    torch.testing.assert_close(attn[0, 1, 0], 0.5 * (torch.cat([sm0, torch.zeros(1)]) + 1 / 3))  # head 1: uniform keys
    torch.testing.assert_close(attn[0, 0, 2], 0.5 * (torch.tensor([0.0, 0.0, 1.0]) + 1 / 3))
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 3))


def test_enhancement_off_is_plain_key_key_softmax() -> None:
    k = torch.randn(2, 3, 5, 4)
    expected = torch.softmax(k @ k.transpose(-2, -1) / 2.0, dim=-1)
    torch.testing.assert_close(enhanced_attention(k, None, 3.0), expected)


def test_aggregation_weights_threshold_and_row_normalisation() -> None:
    sim = torch.tensor([[[1.0, 0.5, 0.3], [0.5, 1.0, -0.2], [0.3, -0.2, 1.0]]])
    w = aggregation_weights(sim, 0.4, 1e-6)
    expected = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = expected / (expected.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(w[0], expected)
    x = torch.tensor([[[3.0], [6.0], [9.0]]])
    torch.testing.assert_close(aggregate(x, w), w @ x)
    assert aggregate(x, w)[0, 0, 0] == pytest.approx((3 + 0.5 * 6) / 1.5, rel=1e-5)


def test_cosine_similarity() -> None:
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    torch.testing.assert_close(cosine_similarity(x)[0], torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_self_adjusted_attention_uses_the_blocks_own_weights() -> None:
    torch.manual_seed(0)
    block = open_clip.transformer.ResidualAttentionBlock(16, 4).eval()
    x, cls = torch.randn(2, 6, 16), torch.randn(2, 16)
    sim = cosine_similarity(torch.randn(2, 6, 8))
    out = self_adjusted_attention(block, x, cls, sim, 3.0, 0.3)
    # reference through nn.MultiheadAttention's separate projections
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    h = block.ln_1(x)
    k = F.linear(h, w[16:32], b[16:32]).reshape(2, 6, 4, 4).transpose(1, 2)
    v = F.linear(h, w[32:], b[32:]).reshape(2, 6, 4, 4).transpose(1, 2)
    m = 3.0 * (sim - sim.mean(dim=(1, 2), keepdim=True))
    m[m < 0] = float("-inf")
    a = 0.5 * (torch.softmax(m, -1)[:, None] + torch.softmax(k @ k.transpose(-1, -2) / 2.0, -1))
    ref = block.attn.out_proj((a @ v).transpose(1, 2).reshape(2, 6, 16)) + 0.3 * cls[:, None]
    torch.testing.assert_close(out, ref)


def test_repair_stops_planted_high_norm_tokens_dominating_attention() -> None:
    """The paper's motivating effect: anomaly tokens attract the attention of every other token."""
    g = torch.Generator().manual_seed(0)
    n, d = 196, 32
    shared = torch.randn(d, generator=g)
    shared = shared / shared.norm()
    x = torch.randn(1, n, d, generator=g) * 0.3 + shared  # tokens share a weak common direction
    planted = [17, 88, 150]
    x[0, planted] = 40.0 * shared + 0.3 * torch.randn(3, d, generator=g)  # high-norm artefacts along it
    others = torch.ones(n, dtype=torch.bool)
    others[planted] = False

    def mass_on_planted(tokens: torch.Tensor) -> float:
        attn = enhanced_attention(tokens[:, None], None, 3.0)[0, 0]  # key-key attention, K = tokens
        return attn[others][:, planted].sum(-1).mean().item()

    before = mass_on_planted(x)
    anomalies = detect_anomalies(x, SCCLIPConfig())
    assert anomalies[0, planted].all()
    after = mass_on_planted(repair_anomalies(x, anomalies, (14, 14)))
    assert before > 0.5  # three tokens out of 196 take most of the attention
    assert after < 5 * len(planted) / n  # after repair they get about their uniform share
