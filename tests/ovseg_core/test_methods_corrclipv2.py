"""Method ``corrclipv2``: registry entry, config builder, and its window features end to end on tiny
random models (a VFM dense map -> correlation -> CorrCLIP branches) against the reference formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ovseg_core import clip_ops
from ovseg_core.backbones import load_backbone
from ovseg_core.corrclip import CorrCLIPConfig, cluster_masks, vfm_window_features
from ovseg_core.features.clip import clip_block_outputs, normalize_clip
from ovseg_core.features.vfm import vfm_dense_features
from ovseg_core.methods import CORRCLIPV2_MODELS, METHODS, WindowInputs, get_method
from ovseg_core.windows import crop_window_labels, crop_windows, plan_windows, resize_image

TAU = 4.0  # the reference's TAU
PAD_ID = 10000  # the reference pads mask crops with 10000


def test_registry_entry():
    m = get_method("corrclipv2")
    assert m is METHODS["corrclipv2"]
    assert (m.family, m.uses_regions, m.correlation) == ("corrclipv2", True, "vfm")
    assert dict(m.default_models) == dict(CORRCLIPV2_MODELS) == {
        "clip": "clip:ViT-L-14-quickgelu@metaclip_fullcc", "vfm": "vfm:radiov3_l"}
    assert get_method("corrclip").correlation == "dino_qk"
    cfg = m.build({}, 24)
    assert cfg == CorrCLIPConfig(mask_clustering=False, similarity="vfm")  # everything else v1's defaults
    assert m.required_blocks(cfg, 24) == ("block:23", "mean:11-22")  # ViT-L: NUM_SPATIAL 12
    assert m.required_blocks(cfg, 12) == ("block:11", "mean:6-10")
    assert m.semantic_branch(cfg) and m.map_correction(cfg)


def test_no_clustering_stage_and_reconstruction_keeps_the_relabel_fields():
    m = get_method("corrclipv2")
    cfg = m.build({"m0_quirk": False, "map_correction": False}, 12)
    assert m.clustering_config(cfg) is None
    rec = m.reconstruction_config(cfg)
    # the v2 reconstruction relabels regions itself: clustering fields and m0_quirk stay, map correction resets
    assert (rec.mask_clustering, rec.m0_quirk, rec.map_correction) == (False, False, True)
    # v1 resets them (they act through its mask_clustering stage)
    v1 = get_method("corrclip")
    assert v1.reconstruction_config(v1.build({"mask_clustering": False}, 12)).mask_clustering is True


def test_builder_errors():
    m = get_method("corrclipv2")
    with pytest.raises(ValueError, match="similarity must be 'vfm'"):
        m.build({"similarity": "dino_qk"}, 12)
    with pytest.raises(ValueError, match="unknown key 'tua' \\(did you mean 'tau'\\?\\)"):
        m.build({"tua": 2.0}, 12)
    with pytest.raises(ValueError, match="corrclipv2 params: tau must be a finite number > 0"):
        m.build({"tau": -1.0}, 12)
    assert m.build({"mask_clustering": True}, 12).mask_clustering  # DBSCAN on the VFM features: an option


@pytest.fixture(scope="module")
def scene():
    """A real-architecture chain: tiny C-RADIOv3 map of an image, its window plan, CLIP crops, regions."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=gen)
    vfm = load_backbone("vfm:tiny_radiov3@random:1")
    clip = load_backbone("clip:tiny@random:2")
    vfm_map = vfm_dense_features(vfm.model, "radio", vfm.patch_size, image)
    plan = plan_windows((90, 120), 100, 100, 50, pad_multiple=56)  # 100 x 133, two 100-px windows padded to 112
    crops = crop_windows(normalize_clip(resize_image(image, plan.resized_hw)), plan)
    regions = torch.zeros(plan.resized_hw, dtype=torch.int64)
    regions[:, 60:] = 3
    regions[40:, :30] = 5
    regions[70:, 90:] = 7
    return vfm_map, plan, crops, regions, clip.model.visual


