"""SC-CLIP's design-document options in the per-window pipeline: tiny random CLIP, real windows of the VOC sample."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core.backbones import load_backbone
from ovseg_core.features.clip import clip_block_outputs, normalize_clip
from ovseg_core.features.text import TEMPLATE_SETS, parse_vocabulary_string, text_embeddings
from ovseg_core.methods import WindowInputs, get_method
from ovseg_core.scclip import SCCLIPConfig, lof_scores, required_blocks, scclip_window_features, scclip_window_outputs
from ovseg_core.scclip.config import CALIBRATION_STEPS
from ovseg_core.scclip.selective_calibration import calibration_need
from ovseg_core.windows import crop_windows, plan_windows, resize_image

VOC = Path(__file__).resolve().parents[2] / "examples" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
SCALE = 50.0  # VOC21's SC-CLIP logit scale


@pytest.fixture(scope="module")
def clip():
    return load_backbone("clip:tiny@random:0")


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """The SC-CLIP VOC21 windows (short side 336, crop 224, stride 112) of two sample images: ``(B, 3, 224, 224)``."""
    out = []
    for path in sorted(VOC.glob("*.jpg"))[:2]:
        img = torch.from_numpy(np.array(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        plan = plan_windows((img.shape[1], img.shape[2]), 336, 224, 112, 16)
        out.append(crop_windows(normalize_clip(resize_image(img, plan.resized_hw)[None])[0], plan))
    return torch.cat(out)


@pytest.fixture(scope="module")
def blocks(clip, crops) -> dict[str, torch.Tensor]:
    """Every block output any configuration below reads, computed once."""
    return clip_block_outputs(clip.model.visual, crops, ["block:4", "block:9", "block:11", "sum:4-10"])


@pytest.fixture(scope="module")
def text(clip) -> torch.Tensor:
    vocab = parse_vocabulary_string("background; aeroplane; bicycle; bird; boat; person, man; car; dog")
    return text_embeddings(clip.model, clip.tokenizer, vocab, TEMPLATE_SETS["single"]).float()


def _run(clip, crops, blocks, text, **options):
    return scclip_window_outputs(clip.model.visual, crops, SCCLIPConfig(**options), blocks, text, SCALE)


def test_the_sample_gives_several_windows(crops) -> None:
    assert crops.shape[0] >= 6 and crops.shape[1:] == (3, 224, 224)


def test_selective_forced_full_equals_the_default_path_bit_for_bit(clip, crops, blocks, text) -> None:
    default, record = _run(clip, crops, blocks, text)
    assert record == {}
    full, record = _run(clip, crops, blocks, text, selective_calibration=True, selective_force="full")
    assert torch.equal(full, default)
    assert record["path:full"].all() and not record["path:fast"].any() and not record["path:balanced"].any()
    # the predictor choosing full everywhere (thresholds at 0, need >= 0) is the same computation
    predicted, record = _run(clip, crops, blocks, text, selective_calibration=True, selective_fast_below=0.0,
                             selective_full_from=0.0)
    assert torch.equal(predicted, default) and record["path:full"].all()


def test_forced_fast_and_balanced_are_the_papers_step_subsets(clip, crops, blocks, text) -> None:
    fast, _ = _run(clip, crops, blocks, text, selective_calibration=True, selective_force="fast")
    repair_only, _ = _run(clip, crops, blocks, text, self_adjusting=False, attention_enhancement=False,
                          multi_level_fusion=False)
    assert torch.equal(fast, repair_only)
    balanced, _ = _run(clip, crops, blocks, text, selective_calibration=True, selective_force="balanced")
    no_fusion, _ = _run(clip, crops, blocks, text, multi_level_fusion=False)
    assert torch.equal(balanced, no_fusion)


def test_selective_paths_per_window(clip, crops, blocks, text) -> None:
    need = calibration_need(lof_scores(blocks["block:11"][:, 1:].float(), 30)).tolist()
    order = sorted(need)
    # thresholds between the sorted needs: the lowest third fast, the highest third full
    third = len(order) // 3
    fast_below = 0.5 * (order[third - 1] + order[third])
    full_from = 0.5 * (order[-third - 1] + order[-third])
    mixed, record = _run(clip, crops, blocks, text, selective_calibration=True, selective_fast_below=fast_below,
                         selective_full_from=full_from)
    paths = ["fast" if n < fast_below else "full" if n >= full_from else "balanced" for n in need]
    assert set(paths) == {"fast", "balanced", "full"}
    for p in ("fast", "balanced", "full"):
        assert record[f"path:{p}"].tolist() == [q == p for q in paths]
        forced, _ = _run(clip, crops, blocks, text, selective_calibration=True, selective_force=p)
        idx = [i for i, q in enumerate(paths) if q == p]
        torch.testing.assert_close(mixed[idx], forced[idx], atol=1e-5, rtol=1e-5)


def test_progressive_gate_keeping_everything_equals_the_default_path(clip, crops, blocks, text) -> None:
    default, _ = _run(clip, crops, blocks, text)
    gated, record = _run(clip, crops, blocks, text, progressive_calibration=True, gate_threshold=-1.0)
    assert torch.equal(gated, default)
    assert sorted(record) == sorted(f"kept:{s}" for s in CALIBRATION_STEPS)
    assert all(record[f"kept:{s}"].all() for s in CALIBRATION_STEPS)


def test_progressive_windows_equal_the_paper_config_of_their_kept_steps(clip, crops, blocks, text) -> None:
    gated, record = _run(clip, crops, blocks, text, progressive_calibration=True)
    kept = torch.stack([record[f"kept:{s}"] for s in CALIBRATION_STEPS], dim=1)  # (B, 4)
    for b in range(crops.shape[0]):
        switches = dict(zip(CALIBRATION_STEPS, kept[b].tolist()))
        alone, _ = _run(clip, crops, blocks, text, **switches)
        torch.testing.assert_close(gated[b], alone[b], atol=1e-5, rtol=1e-5)


def test_complexity_skip_blocks_the_later_steps(clip, crops, blocks, text) -> None:
    _, record = _run(clip, crops, blocks, text, progressive_calibration=True, gate_threshold=-1.0,
                     gate_skip_complexity=1.0, gate_skip_from="self_adjusting")
    assert record["complexity_skip"].all()  # complexity < 1 in every real window
    assert record["kept:anomaly_repair"].all()
    for step in ("self_adjusting", "attention_enhancement", "multi_level_fusion"):
        assert not record[f"kept:{step}"].any(), step


def test_dynamic_detection_flags_five_to_ten_percent(clip, crops, blocks, text) -> None:
    default, _ = _run(clip, crops, blocks, text)
    out, record = _run(clip, crops, blocks, text, dynamic_detection=True)
    counts = record["anomalies"].tolist()
    # ratio in [0.05, 0.10] at the document's values: N - 1 - floor((1 - r)(N - 1)) tokens of N = 196
    assert all(10 <= c <= 20 for c in counts), counts
    assert out.shape == default.shape and torch.isfinite(out).all() and not torch.equal(out, default)


def test_boundary_aware_repair_without_boundaries_is_the_papers_repair(clip, crops, blocks, text) -> None:
    default, _ = _run(clip, crops, blocks, text)
    never, _ = _run(clip, crops, blocks, text, boundary_aware_repair=True, boundary_gap=2.0)
    torch.testing.assert_close(never, default, atol=1e-5, rtol=1e-5)
    aware, _ = _run(clip, crops, blocks, text, boundary_aware_repair=True, boundary_gap=0.05)
    assert not torch.allclose(aware, default, atol=1e-5)


def test_progressive_needs_the_text_embeddings(clip, crops) -> None:
    with pytest.raises(ValueError, match="text embeddings"):
        scclip_window_features(clip.model.visual, crops[:1], SCCLIPConfig(progressive_calibration=True))


def test_extensions_read_the_mid_layer_block() -> None:
    paper_off = dict(self_adjusting=False, attention_enhancement=False, multi_level_fusion=False)
    assert required_blocks(SCCLIPConfig(**paper_off), 12) == ("block:11",)
    for option in ("dynamic_detection", "boundary_aware_repair", "progressive_calibration"):
        assert required_blocks(SCCLIPConfig(**paper_off, **{option: True}), 12) == ("block:9", "block:11"), option
    assert required_blocks(SCCLIPConfig(**paper_off, selective_calibration=True), 12) == ("block:11",)


def test_the_registry_passes_text_and_returns_the_record(clip, crops, blocks, text) -> None:
    method = get_method("scclip")
    cfg = method.build({"progressive_calibration": True, "dynamic_score_weights": [1, 2, 0]}, 12)
    assert cfg.dynamic_score_weights == (1.0, 2.0, 0.0)
    feats, record = method.features_and_record(clip.model.visual, crops, cfg, blocks,
                                               WindowInputs(text=text, logit_scale=SCALE))
    expected, expected_record = _run(clip, crops, blocks, text, **{
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    assert torch.equal(feats, expected) and record.keys() == expected_record.keys()
    assert get_method("clip").features_and_record(clip.model.visual, crops[:1], None, None, WindowInputs())[1] == {}
