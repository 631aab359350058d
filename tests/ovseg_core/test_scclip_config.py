"""SCCLIPConfig: paper defaults, ViT-B / ViT-L presets, validation."""

from __future__ import annotations

import pytest

from ovseg_core.scclip import SCCLIPConfig, required_blocks


def test_vit_b_preset_matches_the_paper() -> None:
    c = SCCLIPConfig().resolved(12)
    assert (c.pre_adjust_block, c.post_adjust_block, c.fusion_blocks, c.res_cls) == (9, 4, (4, 10), 0.3)
    assert (c.detector, c.n_neighbors, c.contamination, c.sim_threshold, c.attn_scale) == ("lof", 30, 0.05, 0.4, 3.0)
    assert c == SCCLIPConfig.vit_b()


def test_vit_l_preset_matches_the_paper() -> None:
    c = SCCLIPConfig.vit_l()
    assert (c.pre_adjust_block, c.post_adjust_block, c.fusion_blocks, c.res_cls) == (17, 7, (9, 20), 0.1)
    assert required_blocks(c, 24) == ("block:7", "block:17", "block:23", "sum:9-20")


def test_required_blocks_vit_b_and_switches() -> None:
    assert required_blocks(SCCLIPConfig(), 12) == ("block:4", "block:9", "block:11", "sum:4-10")
    assert required_blocks(SCCLIPConfig(multi_level_fusion=False), 12) == ("block:4", "block:9", "block:11")
    assert required_blocks(SCCLIPConfig(self_adjusting=False), 12) == ("block:9", "block:11", "sum:4-10")
    off = SCCLIPConfig(self_adjusting=False, attention_enhancement=False, multi_level_fusion=False)
    assert required_blocks(off, 12) == ("block:11",)


def test_explicit_fields_win_over_the_preset() -> None:
    c = SCCLIPConfig(pre_adjust_block=8, res_cls=0.0).resolved(12)
    assert (c.pre_adjust_block, c.post_adjust_block, c.res_cls) == (8, 4, 0.0)


def test_unknown_depth_needs_explicit_fields() -> None:
    with pytest.raises(ValueError, match="no SC-CLIP preset for a 6-block"):
        SCCLIPConfig().resolved(6)
    c = SCCLIPConfig(pre_adjust_block=4, post_adjust_block=2, fusion_blocks=(2, 4), res_cls=0.3).resolved(6)
    assert c.is_resolved


def test_blocks_must_precede_the_last_block() -> None:
    with pytest.raises(ValueError, match="pre_adjust_block must use blocks 1..11"):
        SCCLIPConfig(pre_adjust_block=12).resolved(12)
    with pytest.raises(ValueError, match="fusion_blocks must use blocks 1..11"):
        SCCLIPConfig(fusion_blocks=(4, 12)).resolved(12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detector": "iforest"}, "detector must be one of"),
        ({"n_neighbors": 0}, "n_neighbors must be >= 1"),
        ({"contamination": 0.5}, r"contamination must be in \[0, 0.5\)"),
        ({"contamination": -0.1}, "contamination"),
        ({"topk": -1}, "topk must be >= 0"),
        ({"adaptive_z": 0.0}, "adaptive_z must be > 0"),
        ({"pre_adjust_block": 0}, "pre_adjust_block must be a 1-based"),
        ({"fusion_blocks": (5, 4)}, "fusion_blocks must be"),
        ({"sim_threshold": 1.5}, r"sim_threshold must be a cosine in \[-1, 1\]"),
        ({"attn_scale": 0.0}, "attn_scale must be > 0"),
        ({"res_cls": -0.1}, "res_cls must be >= 0"),
        ({"row_norm_eps": 0.0}, "row_norm_eps must be > 0"),
    ],
)
def test_bad_fields_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SCCLIPConfig(**kwargs)


def test_design_document_options_are_off_by_default() -> None:
    c = SCCLIPConfig()
    assert not (c.dynamic_detection or c.boundary_aware_repair or c.progressive_calibration or c.selective_calibration)
    assert (c.dynamic_base_ratio, c.dynamic_entropy_weight, c.dynamic_contrast_weight, c.dynamic_max_ratio,
            c.dynamic_lof_neighbors) == (0.05, 0.5, 0.5, 0.15, 10)  # the document's values
    assert c.selective_force is None and c.gate_skip_complexity == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dynamic_base_ratio": 0.0}, r"SCCLIPConfig.dynamic_base_ratio must be in \(0.0, 0.5\]"),
        ({"dynamic_max_ratio": 0.6}, r"SCCLIPConfig.dynamic_max_ratio must be in \(0.0, 0.5\]"),
        ({"dynamic_entropy_weight": -0.1}, "SCCLIPConfig.dynamic_entropy_weight must be in"),
        ({"dynamic_contrast_weight": float("nan")}, "SCCLIPConfig.dynamic_contrast_weight must be in"),
        ({"dynamic_lof_neighbors": 0}, "SCCLIPConfig.dynamic_lof_neighbors must be an int >= 1"),
        ({"dynamic_semantic_neighbors": 2.5}, "SCCLIPConfig.dynamic_semantic_neighbors must be an int >= 1"),
        ({"dynamic_score_weights": (1.0, 1.0)}, "SCCLIPConfig.dynamic_score_weights must be three weights"),
        ({"dynamic_score_weights": (0.0, 0.0, 0.0)}, "positive sum"),
        ({"dynamic_score_weights": (1.0, -1.0, 1.0)}, "dynamic_score_weights"),
        ({"complexity_sim_threshold": 1.1}, r"SCCLIPConfig.complexity_sim_threshold must be in \[-1.0, 1.0\]"),
        ({"boundary_gap": 0.0}, r"SCCLIPConfig.boundary_gap must be in \(0.0, 2.0\]"),
        ({"gate_threshold": 1.5}, r"SCCLIPConfig.gate_threshold must be in \[-1.0, 1.0\]"),
        ({"gate_entropy_weight": 1.5}, r"SCCLIPConfig.gate_entropy_weight must be in \[0.0, 1.0\]"),
        ({"gate_skip_complexity": -0.1}, "SCCLIPConfig.gate_skip_complexity must be in"),
        ({"gate_skip_from": "fusion"}, "SCCLIPConfig.gate_skip_from must be one of"),
        ({"selective_fast_below": -1.0}, "selective_fast_below and selective_full_from"),
        ({"selective_fast_below": 40.0}, "fast_below <= full_from"),
        ({"selective_force": "medium"}, "SCCLIPConfig.selective_force must be None or one of"),
        ({"dynamic_detection": True, "detector": "l2norm_topk"}, "detector must be 'lof' or 'sklearn_lof'"),
        ({"dynamic_detection": True, "adaptive_contamination": True}, "enable at most one"),
        ({"dynamic_detection": True, "anomaly_repair": False}, "dynamic_detection acts on anomaly repair"),
        ({"boundary_aware_repair": True, "anomaly_repair": False}, "boundary_aware_repair acts on anomaly repair"),
    ],
)
def test_bad_option_fields_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SCCLIPConfig(**kwargs)


def test_option_ranges_accept_their_bounds() -> None:
    SCCLIPConfig(dynamic_base_ratio=0.5, dynamic_max_ratio=0.5, dynamic_entropy_weight=0.0, boundary_gap=2.0,
                 gate_threshold=-1.0, gate_entropy_weight=1.0, gate_skip_complexity=1.0, selective_fast_below=0.0,
                 selective_full_from=0.0, selective_force="fast", dynamic_detection=True, detector="sklearn_lof")
