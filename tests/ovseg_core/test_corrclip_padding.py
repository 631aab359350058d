"""Padded windows: the default equals a literal re-implementation of the CorrCLIPv1 window forward.

The reference (zdk258/CorrCLIP ``corrclip_segmentor.forward_slide`` and the modified open_clip
``VisionTransformer.forward``) pads the mask crop with id 10000 and then treats it as a region:
DBSCAN over the region means of all ids but the smallest (merged ids = cluster + 10000), E from
the outer products of every merged id but the smallest (which is m0), one mask class token per id
on the CLIP grid with the MCTs first in the sequence, and ``expand_masks.T @ mct`` to bring them to
the DINO grid. ``_reference_window`` writes those steps out again, independently of ovseg's step
functions (only the model's own modules are used).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from sklearn.cluster import DBSCAN

from ovseg_core.corrclip import CorrCLIPConfig, cluster_masks, corrclip_window_features, resize_regions

NUM_SPATIAL, TAU, EPS, ALPHA, BETA = 2, 4.0, 0.2, 1.0, 0.5


@pytest.fixture(scope="module")
def visual() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=224, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32).eval()


def _reference_tokens(visual: VisionTransformer, crop: torch.Tensor) -> torch.Tensor:
    """conv1, CLS, positional embedding resized with scale factor (g + 0.1) / 14, ln_pre: (1, 1 + N, D)."""
    x = visual.conv1(crop)
    gh, gw = x.shape[-2:]
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = visual.positional_embedding
    side = math.sqrt(pos.shape[0] - 1)
    grid = pos[1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    return visual.ln_pre(x + pos[None])


def _reference_window(visual: VisionTransformer, crop: torch.Tensor, qk: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One window (batch 1) as CorrCLIPv1 computes it; ``masks`` (1, 1, H, W) padded with 10000."""
    hd, wd = qk.shape[1:3]
    feat_shape = (hd, wd)
    token_size = (crop.shape[-2] // 16, crop.shape[-1] // 16)
    dino = qk.reshape(1, hd * wd, -1)
    similarity = dino[0] @ dino[0].T
    # Mask merging
    masks = F.interpolate(masks.float(), size=feat_shape, mode="nearest").int()[0, 0]
    values = torch.unique(masks)
    if values.shape[0] > 2:
        region_masks = [v == masks for v in values]
        feats = qk[0]
        inst = F.normalize(torch.stack([feats[m].mean(dim=0) for m in region_masks]), dim=1)[1:]
        inst_sim = inst @ inst.T
        cluster = DBSCAN(metric="precomputed", eps=EPS, min_samples=1).fit_predict((inst_sim.max() - inst_sim).numpy())
        for idx, c in enumerate(cluster, start=1):
            if c != -1:
                masks[region_masks[idx]] = int(c) + 10000
    # Scope reconstruction
    flat = masks.reshape(-1)
    region_masks = [v == flat for v in torch.unique(flat)]
    equal = torch.zeros_like(similarity, dtype=torch.bool)
    for m in region_masks[1:]:
        equal |= torch.outer(m, m)
    m0 = region_masks[0]
    equal |= (m0[None, :] | m0[:, None]) & (similarity > similarity.mean())
    attn = (similarity.masked_fill(~equal, float("-inf")) * TAU).softmax(dim=-1)
    # Semantic-branch attention mask: [MCT_1..MCT_K, CLS, patches]
    token_masks = F.interpolate(masks.float()[None, None], size=token_size, mode="nearest").int()[0, 0]
    regions = torch.stack([v == token_masks for v in torch.unique(token_masks)])
    k = regions.shape[0]
    x = _reference_tokens(visual, crop)
    x = torch.cat([x[:, :1].repeat(1, k, 1), x], dim=1)
    allowed = torch.zeros(x.shape[1], x.shape[1], dtype=torch.bool)
    allowed[k:, k:] = True
    allowed[:k, k] = True
    allowed[:k, k + 1 :] = regions.reshape(k, -1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    blocks = visual.transformer.resblocks
    layers = len(blocks)
    spatial = []
    for idx, blk in enumerate(blocks[:-1]):
        x = blk(x, attn_mask=mask)
        if layers - 2 - NUM_SPATIAL <= idx <= layers - 3:
            spatial.append(x[:, k:])
    last = blocks[-1]
    # Main and spatial branches (value only, V bilinear to the DINO grid, A @ V, out_proj)
    both = torch.cat([x[:, k:], torch.stack(spatial).mean(0)], dim=0)
    d = both.shape[-1]
    v = F.linear(last.ln_1(both), last.attn.in_proj_weight[2 * d :], last.attn.in_proj_bias[2 * d :])
    v = v[:, 1:].transpose(1, 2).unflatten(2, token_size)
    v = F.interpolate(v, size=feat_shape, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    both = last.attn.out_proj(torch.bmm(attn.expand(2, -1, -1), v))
    # Semantic branch: the unmodified last block, each DINO patch takes its CLIP cell's MCT
    mct = last(x, attn_mask=mask)[0, :k]
    expand = F.interpolate(regions[:, None].float(), size=feat_shape, mode="nearest").flatten(1)
    semantic = expand.T @ mct
    out = visual.ln_post(both[0]) + ALPHA * visual.ln_post(both[1]) + BETA * visual.ln_post(semantic)
    return (out @ visual.proj).reshape(hd, wd, -1)


def _window(pad_like_region_2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64x40 crop padded (centred, 4 + 4 columns) to 64x48: CLIP 4x3, DINO 8x6.

    DINO column 0 samples padding; CLIP column 0 then samples it too, so real DINO column 1
    receives the padding region's token. With ``pad_like_region_2`` the padding's q+k look like
    region 2's, so DBSCAN merges the two; otherwise padding stays a region of its own.
    """
    torch.manual_seed(3)
    crop = F.pad(torch.randn(1, 3, 64, 40), (4, 4))
    regions = torch.zeros(1, 64, 40, dtype=torch.long)
    regions[:, :32, :20] = 1
    regions[:, 32:, :] = 2
    regions[:, :16, 20:] = 3
    directions = F.normalize(torch.randn(5, 16), dim=-1)
    if pad_like_region_2:
        directions[4] = directions[2]
    dino_ids = F.interpolate(F.pad(regions, (4, 4), value=4)[:, None].float(), size=(8, 6), mode="nearest")[:, 0].long()
    qk = F.normalize(directions[dino_ids] + 0.05 * torch.randn(1, 8, 6, 16), dim=-1)
    return crop, qk, regions


@pytest.mark.parametrize("pad_like_region_2", [True, False])
def test_padded_window_equals_the_reference_forward(visual, pad_like_region_2: bool) -> None:
    crop, qk, regions = _window(pad_like_region_2)
    with torch.no_grad():
        expected = _reference_window(visual, crop, qk, F.pad(regions, (4, 4), value=10000)[:, None])
        got = corrclip_window_features(visual, crop, qk, F.pad(regions, (4, 4), value=-1), CorrCLIPConfig(num_spatial=NUM_SPATIAL))
        ignored = corrclip_window_features(
            visual, crop, qk, F.pad(regions, (4, 4), value=-1), CorrCLIPConfig(num_spatial=NUM_SPATIAL, padding="ignore")
        )
    assert got.shape == (1, 8, 6, 32)
    merged = cluster_masks(qk, resize_regions(F.pad(regions, (4, 4), value=-1), (8, 6)), CorrCLIPConfig())[0]
    assert (merged[0, 0] == merged[-1, 1]) == pad_like_region_2  # padding (col 0) vs region 2 (bottom)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)
    # dropping the padding (the earlier behaviour) changes real patches, not only padded ones
    assert (ignored[0, :, 1:5] - expected[:, 1:5]).abs().max() > 1e-3


def test_unpadded_window_is_the_same_in_both_modes(visual) -> None:
    torch.manual_seed(4)
    crop = torch.randn(1, 3, 64, 48)
    regions = torch.randint(0, 4, (1, 8, 6)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    qk = F.normalize(torch.randn(1, 8, 6, 16), dim=-1)
    with torch.no_grad():
        ref = corrclip_window_features(visual, crop, qk, regions, CorrCLIPConfig(num_spatial=NUM_SPATIAL))
        ign = corrclip_window_features(visual, crop, qk, regions, CorrCLIPConfig(num_spatial=NUM_SPATIAL, padding="ignore"))
        expected = _reference_window(visual, crop, qk, regions[:, None])
    assert torch.equal(ref, ign)
    torch.testing.assert_close(ref[0], expected, rtol=1e-4, atol=1e-5)
