"""bench/sam_speed.py: the bfloat16 movement measure and the arguments (no model runs)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def sam_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "bench"))
    import sam_speed

    return sam_speed


def test_movement_ignores_renumbering_and_counts_moved_pixels(sam_speed) -> None:
    reference = np.array([[0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 0, 0]])
    renumbered = np.array([[0, 0, 7, 7], [3, 3, 7, 7], [3, 3, 0, 0]])
    assert sam_speed.movement(reference, renumbered) == {
        "regions_float32": 2, "regions_bf16": 2, "coverage_changed_pct": 0.0, "pixels_moved_pct": 0.0,
    }
    moved = renumbered.copy()
    moved[0, 0] = 7  # one unsegmented pixel joins region 7; one of 12 pixels moved
    m = sam_speed.movement(reference, moved)
    assert m["coverage_changed_pct"] == pytest.approx(100 / 12, abs=1e-3)
    assert m["pixels_moved_pct"] == pytest.approx(100 / 12, abs=1e-3)


def test_arguments(sam_speed) -> None:
    args = sam_speed.parse_args(["--setting", "no-nms", "--images", "1"])
    assert (args.setting, args.images, args.repeats, args.threads) == ("no-nms", 1, 3, 2)
    with pytest.raises(SystemExit):
        sam_speed.parse_args(["--repeats", "0"])
