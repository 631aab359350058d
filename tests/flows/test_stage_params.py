"""Typed stage parameters: each stage key hashes exactly what its stage reads.

Two independent checks: the stages' computations do not change when a field left out of their key
changes (so nothing that matters is left out), and the paper's ablation sweep has no two stage
outputs that differ only in fields their stage does not read (so nothing is computed twice)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from flows.config import load_experiment
from flows.graph import build_plan
from ovseg_core import clip_ops
from ovseg_core.corrclip import CorrCLIPConfig, cluster_masks, corrclip_window_features, required_blocks
from ovseg_core.methods import CLUSTERING_FIELDS, NOT_READ_BY_RECONSTRUCTION, get_method

REPO = Path(__file__).resolve().parents[2]
TINY = ["models.clip=clip:tiny@random:0", "models.dino=dino:tiny8@random:0", "models.sam=sam:tiny@random:0"]
# a value different from the default for every CorrCLIP field
OTHER = {"scope_reconstruction": False, "value_reconstruction": False, "tau": 2.5, "mask_clustering": False,
         "dbscan_eps": 0.7, "dbscan_min_samples": 2, "m0_quirk": False, "spatial_branch": False, "alpha": 0.3,
         "semantic_branch": False, "beta": 0.1, "num_spatial": 1, "map_correction": False, "padding": "ignore"}


def test_every_corrclip_field_has_a_test_value():
    assert set(OTHER) | {"similarity"} == {f.name for f in dataclasses.fields(CorrCLIPConfig)}


@pytest.fixture(scope="module")
def window():
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=224, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=4.0,
                               output_dim=32).eval()
    crops = torch.randn(2, 3, 64, 64)
    coarse = torch.randint(0, 6, (2, 4, 4))
    regions = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
    regions[1, :, 56:] = -1
    qk = F.normalize(torch.randn(2, 8, 8, 16), dim=-1)
    return visual, crops, qk, regions


def test_clustering_reads_only_its_fields(window):
    _, _, qk, regions = window
    base = CorrCLIPConfig(num_spatial=2)
    small = F.interpolate(regions[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    expected = cluster_masks(qk, small, base)
    for field, value in OTHER.items():
        if field in CLUSTERING_FIELDS:
            continue
        got = cluster_masks(qk, small, dataclasses.replace(base, **{field: value}))
        assert torch.equal(got, expected), field


def test_reconstruction_reads_none_of_the_fields_left_out_of_its_key(window):
    visual, crops, qk, regions = window
    base = CorrCLIPConfig(num_spatial=2)
    merged = cluster_masks(qk, F.interpolate(regions[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long(), base)
    tokens_in, _ = clip_ops.embed_tokens(visual, crops)
    _, kept = clip_ops.run_blocks(visual, tokens_in, 1, 3, keep=(1, 2, 3))
    names = required_blocks(base, 4)
    blocks = {names[0]: kept[3], names[1]: (kept[1] + kept[2]) / 2}
    semantic = torch.randn(2, 4, 4, 64)
    with torch.no_grad():
        expected = corrclip_window_features(visual, crops, qk, regions, base, blocks=blocks, semantic=semantic,
                                            merged=merged)
        for field in NOT_READ_BY_RECONSTRUCTION:
            cfg = dataclasses.replace(base, **{field: OTHER[field]})
            got = corrclip_window_features(visual, crops, qk, regions, cfg, blocks=blocks, semantic=semantic, merged=merged)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=field)
    method = get_method("corrclip")
    for field in NOT_READ_BY_RECONSTRUCTION:  # and they do not move its key
        assert method.reconstruction_config(dataclasses.replace(base, **{field: OTHER[field]})) == \
            method.reconstruction_config(base)


def test_the_corrclip_ablation_computes_no_output_twice():
    exp = load_experiment(REPO / "configs" / "voc21-corrclip-ablation.yaml", overrides=TINY)
    (plan,) = build_plan(exp)
    by_stage: dict[str, list] = {}
    for node in plan.nodes.values():
        by_stage.setdefault(node.stage, []).append(node)
    # 7 rows: +refinement and +map-correction differ only in map correction, so they share one reconstruction
    assert len(by_stage["reconstruction"]) == 6
    assert len({mp.prediction.upstream.get("reconstruction", mp.prediction).key for mp in plan.methods
                if mp.entry.name in ("+refinement", "+map-correction")}) == 1
    assert len(by_stage["mask_clustering"]) == 2  # with and without clustering; tau, branches and fusion never enter
    for stage in ("sam_masks", "dino_features", "clip_layers", "mask_class_tokens", "text_embeddings"):
        assert len(by_stage[stage]) == 1, stage
    for stage, nodes in by_stage.items():  # no two nodes of a stage hold the same parameters and inputs
        seen = {(repr(n.params), tuple(sorted((r, u.key) for r, u in n.upstream.items()))) for n in nodes}
        assert len(seen) == len(nodes), stage