def _reference_main_spatial(visual, crops, vfm_map, plan, regions):
    """The reference forward without the semantic branch, written from CorrCLIPv2's code facts."""
    p = clip_ops.patch_size(visual)
    hp, wp = plan.padded_hw
    gh, gw = hp // p, wp // p
    grid = (2 * gh, 2 * gw)
    # VFM correlation: dense full-resolution map, normalised, cropped, replicate-padded, resized, normalised
    big = F.normalize(F.interpolate(vfm_map[None], size=plan.resized_hw, mode="bilinear"), dim=1)
    blocks = clip_block_outputs(visual, crops, ["block:11", "mean:6-10"])
    last = clip_ops.blocks_of(visual)[-1]
    d = last.attn.embed_dim
    w_v, b_v = last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:]
    out = []
    for i, win in enumerate(plan.windows):
        top, bottom, left, right = win.pad
        crop = F.pad(big[:, :, win.y1:win.y2, win.x1:win.x2], (left, right, top, bottom), mode="replicate")
        feats = F.normalize(F.interpolate(crop, size=grid, mode="bilinear").flatten(2)[0].T, dim=-1)
        s = feats @ feats.T
        # regions: mask crop padded with 10000, nearest to the grid; the smallest id is m0
        mask = F.pad(regions[win.y1:win.y2, win.x1:win.x2][None, None].float(), (left, right, top, bottom),
                     value=PAD_ID)
        r = F.interpolate(mask, size=grid, mode="nearest").flatten().long()
        m0 = r == r.min()
        e = ((r[:, None] == r[None, :]) & ~m0[:, None]) | ((m0[:, None] | m0[None, :]) & (s > s.mean()))
        a = (TAU * s).masked_fill(~e, float("-inf")).softmax(-1)

        def branch(tokens: torch.Tensor) -> torch.Tensor:
            v = F.linear(last.ln_1(tokens), w_v, b_v)[1:]  # CLS dropped
            v = F.interpolate(v.T.reshape(1, d, gh, gw), size=grid, mode="bilinear", align_corners=False)
            return visual.ln_post(last.attn.out_proj(a @ v.flatten(2)[0].T))

        fused = branch(blocks["block:11"][i]) + 1.0 * branch(blocks["mean:6-10"][i])
        out.append((fused @ visual.proj).reshape(*grid, -1))
    return torch.stack(out)


def test_window_features_equal_the_reference_formula(scene):
    vfm_map, plan, crops, regions, visual = scene
    m = get_method("corrclipv2")
    cfg = m.build({"semantic_branch": False}, 12)
    inputs = WindowInputs(vfm=vfm_window_features(vfm_map, plan, 16), regions=crop_window_labels(regions, plan))
    with torch.no_grad():
        got = m.window_features(visual, crops, cfg, None, inputs)
        expected = _reference_main_spatial(visual, crops, vfm_map, plan, regions)
    assert got.shape == (2, 14, 14, 32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_default_config_runs_with_precomputed_inputs(scene):
    vfm_map, plan, crops, regions, visual = scene
    m = get_method("corrclipv2")
    cfg = m.build({}, 12)
    vfm = vfm_window_features(vfm_map, plan, 16)
    windows = crop_window_labels(regions, plan)
    with torch.no_grad():
        computed = m.window_features(visual, crops, cfg, None, WindowInputs(vfm=vfm, regions=windows))
        blocks = clip_block_outputs(visual, crops, list(m.required_blocks(cfg, 12)))
        # the relabelled region map needs no features (no DBSCAN): what a semantic-token stage would use
        merged = cluster_masks(None, F.interpolate(windows[:, None].float(), size=(14, 14)).long()[:, 0], cfg)
        given = m.window_features(visual, crops, cfg, blocks, WindowInputs(vfm=vfm, regions=windows, merged=merged))
        no_semantic = m.window_features(visual, crops, dataclasses.replace(cfg, semantic_branch=False), None,
                                        WindowInputs(vfm=vfm, regions=windows))
    torch.testing.assert_close(given, computed, atol=1e-5, rtol=1e-5)
    assert (computed - no_semantic).abs().max() > 1e-3  # the semantic branch contributes


def test_missing_inputs_are_named(scene):
    _, _, crops, _, visual = scene
    m = get_method("corrclipv2")
    with pytest.raises(ValueError, match="CorrCLIPv2 needs VFM correlation features"):
        m.window_features(visual, crops, m.build({}, 12), None, WindowInputs())
    with pytest.raises(ValueError, match="needs the correlation features"):
        cluster_masks(None, torch.zeros(1, 4, 4, dtype=torch.int64), CorrCLIPConfig())
