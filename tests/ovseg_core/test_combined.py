"""CorrCLIP + SC-CLIP: the token transform applied to CorrCLIP's penultimate tokens."""

from __future__ import annotations

import open_clip
import pytest
import torch

from ovseg_core.combined import CombinedConfig, combined_required_blocks, combined_token_transform
from ovseg_core.scclip import SCCLIPConfig, detect_anomalies, repair_anomalies
from ovseg_core.scclip.self_adjusting import aggregation_weights, cosine_similarity

GRID = (14, 14)


def _tokens(seed: int, b: int = 2, d: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + GRID[0] * GRID[1], d, generator=g)
    x[:, [5, 60, 61, 150]] *= 15.0  # planted high-norm patch tokens (token index = patch index + 1)
    return x


def test_defaults_and_presets() -> None:
    cfg = CombinedConfig()
    assert (cfg.anomaly_repair, cfg.mid_layer_similarity, cfg.detector, cfg.n_neighbors, cfg.contamination) == (
        True, False, "lof", 30, 0.05,
    )
    assert cfg.resolved(12).mid_block == 9 and cfg.resolved(24).mid_block == 17
    assert combined_required_blocks(cfg, 12) == ()
    assert combined_required_blocks(CombinedConfig(mid_layer_similarity=True), 12) == ("block:9",)
    assert combined_required_blocks(CombinedConfig(mid_layer_similarity=True, mid_block=6), 12) == ("block:6",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detector": "zscore"}, "CombinedConfig.detector must be one of"),
        ({"contamination": 0.7}, "CombinedConfig.contamination"),
        ({"mid_block": 0}, "CombinedConfig.mid_block must be a 1-based"),
        ({"sim_threshold": -2.0}, "CombinedConfig.sim_threshold"),
        ({"row_norm_eps": -1.0}, "CombinedConfig.row_norm_eps"),
    ],
)
def test_bad_fields_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CombinedConfig(**kwargs)


def test_mid_block_out_of_range_and_unknown_depth() -> None:
    with pytest.raises(ValueError, match=r"mid_block must be in 1..11"):
        CombinedConfig(mid_block=12).resolved(12)
    with pytest.raises(ValueError, match="no SC-CLIP preset for a 6-block"):
        CombinedConfig().resolved(6)


def test_repair_only_replaces_the_detected_tokens_and_keeps_cls() -> None:
    tokens = _tokens(0)
    out = combined_token_transform(CombinedConfig())(tokens, GRID)
    assert out.shape == tokens.shape
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    anomalies = detect_anomalies(tokens[:, 1:], SCCLIPConfig())
    assert anomalies[:, [4, 59, 60, 149]].all()
    torch.testing.assert_close(out[:, 1:], repair_anomalies(tokens[:, 1:], anomalies, GRID))
    torch.testing.assert_close(out[:, 1:][~anomalies], tokens[:, 1:][~anomalies])
    assert out[:, 1:].norm(dim=-1).max() < tokens[:, 1:].norm(dim=-1).max() / 3  # the artefacts are gone


def test_mid_layer_similarity_aggregates_with_the_repaired_mid_block() -> None:
    tokens, mid = _tokens(1), _tokens(2)
    cfg = CombinedConfig(mid_layer_similarity=True)
    out = combined_token_transform(cfg, mid)(tokens, GRID)
    anomalies = detect_anomalies(tokens[:, 1:], cfg)
    x = repair_anomalies(tokens[:, 1:], anomalies, GRID)
    w = aggregation_weights(cosine_similarity(repair_anomalies(mid[:, 1:], anomalies, GRID)), 0.4, 1e-6)
    torch.testing.assert_close(out, torch.cat([tokens[:, :1], w @ x], dim=1))
    via_mapping = combined_token_transform(cfg, {"block:9": mid, "block:4": tokens}, num_blocks=12)(tokens, GRID)
    torch.testing.assert_close(via_mapping, out)
    resolved = combined_token_transform(cfg.resolved(12), {"block:9": mid})(tokens, GRID)
    torch.testing.assert_close(resolved, out)


def test_mid_layer_similarity_without_repair() -> None:
    tokens, mid = _tokens(3), _tokens(4)
    out = combined_token_transform(CombinedConfig(anomaly_repair=False, mid_layer_similarity=True), mid)(tokens, GRID)
    w = aggregation_weights(cosine_similarity(mid[:, 1:]), 0.4, 1e-6)
    torch.testing.assert_close(out[:, 1:], w @ tokens[:, 1:])


def test_everything_off_is_identity() -> None:
    tokens = _tokens(5)
    assert torch.equal(combined_token_transform(CombinedConfig(anomaly_repair=False))(tokens, GRID), tokens)


def test_bad_inputs() -> None:
    tokens = _tokens(6)
    cfg = CombinedConfig(mid_layer_similarity=True)
    with pytest.raises(ValueError, match="needs the mid block's tokens"):
        combined_token_transform(cfg)
    with pytest.raises(ValueError, match="pass num_blocks"):
        combined_token_transform(cfg, {"block:9": tokens})
    with pytest.raises(ValueError, match=r"blocks lack 'block:9'"):
        combined_token_transform(cfg, {"block:8": tokens}, num_blocks=12)
    with pytest.raises(ValueError, match="do not match tokens"):
        combined_token_transform(cfg, tokens[:1])(tokens, GRID)
    with pytest.raises(ValueError, match=r"tokens must be \(B, 1 \+ gh\*gw, D\)"):
        combined_token_transform(CombinedConfig())(tokens, (10, 10))


def test_integration_with_corrclip_window_features() -> None:
    corrclip_pipeline = pytest.importorskip("ovseg_core.corrclip.pipeline")
    from ovseg_core.corrclip.config import CorrCLIPConfig, required_blocks
    from ovseg_core.features.clip import clip_block_outputs

    torch.manual_seed(0)
    visual = open_clip.transformer.VisionTransformer(
        image_size=224, patch_size=16, width=64, layers=12, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(1, 3, 224, 224, generator=g)
    qk = torch.nn.functional.normalize(torch.randn(1, 28, 28, 8, generator=g), dim=-1)
    regions = torch.zeros(1, 224, 224, dtype=torch.int64)
    regions[:, :112, :112], regions[:, 112:, :] = 1, 2
    cfg = CorrCLIPConfig()
    names = required_blocks(cfg, 12)
    blocks = clip_block_outputs(visual, crops, list(names) + ["block:9"])
    combined = CombinedConfig(mid_layer_similarity=True)
    calls: list[tuple[int, int]] = []
    inner = combined_token_transform(combined, blocks, num_blocks=12)

    def counting(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        calls.append(grid)
        return inner(tokens, grid)

    with torch.no_grad():
        out = corrclip_pipeline.corrclip_window_features(visual, crops, qk, regions, cfg, token_transform=counting)
        plain = corrclip_pipeline.corrclip_window_features(visual, crops, qk, regions, cfg)
        # the transform acts exactly on the penultimate tokens feeding the main branch
        penult = "block:11"
        assert penult in names
        swapped = {**blocks, penult: inner(blocks[penult], (14, 14))}
        via_blocks = corrclip_pipeline.corrclip_window_features(visual, crops, qk, regions, cfg, blocks=swapped)
    assert calls == [(14, 14)]
    assert out.shape == plain.shape == (1, 28, 28, 32)
    assert not torch.allclose(out, plain)
    torch.testing.assert_close(out, via_blocks)
