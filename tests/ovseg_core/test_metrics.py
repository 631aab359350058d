"""Metrics: hand-computed confusion matrices, ignore pixels, empty classes, conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovseg_core.metrics import (
    IGNORE_MODES,
    confusion_matrix,
    convert_labels,
    out_of_range_count,
    scores_from_confusion,
    scoring_ignore_index,
)


def test_confusion_hand_computed_with_ignore() -> None:
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    expected = np.array(
        [
            [1, 1, 0],  # gt 0: one right, one predicted 1
            [0, 2, 0],  # gt 1: both right
            [1, 0, 0],  # gt 2: predicted 0; the ignored pixel (pred 2) is not counted
            [0, 0, 0],  # gt outside 0..2: none
        ]
    )
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)
    s = scores_from_confusion(conf)
    # IoU: class 0 = 1 / (2 + 2 - 1); class 1 = 2 / (2 + 3 - 2); class 2 = 0 / (1 + 0 - 0)
    np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 0.0])
    assert math.isclose(s["miou"], 1 / 3)
    assert math.isclose(s["aacc"], 3 / 5)
    np.testing.assert_allclose(s["acc"], [0.5, 1.0, 0.0])


def test_empty_class_is_nan_but_false_positive_counts() -> None:
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 0], [1, 2]])  # class 3 absent from both; class 2 only predicted
    s = scores_from_confusion(confusion_matrix(pred, gt, 4))
    assert math.isnan(s["iou"][3])
    assert s["iou"][2] == 0.0
    np.testing.assert_allclose(s["iou"][:3], [1.0, 0.5, 0.0])
    assert math.isclose(s["miou"], 0.5)  # nan-mean over 3 classes
    assert math.isnan(s["acc"][2]) and math.isnan(s["acc"][3])


def test_all_ignored_gives_nan_without_warning() -> None:
    conf = confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 255), 3)
    assert conf.sum() == 0
    with np.errstate(all="raise"):
        s = scores_from_confusion(conf)
    assert math.isnan(s["miou"]) and math.isnan(s["aacc"])


def test_dataset_split_in_two_parts_sums() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(40, 30))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=(40, 30))
    whole = confusion_matrix(pred, gt, 5)
    parts = confusion_matrix(pred[:17], gt[:17], 5) + confusion_matrix(pred[17:], gt[17:], 5)
    np.testing.assert_array_equal(whole, parts)
    assert whole.sum() == (gt != 255).sum()
    # dataset-level IoU is not the mean of per-image IoUs: scoring uses the summed matrix
    s = scores_from_confusion(whole)
    assert 0 < s["miou"] < 1


def test_reduce_zero_label() -> None:
    raw = np.array([[0, 1, 2], [150, 255, 0]], dtype=np.uint8)
    out = convert_labels(raw, "reduce_zero_label")
    np.testing.assert_array_equal(out, [[255, 0, 1], [149, 255, 255]])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(raw, [[0, 1, 2], [150, 255, 0]])  # input untouched
    # scored against a prediction: the raw-0 pixels are ignored
    pred = np.array([[5, 0, 1], [149, 3, 7]])
    conf = confusion_matrix(pred, out, 150)
    assert conf.sum() == 3 and conf.trace() == 3


def test_coco_object_conversion() -> None:
    raw = np.array([[0, 79, 80], [170, 255, 5]], dtype=np.uint8)
    out = convert_labels(raw, "coco_object")
    np.testing.assert_array_equal(out, [[1, 80, 0], [0, 0, 6]])
    # nothing is ignored: every pixel is scored over 81 classes
    assert confusion_matrix(np.zeros_like(out), out, 81).sum() == out.size


def test_camvid_and_none() -> None:
    raw = np.array([[0, 10, 11], [255, 3, 11]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_labels(raw, "camvid"), [[0, 10, 255], [255, 3, 255]])
    np.testing.assert_array_equal(convert_labels(raw, "none"), raw)
    np.testing.assert_array_equal(convert_labels(raw, "camvid", ignore_index=99), [[0, 10, 99], [255, 3, 99]])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="conversion must be one of"):
        convert_labels(np.zeros((2, 2), int), "voc")
    with pytest.raises(ValueError, match="integer numpy array"):
        convert_labels(np.zeros((2, 2)), "none")
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError, match=r"gt labels \[-1, 7\].*convert_labels"):
        confusion_matrix(np.zeros((2, 2), int), np.array([[-1, 7], [1, 255]]), 3, strict=True)
    with pytest.raises(ValueError, match=r"pred labels \[3\]"):
        confusion_matrix(np.array([[0, 3], [1, 2]]), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match=r"\(K \+ 1, K\)"):
        scores_from_confusion(np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="non-negative"):
        scores_from_confusion(-np.ones((2, 2), int))


def _mmseg_intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int):
    """mmseg IoUMetric.intersect_and_union, written out with torch.histc."""
    pred_t, label_t = torch.from_numpy(pred), torch.from_numpy(label)
    mask = label_t != ignore_index
    pred_t, label_t = pred_t[mask], label_t[mask]
    intersect = pred_t[pred_t == label_t]
    hist = lambda x: torch.histc(x.float(), bins=num_classes, min=0, max=num_classes - 1)  # noqa: E731
    area_intersect, area_pred, area_label = hist(intersect), hist(pred_t), hist(label_t)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def test_out_of_range_ground_truth_is_scored_as_mmseg() -> None:
    rng = np.random.default_rng(3)
    k = 5
    totals = [torch.zeros(k) for _ in range(4)]
    conf = np.zeros((k + 1, k), dtype=np.int64)
    for _ in range(3):
        gt = rng.integers(0, k, size=(20, 30))
        gt[rng.random(gt.shape) < 0.1] = 255
        outside = rng.random(gt.shape) < 0.15
        gt[outside] = rng.choice([-1, 5, 7, 254], size=int(outside.sum()))  # not in 0..4, not ignore
        pred = rng.integers(0, k, size=gt.shape)
        for total, part in zip(totals, _mmseg_intersect_and_union(pred, gt, k, 255)):
            total += part
        conf += confusion_matrix(pred, gt, k)
    intersect, union, _, label = (t.double().numpy() for t in totals)
    s = scores_from_confusion(conf)
    np.testing.assert_allclose(s["iou"], intersect / union)
    np.testing.assert_allclose(s["acc"], intersect / label)
    assert s["aacc"] == pytest.approx(intersect.sum() / label.sum())
    assert s["miou"] == pytest.approx(np.nanmean(intersect / union))
    assert s["out_of_range"] == out_of_range_count(conf) == conf[k].sum() > 0
    # the out-of-range pixels' predictions are in the union: dropping them would raise IoU
    assert (s["iou"] < scores_from_confusion(conf[:k])["iou"]).all()


def test_out_of_range_hand_computed() -> None:
    gt = np.array([[0, 9], [1, 255]])
    pred = np.array([[0, 1], [1, 0]])
    conf = confusion_matrix(pred, gt, 2)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 1], [0, 1]])  # gt 9 predicted 1 -> row 2
    s = scores_from_confusion(conf)
    np.testing.assert_allclose(s["iou"], [1.0, 0.5])  # class 1: intersect 1, union 1 + 2 - 1
    assert s["aacc"] == 1.0 and out_of_range_count(conf) == 1
    assert out_of_range_count(conf[:2]) == 0


# --- 16-bit labels (ADE-847 / PC-459): the reference evaluator ignores 255, not 65535 ------------

K300 = 300  # enough classes for 255 to be a real class
GT16 = np.array([[255, 255, 65535, 3], [3, 65535, 299, 0]], dtype=np.uint16)
PRED16 = np.array([[255, 3, 7, 3], [0, 255, 299, 0]], dtype=np.int64)


def test_scoring_ignore_index_modes() -> None:
    assert IGNORE_MODES == ("reference", "unlabelled")
    assert scoring_ignore_index(255, 65535) == 255
    assert scoring_ignore_index(255, 65535, "unlabelled") == 65535
    assert scoring_ignore_index(255, None, "unlabelled") == 255  # datasets without their own value
    with pytest.raises(ValueError, match="ignore mode must be one of"):
        scoring_ignore_index(255, None, "correct")


def test_reference_mode_hand_computed() -> None:
    gt = convert_labels(GT16, "none")
    s = scores_from_confusion(confusion_matrix(PRED16, gt, K300, scoring_ignore_index(255, 65535)))
    # ignored: both gt-255 pixels. gt 65535 (pred 7, pred 255): only their predictions count.
    # class 0: I 1, label 1, pred 2 -> 1/2; class 3: I 1, label 2, pred 1 -> 1/2; class 299: 1/1;
    # class 7: pred 1 -> 0; class 255: pred 1 -> 0; every other class nan.
    expected = {0: 0.5, 3: 0.5, 7: 0.0, 255: 0.0, 299: 1.0}
    assert {int(i): float(v) for i, v in enumerate(s["iou"]) if not np.isnan(v)} == expected
    assert math.isclose(s["miou"], 0.4)
    assert math.isclose(s["aacc"], 3 / 4)
    assert s["out_of_range"] == 2


def test_unlabelled_mode_hand_computed() -> None:
    gt = convert_labels(GT16, "none")
    s = scores_from_confusion(confusion_matrix(PRED16, gt, K300, scoring_ignore_index(255, 65535, "unlabelled")))
    # ignored: both gt-65535 pixels. class 255 is scored: I 1, label 2, pred 1 -> 1/2;
    # class 3: I 1, label 2, pred 2 -> 1/3; class 0: 1/2; class 299: 1; class 7 now never predicted -> nan.
    expected = {0: 0.5, 3: 1 / 3, 255: 0.5, 299: 1.0}
    got = {int(i): float(v) for i, v in enumerate(s["iou"]) if not np.isnan(v)}
    assert got.keys() == expected.keys() and all(math.isclose(got[k], expected[k]) for k in got)
    assert math.isclose(s["miou"], (0.5 + 1 / 3 + 0.5 + 1.0) / 4)
    assert math.isclose(s["aacc"], 4 / 6)
    assert s["out_of_range"] == 0


@pytest.mark.parametrize("k", [847, 459])
def test_reference_mode_equals_mmseg_on_catseg_labels(k: int) -> None:
    rng = np.random.default_rng(k)
    totals = [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
    conf = np.zeros((k + 1, k), dtype=np.int64)
    for _ in range(3):  # a dataset of three images, accumulated as the metric does
        gt = rng.integers(0, k, size=(30, 40)).astype(np.uint16)
        gt[rng.random(gt.shape) < 0.2] = 65535
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.5, gt.astype(np.int64), rng.integers(0, k, size=gt.shape))
        pred[gt == 65535] = rng.integers(0, k, size=int((gt == 65535).sum()))
        # the reference reads labels as uint16 and casts them to the prediction's int64; its metric ignores 255
        for t, a in zip(totals, _mmseg_intersect_and_union(pred, gt.astype(np.int64), k, 255)):
            t += a.double()
        conf += confusion_matrix(pred, convert_labels(gt, "none"), k, scoring_ignore_index(255, 65535))
    s = scores_from_confusion(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        mmseg_iou = (totals[0] / totals[1]).numpy()
    np.testing.assert_allclose(s["iou"], mmseg_iou, equal_nan=True)
    assert math.isclose(s["aacc"], float(totals[0].sum() / totals[3].sum()))
