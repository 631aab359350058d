"""Post-processing: cosine logits, synonyms, prob_thd and area_thd with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.postprocess import class_probabilities, dense_logits, predict, window_logits


def _onehot_text() -> torch.Tensor:
    return torch.eye(3, 4)  # 3 queries along the first three axes of a 4-d space


def test_dense_logits_cosine() -> None:
    feats = torch.zeros(2, 1, 2, 4)
    feats[0, 0, 0] = torch.tensor([5.0, 0, 0, 0])  # parallel to query 0
    feats[0, 0, 1] = torch.tensor([1.0, 1.0, 0, 0])  # 45 degrees to queries 0 and 1
    feats[1, 0, 0] = torch.tensor([0, 0, -2.0, 0])  # opposite to query 2
    feats[1, 0, 1] = torch.tensor([0, 0, 0, 3.0])  # orthogonal to all
    out = dense_logits(feats, _onehot_text())
    assert out.shape == (2, 3, 1, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 0, 0]))
    s = 1 / math.sqrt(2)
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([s, s, 0]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([0, 0, -1.0]))
    assert torch.allclose(out[1, :, 0, 1], torch.zeros(3))


def test_dense_logits_scale_invariant_and_batched() -> None:
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 5, 8)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    out = dense_logits(feats, text)
    assert torch.allclose(out, dense_logits(feats * 7.0, text), atol=1e-6)
    assert torch.allclose(out[1:2], dense_logits(feats[1:2], text))
    assert out.abs().max() <= 1 + 1e-6


def test_window_logits_upsamples() -> None:
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 3, 8)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    out = window_logits(feats, text, (48, 48))
    ref = F.interpolate(dense_logits(feats, text), size=(48, 48), mode="bilinear", align_corners=False)
    assert out.shape == (2, 5, 48, 48) and torch.allclose(out, ref)


def test_logit_bad_inputs() -> None:
    with pytest.raises(ValueError, match="L2-normalised"):
        dense_logits(torch.randn(1, 2, 2, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\(Q, E=4\)"):
        dense_logits(torch.randn(1, 2, 2, 4), torch.eye(3))
    with pytest.raises(ValueError, match="features must be"):
        dense_logits(torch.randn(2, 2, 4), torch.eye(4))
    with pytest.raises(ValueError, match="padded_hw"):
        window_logits(torch.randn(1, 2, 2, 4), torch.eye(4), (0, 4))


def test_class_probabilities_synonym_max() -> None:
    # queries 0,1 -> class 0; query 2 -> class 1; query 3 -> class 2
    logits = torch.tensor([0.1, 0.3, 0.2, 0.0]).view(4, 1, 1)
    q2c = torch.tensor([0, 0, 1, 2])
    p = torch.softmax(logits.flatten() * 10, dim=0)
    out = class_probabilities(logits, q2c, 10.0)
    assert torch.allclose(out.flatten(), torch.stack([torch.max(p[0], p[1]), p[2], p[3]]))
    # identity mapping: plain softmax
    eye = class_probabilities(logits, torch.arange(4), 10.0)
    assert torch.allclose(eye.flatten(), p)


def test_class_probabilities_equal_corrclipv2_scatter_max() -> None:
    # CorrCLIPv2 postprocess_result: x40 softmax over all queries, then per class the max over its
    # queries by scatter_reduce(amax) into a -inf canvas; synonyms on any class (here classes 1 and 3)
    torch.manual_seed(3)
    logits = torch.randn(7, 5, 6) * 0.1
    q2c = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    probs = (logits * 40).softmax(0)
    ref = torch.full((4, 5, 6), float("-inf")).scatter_reduce(
        0, q2c.view(-1, 1, 1).expand(-1, 5, 6), probs, reduce="amax", include_self=True)
    assert torch.equal(class_probabilities(logits, q2c, 40.0), ref)


def test_predict_synonyms_decide() -> None:
    # class 0 has one strong synonym among two; class 1 one query
    logits = torch.zeros(3, 1, 2)
    logits[:, 0, 0] = torch.tensor([0.0, 0.5, 0.4])  # synonym 1 of class 0 wins
    logits[:, 0, 1] = torch.tensor([0.0, 0.1, 0.4])  # class 1 wins
    labels, prob = predict(logits, torch.tensor([0, 0, 1]), 40.0, None, None)
    assert labels.tolist() == [[0, 1]]
    assert labels.dtype == torch.int64 and prob.dtype == torch.float32
    expected = torch.softmax(logits[:, 0, 0] * 40, 0).max()
    assert torch.isclose(prob[0, 0], expected)


def test_predict_prob_thd() -> None:
    logits = torch.zeros(3, 1, 3)
    logits[:, 0, 0] = torch.tensor([0.0, 0.2, 0.0])  # confident class 1
    logits[:, 0, 1] = torch.tensor([0.0, 0.01, 0.0])  # nearly uniform: winner ~0.34
    logits[:, 0, 2] = torch.tensor([0.0, 0.0, 0.3])  # confident class 2
    labels, prob = predict(logits, torch.arange(3), 40.0, 0.5, None)
    assert labels.tolist() == [[1, 0, 2]]
    assert 0.3 < prob[0, 1] < 0.5
    labels_no_thd, _ = predict(logits, torch.arange(3), 40.0, None, None)
    assert labels_no_thd.tolist() == [[1, 1, 2]]


def test_predict_area_thd() -> None:
    # 10 pixels: 1 background, 8 of class 1, 1 of class 2 (class 2 = 1/9 of foreground)
    logits = torch.zeros(3, 1, 10)
    logits[0, 0, 0] = 1.0
    logits[1, 0, 1:9] = 1.0
    logits[2, 0, 9] = 1.0
    logits[1, 0, 9] = 0.5  # runner-up at the class-2 pixel is class 1
    q2c = torch.arange(3)
    labels, prob = predict(logits, q2c, 10.0, None, 0.2)
    # class 2 area 1 <= 0.2 * 9 -> zeroed; its pixel goes to class 1
    assert labels.tolist() == [[0] + [1] * 9]
    expected = torch.softmax(logits[:, 0, 9] * 10, 0)[1]
    assert torch.isclose(prob[0, 9], expected)
    # threshold just below the share keeps it (strict ">" as in the reference)
    labels_keep, _ = predict(logits, q2c, 10.0, None, 0.1)
    assert labels_keep[0, 9] == 2
    # area_thd and prob_thd together: the zeroed pixel's runner-up prob is low -> background
    labels_both, _ = predict(logits, q2c, 10.0, 0.5, 0.2)
    assert labels_both[0, 9] == 0 and labels_both[0, 1] == 1


def test_predict_area_thd_never_drops_background() -> None:
    logits = torch.zeros(2, 1, 4)
    logits[0] = 1.0  # all background: no foreground area at all
    labels, _ = predict(logits, torch.arange(2), 10.0, None, 0.1)
    assert (labels == 0).all()


def test_predict_ties_pick_smaller_class() -> None:
    logits = torch.zeros(3, 2, 2)
    labels, prob = predict(logits, torch.arange(3), 40.0, None, None)
    assert (labels == 0).all()
    assert torch.allclose(prob, torch.full((2, 2), 1 / 3))


@pytest.mark.parametrize(
    "q2c, kwargs, match",
    [
        (torch.tensor([0, 2, 2]), {}, r"no query for classes \[1\]"),
        (torch.tensor([0, 1]), {}, r"query_to_class must be \(3,\)"),
        (torch.tensor([0.0, 1.0, 1.0]), {}, "int64"),
        (torch.tensor([0, 1, 1]), {"logit_scale": 0.0}, "logit_scale"),
        (torch.tensor([0, 1, 1]), {"prob_thd": 2.0}, "prob_thd"),
        (torch.tensor([0, 1, 1]), {"area_thd": -1.0}, "area_thd"),
    ],
)
def test_predict_bad_inputs(q2c: torch.Tensor, kwargs: dict, match: str) -> None:
    args = {"logit_scale": 40.0, "prob_thd": None, "area_thd": None} | kwargs
    with pytest.raises(ValueError, match=match):
        predict(torch.zeros(3, 2, 2), q2c, **args)
