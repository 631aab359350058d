"""Algorithmic sanity: with correct region masks, scope + value reconstruction denoise CLIP-like features.

Synthetic setting at the level of the step functions (no trained network): a ground-truth
label map on a 24x24 grid; CLIP-like value features = class direction + strong noise; DINO-like
q+k features = (other) class direction + noise; SAM-like regions = an over-segmentation
of the ground truth with some unsegmented blocks. The plain per-patch baseline classifies the
noisy values directly; CorrCLIP classifies ``A @ V``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.corrclip import CorrCLIPConfig, cluster_masks, scope_reconstruction, similarity, value_reconstruction

K, SIDE, BLOCK = 4, 24, 6
# Noise std per channel: CLIP values (32 channels, unit class signal), DINO q+k (16 channels).
CLIP_NOISE, DINO_NOISE = 0.6, 0.5


def _miou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    ious = []
    for c in range(K):
        inter = ((pred == c) & (gt == c)).sum().item()
        union = ((pred == c) | (gt == c)).sum().item()
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


def _scene(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coarse = SIDE // BLOCK
    gt = torch.randint(0, K, (coarse, coarse), generator=g).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    # regions: every block split into a top and a bottom half; a quarter of the blocks unsegmented
    block_id = torch.arange(coarse * coarse).reshape(coarse, coarse).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    half = (torch.arange(SIDE) % BLOCK >= BLOCK // 2).long()[:, None].expand(SIDE, SIDE)
    regions = 1 + 2 * block_id + half
    unsegmented = torch.rand(coarse * coarse, generator=g) < 0.25
    regions[unsegmented[block_id]] = 0
    text = F.normalize(torch.randn(K, 32, generator=g), dim=-1)
    values = text[gt] + CLIP_NOISE * torch.randn(SIDE, SIDE, 32, generator=g)
    dino = F.normalize(torch.randn(K, 16, generator=g), dim=-1)
    qk = F.normalize(dino[gt] + DINO_NOISE * torch.randn(SIDE, SIDE, 16, generator=g), dim=-1)
    return gt, regions[None], text, values.reshape(1, -1, 32), qk[None]


def _predict(
    cfg: CorrCLIPConfig, regions: torch.Tensor, text: torch.Tensor, values: torch.Tensor, qk: torch.Tensor
) -> torch.Tensor:
    merged = cluster_masks(qk, regions, cfg)
    s = similarity(qk)
    attn = value_reconstruction(s, scope_reconstruction(s, merged.reshape(1, -1), cfg), cfg)
    return ((attn @ values) @ text.T).argmax(-1).reshape(SIDE, SIDE)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_scope_and_value_reconstruction_raise_miou_over_the_baseline(seed: int) -> None:
    gt, regions, text, values, qk = _scene(seed)
    baseline = _miou((values @ text.T).argmax(-1).reshape(SIDE, SIDE), gt)
    no_scope = _miou(_predict(CorrCLIPConfig(scope_reconstruction=False), regions, text, values, qk), gt)
    scope_only = _miou(_predict(CorrCLIPConfig(value_reconstruction=False), regions, text, values, qk), gt)
    scope_value = _miou(_predict(CorrCLIPConfig(), regions, text, values, qk), gt)
    assert baseline < 0.65  # the noise really hurts per-patch classification
    assert scope_only > baseline + 0.1
    assert scope_value > baseline + 0.2
    assert scope_value >= scope_only
    # noisy DINO similarity alone (no scope) is not enough: the regions are what helps
    assert scope_value > no_scope + 0.1
