"""Selective calibration: the need predictor, the thresholds and the steps of each path."""

from __future__ import annotations

import pytest
import torch

from ovseg_core.scclip.selective_calibration import PATH_STEPS, allowed_steps, calibration_need, choose_paths


def test_need_is_the_largest_robust_z_score_of_the_lof_scores() -> None:
    lof = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.2, 5.0, 0.95], [1.0] * 7])
    # row 0: median 1.0, |dev| sorted 0 0 .05 .1 .1 .2 4 -> MAD 0.1; max z = 4.0 / (1.4826 * 0.1)
    need = calibration_need(lof)
    assert need[0].item() == pytest.approx(4.0 / 0.14826, rel=1e-5)
    assert need[1].item() == 0.0  # no outlier at all


def test_thresholds_pick_the_path() -> None:
    need = torch.tensor([0.0, 7.9, 8.0, 31.9, 32.0, float("inf")])
    assert choose_paths(need, 8.0, 32.0).tolist() == [0, 0, 1, 1, 2, 2]
    assert choose_paths(need, 0.0, 0.0).tolist() == [2] * 6  # thresholds at 0: every window full
    assert choose_paths(need, 100.0, 100.0).tolist() == [0, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="fast_below"):
        choose_paths(need, 5.0, 1.0)


def test_paths_run_nested_step_sets() -> None:
    allowed = allowed_steps(torch.tensor([0, 1, 2]), PATH_STEPS["full"])
    assert {s: m.tolist() for s, m in allowed.items()} == {
        "anomaly_repair": [True, True, True],
        "self_adjusting": [False, True, True],
        "attention_enhancement": [False, True, True],
        "multi_level_fusion": [False, False, True],
    }
    assert list(allowed_steps(torch.tensor([1]), ("self_adjusting",))) == ["self_adjusting"]
    with pytest.raises(ValueError, match="unknown calibration steps"):
        allowed_steps(torch.tensor([1]), ("repair",))
