"""Metrics: hand-computed confusion matrices, ignore pixels, empty classes, conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg_core.metrics import confusion_matrix, convert_labels, scores_from_confusion


def test_confusion_hand_computed_with_ignore() -> None:
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    expected = np.array(
        [
            [1, 1, 0],  # gt 0: one right, one predicted 1
            [0, 2, 0],  # gt 1: both right
            [1, 0, 0],  # gt 2: predicted 0; the ignored pixel (pred 2) is not counted
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
    with pytest.raises(ValueError, match=r"gt labels \[7\].*convert_labels"):
        confusion_matrix(np.zeros((2, 2), int), np.array([[0, 7], [1, 255]]), 3)
    with pytest.raises(ValueError, match=r"pred labels \[3\]"):
        confusion_matrix(np.array([[0, 3], [1, 2]]), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match="square"):
        scores_from_confusion(np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="non-negative"):
        scores_from_confusion(-np.ones((2, 2), int))
