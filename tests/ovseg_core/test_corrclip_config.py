"""CorrCLIPConfig defaults, validation and the block aggregates the method needs."""

from __future__ import annotations

import pytest

from ovseg_core.corrclip.config import CorrCLIPConfig, num_spatial_blocks, required_blocks, spatial_block_range


def test_defaults_are_the_reference_values() -> None:
    cfg = CorrCLIPConfig()
    assert (cfg.tau, cfg.dbscan_eps, cfg.dbscan_min_samples, cfg.alpha, cfg.beta) == (4.0, 0.2, 1, 1.0, 0.5)
    assert cfg.scope_reconstruction and cfg.value_reconstruction and cfg.mask_clustering
    assert cfg.spatial_branch and cfg.semantic_branch and cfg.map_correction and cfg.m0_quirk
    assert cfg.num_spatial is None and cfg.similarity == "dino_qk" and cfg.padding == "reference"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"dbscan_eps": -0.1}, "dbscan_eps"),
        ({"dbscan_min_samples": 0}, "dbscan_min_samples"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("inf")}, "beta"),
        ({"num_spatial": 0}, "num_spatial"),
        ({"similarity": "clip_qk"}, "similarity"),
        ({"padding": "zero"}, "padding"),
        ({"scope_reconstruction": 1}, "scope_reconstruction"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CorrCLIPConfig(**kwargs)


@pytest.mark.parametrize(("layers", "expected"), [(12, 5), (24, 12), (32, 28), (16, 12), (6, 2)])
def test_num_spatial_reference_rule(layers: int, expected: int) -> None:
    assert num_spatial_blocks(CorrCLIPConfig(), layers) == expected


def test_required_blocks_vit_b_and_l() -> None:
    assert required_blocks(CorrCLIPConfig(), 12) == ("block:11", "mean:6-10")
    assert required_blocks(CorrCLIPConfig(), 24) == ("block:23", "mean:11-22")
    assert required_blocks(CorrCLIPConfig(spatial_branch=False), 12) == ("block:11",)
    assert spatial_block_range(CorrCLIPConfig(num_spatial=2), 4) == (1, 2)


def test_num_spatial_out_of_range_for_the_tower() -> None:
    with pytest.raises(ValueError, match="num_spatial"):
        required_blocks(CorrCLIPConfig(), 4)  # L - 4 = 0 spatial blocks
    with pytest.raises(ValueError, match="num_spatial"):
        num_spatial_blocks(CorrCLIPConfig(num_spatial=11), 12)
    with pytest.raises(ValueError, match="at least 3 blocks"):
        required_blocks(CorrCLIPConfig(), 2)
