"""Progressive, quality-gated calibration: the quality score by hand and the gate's keep / roll back."""

from __future__ import annotations

import math

import pytest
import torch

from ovseg_core.scclip.progressive_calibration import (
    prediction_agreement,
    prediction_entropy,
    progressive_calibration,
    quality_score,
)

TEXT = torch.eye(2)  # two queries, e0 and e1
SCALE = 50.0
# tokens {0, 1} alike and {2, 3} alike at mid depth
MID = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
UNDECIDED = torch.tensor([[1.0, 1.0]] * 4)  # every token equally like both queries: P = (1/2, 1/2)
MATCHING = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # labels follow the mid-layer groups
CROSSING = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # confident, against the groups


def _q(features: torch.Tensor, w: float = 0.5) -> float:
    return quality_score(features[None], TEXT, SCALE, MID[None], w).item()


def test_quality_score_by_hand() -> None:
    # undecided: co-prediction constant -> agreement 0; entropy ln 2 / ln 2 = 1: Q = 0.5 * (0 + 1) / 2 + 0.5 * 0
    assert _q(UNDECIDED) == pytest.approx(0.25, abs=1e-6)
    # matching: co-prediction ~ the mid-layer groups (agreement ~1), entropy ~0 (softmax of 50 vs 0): Q ~ 1
    assert _q(MATCHING) == pytest.approx(1.0, abs=1e-6)
    # crossing: two binary pair sets, 4 of 12 pairs each, no overlap: corr = (0 - 12/9) / (12 * 2/9) = -1/2
    assert _q(CROSSING) == pytest.approx(0.5 * 0.25 + 0.5, abs=1e-6)
    assert _q(CROSSING, w=0.0) == pytest.approx(0.25, abs=1e-6)
    assert _q(CROSSING, w=1.0) == pytest.approx(1.0, abs=1e-6)


def test_entropy_and_agreement_parts() -> None:
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    assert prediction_entropy(p).item() == pytest.approx(0.5)
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    assert prediction_entropy(q).item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(3))
    assert prediction_entropy(torch.ones(1, 3, 1)).item() == 0.0  # one query: no uncertainty
    probs = torch.softmax(SCALE * torch.nn.functional.normalize(CROSSING, dim=-1) @ TEXT.T, dim=-1)[None]
    assert prediction_agreement(probs, MID[None]).item() == pytest.approx(-0.5, abs=1e-6)
    assert prediction_agreement(probs, torch.ones(1, 4, 4)).item() == 0.0  # constant reference


def _forward(windows: list[dict[frozenset[str], torch.Tensor]]):
    """A forward whose (4, 2) features of window i are ``windows[i][the set of steps on in window i]``."""
    calls: list[dict[str, list[bool]]] = []

    def forward(on):
        calls.append({s: m.tolist() for s, m in on.items()})
        return torch.stack([states[frozenset(s for s, m in on.items() if bool(m[i]))]
                            for i, states in enumerate(windows)])

    return forward, calls


def test_gate_keeps_a_raising_step_and_rolls_back_a_lowering_one() -> None:
    # window 0: "repair" raises Q (undecided -> matching), "adjust" on top lowers it (matching -> crossing)
    # window 1: starts matching; both steps lower Q and are rolled back
    window0 = {frozenset(): UNDECIDED, frozenset({"repair"}): MATCHING, frozenset({"adjust"}): CROSSING,
               frozenset({"repair", "adjust"}): CROSSING}
    window1 = {frozenset(): MATCHING, frozenset({"repair"}): CROSSING, frozenset({"adjust"}): UNDECIDED,
               frozenset({"repair", "adjust"}): CROSSING}
    forward, calls = _forward([window0, window1])
    everywhere = torch.ones(2, dtype=torch.bool)
    feats, kept = progressive_calibration(
        forward, lambda f: quality_score(f, TEXT, SCALE, MID.expand(2, 4, 4), 0.5),
        {"repair": everywhere, "adjust": everywhere}, threshold=0.0)
    assert kept["repair"].tolist() == [True, False]
    assert kept["adjust"].tolist() == [False, False]
    assert torch.equal(feats[0], MATCHING) and torch.equal(feats[1], MATCHING)
    # steps run in order, each tried on top of the steps kept so far
    assert calls == [{}, {"repair": [True, True]}, {"repair": [True, False], "adjust": [True, True]}]


def test_gate_threshold_and_allowed_windows() -> None:
    window = {frozenset(): UNDECIDED, frozenset({"repair"}): MATCHING}
    forward, _ = _forward([window, window])
    quality = lambda f: quality_score(f, TEXT, SCALE, MID.expand(2, 4, 4), 0.5)  # noqa: E731
    both = torch.ones(2, dtype=torch.bool)
    # the gain is 1 - 0.25 = 0.75
    assert progressive_calibration(forward, quality, {"repair": both}, 0.7)[1]["repair"].all()
    assert not progressive_calibration(forward, quality, {"repair": both}, 0.8)[1]["repair"].any()
    only_second = torch.tensor([False, True])
    feats, kept = progressive_calibration(forward, quality, {"repair": only_second}, 0.0)
    assert kept["repair"].tolist() == [False, True]  # not tried where not allowed
    assert torch.equal(feats[0], UNDECIDED) and torch.equal(feats[1], MATCHING)


def test_quality_score_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="text must be"):
        quality_score(torch.zeros(1, 4, 3), TEXT, SCALE, MID[None], 0.5)
    with pytest.raises(ValueError, match="mid_sim must be"):
        quality_score(MATCHING[None], TEXT, SCALE, MID[None, :3, :3], 0.5)
