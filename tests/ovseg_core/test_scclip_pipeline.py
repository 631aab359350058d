"""SC-CLIP per-window entry point on tiny open_clip ViTs (12 blocks so the ViT-B indices apply)."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_core import clip_ops
from ovseg_core.features.clip import clip_block_outputs
from ovseg_core.scclip import SCCLIPConfig, required_blocks, scclip_window_features


def tiny_vit(layers: int = 12, seed: int = 0) -> open_clip.transformer.VisionTransformer:
    torch.manual_seed(seed)
    return open_clip.transformer.VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=layers, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()


@pytest.fixture(scope="module")
def visual() -> open_clip.transformer.VisionTransformer:
    return tiny_vit()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _reference_scclip(visual: torch.nn.Module, crop: torch.Tensor, res_cls: float = 0.3) -> torch.Tensor:
    """The authors' ViT-B forward for one crop, written out step by step (B = 1, loops)."""
    tokens, (gh, gw) = clip_ops.embed_tokens(visual, crop[None])
    blocks = list(visual.transformer.resblocks)
    feats = []
    x = tokens
    for blk in blocks[:-1]:
        x = blk(x)
        feats.append(x[0])
    pen = feats[-1]
    cls, patches = pen[0], pen[1:].clone()
    n = patches.shape[0]
    # LOF (authors): k = 30 squared-Euclidean neighbours, reach-dist with k-dist(i)
    d = ((patches[:, None] - patches[None]) ** 2).sum(-1).double()
    d.fill_diagonal_(float("inf"))
    knn_d, knn_i = d.topk(30, largest=False)
    kdist = knn_d[:, -1:]
    lrd = 30 / torch.maximum(knn_d, kdist).mean(1)
    lof = (lrd[knn_i] / lrd[:, None]).mean(1).float()
    outliers = set(torch.nonzero(lof > torch.quantile(lof, 0.95)).flatten().tolist())

    def repair(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        for i in outliers:
            r, c = divmod(i, gw)
            nbrs = [
                rr * gw + cc
                for rr in range(r - 1, r + 2)
                for cc in range(c - 1, c + 2)
                if (rr, cc) != (r, c) and 0 <= rr < gh and 0 <= cc < gw and rr * gw + cc not in outliers
            ]
            if nbrs:
                out[i] = t[nbrs].mean(0)
        return out

    def cos(t: torch.Tensor) -> torch.Tensor:
        t = t / t.norm(dim=-1, keepdim=True)
        return t @ t.T

    def adjust(t: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        w = sim.clone()
        w[w < 0.4] = 0
        return (w / (w.sum(-1, keepdim=True) + 1e-6)) @ t

    last = blocks[-1]
    heads, dim = last.attn.num_heads, patches.shape[-1]

    def custom_attn(t: torch.Tensor, c: torch.Tensor, mid_sim: torch.Tensor) -> torch.Tensor:
        h = last.ln_1(t)
        _, k, v = F.linear(h, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        m = (mid_sim - mid_sim.mean()) * 3.0
        m[m < 0] = float("-inf")
        outs = []
        for hd in range(heads):
            sl = slice(hd * dim // heads, (hd + 1) * dim // heads)
            kh, vh = k[:, sl], v[:, sl]
            a = (torch.softmax(m, -1) + torch.softmax(kh @ kh.T * (dim // heads) ** -0.5, -1)) / 2
            outs.append(a @ vh)
        return last.attn.out_proj(torch.cat(outs, -1)) + res_cls * c

    x = repair(patches)
    mid_sim = cos(repair(feats[8][1:]))
    x = adjust(x, mid_sim)
    x = custom_attn(x, cls, mid_sim)
    post_sim = cos(feats[3][1:])
    x = adjust(x, post_sim)
    r = feats[3].clone()
    for i in range(4, 10):
        r = r + feats[i]
    r = adjust(custom_attn(r[1:], r[0], mid_sim), post_sim)
    x = x + r
    out = visual.ln_post(x) @ visual.proj
    return out.reshape(gh, gw, -1)


@pytest.mark.slow
def test_matches_a_step_by_step_reference_of_the_authors_forward(visual, crops) -> None:
    with torch.no_grad():
        ref = torch.stack([_reference_scclip(visual, c) for c in crops])
    out = scclip_window_features(visual, crops, SCCLIPConfig())
    assert out.shape == (2, 14, 14, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_cached_blocks_give_identical_results(visual, crops) -> None:
    for cfg in (SCCLIPConfig(), SCCLIPConfig(multi_level_fusion=False, detector="l2norm_topk")):
        names = required_blocks(cfg, 12)
        cached = clip_block_outputs(visual, crops, names)
        computed = scclip_window_features(visual, crops, cfg)
        assert torch.equal(scclip_window_features(visual, crops, cfg, blocks=cached), computed)
        # extra cached names are ignored
        cached_more = {**cached, **clip_block_outputs(visual, crops, ["block:2"])}
        assert torch.equal(scclip_window_features(visual, crops, cfg, blocks=cached_more), computed)


def test_batch_equals_single_crops(visual, crops) -> None:
    both = scclip_window_features(visual, crops, SCCLIPConfig())
    for b in range(2):
        torch.testing.assert_close(both[b : b + 1], scclip_window_features(visual, crops[b : b + 1], SCCLIPConfig()))


def test_every_component_changes_the_output(visual, crops) -> None:
    base = scclip_window_features(visual, crops[:1], SCCLIPConfig())
    for field in ("anomaly_repair", "self_adjusting", "attention_enhancement", "multi_level_fusion"):
        off = scclip_window_features(visual, crops[:1], dataclasses.replace(SCCLIPConfig(), **{field: False}))
        assert not torch.allclose(off, base, atol=1e-4), field


def test_all_components_off_is_key_key_attention_plus_cls(visual, crops) -> None:
    cfg = SCCLIPConfig(anomaly_repair=False, self_adjusting=False, attention_enhancement=False, multi_level_fusion=False)
    out = scclip_window_features(visual, crops, cfg)
    pen = clip_block_outputs(visual, crops, ["block:11"])["block:11"]
    last = visual.transformer.resblocks[-1]
    _, k, v = clip_ops.qkv(last, last.ln_1(pen[:, 1:]))
    a = torch.softmax(k @ k.transpose(-1, -2) / 4.0, -1)  # d_head = 16
    x = clip_ops.out_proj(last, clip_ops.merge_heads(a @ v)) + 0.3 * pen[:, :1]
    torch.testing.assert_close(out, clip_ops.project(visual, x).reshape(2, 14, 14, 32))


def test_vit_l_depth_uses_the_vit_l_preset() -> None:
    visual = tiny_vit(layers=24)
    crop = torch.randn(1, 3, 224, 224)
    out = scclip_window_features(visual, crop, SCCLIPConfig())
    explicit = SCCLIPConfig(pre_adjust_block=17, post_adjust_block=7, fusion_blocks=(9, 20), res_cls=0.1)
    torch.testing.assert_close(out, scclip_window_features(visual, crop, explicit))
    assert not torch.allclose(out, scclip_window_features(visual, crop, dataclasses.replace(explicit, res_cls=0.3)))


def test_non_square_crop(visual) -> None:
    out = scclip_window_features(visual, torch.randn(1, 3, 224, 160), SCCLIPConfig())
    assert out.shape == (1, 14, 10, 32) and torch.isfinite(out).all()


def test_bad_cached_blocks_are_rejected(visual, crops) -> None:
    cached = clip_block_outputs(visual, crops, ["block:4", "block:9", "block:11"])
    with pytest.raises(ValueError, match=r"cached blocks lack \['sum:4-10'\]"):
        scclip_window_features(visual, crops, SCCLIPConfig(), blocks=cached)
    wrong = {**cached, "sum:4-10": cached["block:4"][:1]}
    with pytest.raises(ValueError, match="cached block 'sum:4-10' has shape"):
        scclip_window_features(visual, crops, SCCLIPConfig(), blocks=wrong)
    with pytest.raises(ValueError, match=r"crops must be \(B, 3, H, W\)"):
        scclip_window_features(visual, crops[0], SCCLIPConfig())
