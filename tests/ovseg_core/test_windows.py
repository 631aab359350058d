"""Window plan: hand-checked mmseg numbers, padding, cropping and merging with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.windows import (
    crop_window_labels,
    crop_windows,
    merge_window_logits,
    plan_windows,
    resize_image,
    resized_size,
)


def test_resized_size_hand_checked() -> None:
    assert resized_size((513, 513), 336) == (336, 336)
    # Cityscapes 1024x2048 at S=560: scale = min(2048/2048, 560/1024) -> 560x1120
    assert resized_size((1024, 2048), 560) == (560, 1120)
    # VOC 375x500 at 336: scale 0.896 -> 448.0 wide
    assert resized_size((375, 500), 336) == (336, 448)
    # long side cap wins: 100x5000 -> scale = min(2048/5000, 336/100) = 0.4096
    assert resized_size((100, 5000), 336) == (41, 2048)
    # rounding int(x + 0.5): 333x500 at 336 -> 500 * 336/333 = 504.5 -> 505
    assert resized_size((333, 500), 336) == (336, 505)


def test_single_window_voc() -> None:
    plan = plan_windows((513, 513), 336, 336, 112)
    assert plan.resized_hw == (336, 336)
    assert len(plan.windows) == 1
    w = plan.windows[0]
    assert (w.y1, w.x1, w.y2, w.x2, w.pad) == (0, 0, 336, 336, (0, 0, 0, 0))
    # 336 is already a multiple of 56: no padding in CorrCLIP mode either
    assert plan_windows((513, 513), 336, 336, 112, pad_multiple=56).padded_hw == (336, 336)


def test_cityscapes_grid() -> None:
    plan = plan_windows((1024, 2048), 560, 224, 112)
    assert plan.resized_hw == (560, 1120)
    assert plan.grid == (4, 9)
    assert len(plan.windows) == 36
    ys = sorted({w.y1 for w in plan.windows})
    xs = sorted({w.x1 for w in plan.windows})
    assert ys == [0, 112, 224, 336]
    assert xs == [112 * i for i in range(9)]
    last = plan.windows[-1]
    assert (last.y2, last.x2) == (560, 1120)
    assert plan.window_hw == (224, 224)
    assert all(w.y2 - w.y1 == 224 and w.x2 - w.x1 == 224 for w in plan.windows)


def test_last_window_snapped() -> None:
    # h = 500 after resize (short side 500): grids = (500 - 224 + 111) // 112 + 1 = 4
    plan = plan_windows((500, 700), 500, 224, 112)
    ys = sorted({w.y1 for w in plan.windows})
    assert ys == [0, 112, 224, 276]  # last one snapped: 500 - 224
    xs = sorted({w.x1 for w in plan.windows})
    # w = 700: grids = (700 - 224 + 111) // 112 + 1 = 6; last = 700 - 224 = 476
    assert xs == [0, 112, 224, 336, 448, 476]


def test_small_image_single_padded_window() -> None:
    plan = plan_windows((100, 50), 50, 224, 112, pad_multiple=56)
    assert plan.resized_hw == (100, 50)
    assert len(plan.windows) == 1
    w = plan.windows[0]
    assert (w.y1, w.x1, w.y2, w.x2) == (0, 0, 100, 50)
    # 100 -> 112 (6 + 6), 50 -> 56 (3 + 3), centred
    assert w.pad == (6, 6, 3, 3)
    assert plan.padded_hw == (112, 56)
    # odd padding: 45 -> 56 = 5 before, 6 after
    assert plan_windows((45, 45), 45, 224, 112, pad_multiple=56).windows[0].pad == (5, 6, 5, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(orig_hw=(0, 10), short_side=10, crop=5, stride=5), "orig_hw"),
        (dict(orig_hw=(10, 10), short_side=0, crop=5, stride=5), "short_side"),
        (dict(orig_hw=(10, 10), short_side=10, crop=0, stride=5), "crop"),
        (dict(orig_hw=(10, 10), short_side=10, crop=5, stride=6), "stride"),
        (dict(orig_hw=(10, 10), short_side=10, crop=5, stride=0), "stride"),
        (dict(orig_hw=(10, 10), short_side=10, crop=5, stride=5, pad_multiple=0), "pad_multiple"),
    ],
)
def test_plan_bad_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_windows(**kwargs)


def test_resize_image_matches_bilinear_and_uint8() -> None:
    img = torch.rand(3, 10, 20)
    out = resize_image(img, (5, 10))
    ref = F.interpolate(img[None], size=(5, 10), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out, ref)
    assert resize_image(img[None].repeat(2, 1, 1, 1), (5, 10)).shape == (2, 3, 5, 10)
    u8 = (img * 255).to(torch.uint8)
    out8 = resize_image(u8, (5, 10))
    assert out8.dtype == torch.uint8
    # 2x downsampling with half-pixel centres = mean of each 2x2 block
    blocks = u8.float().reshape(3, 5, 2, 10, 2).mean(dim=(2, 4))
    assert torch.allclose(out8.float(), blocks.round(), atol=1)
    with pytest.raises(ValueError, match="img must be"):
        resize_image(torch.rand(10, 20), (5, 5))


def test_crop_windows_content_and_padding() -> None:
    plan = plan_windows((100, 50), 50, 224, 112, pad_multiple=56)
    img = torch.arange(100 * 50, dtype=torch.float32).reshape(1, 100, 50).repeat(3, 1, 1) + 1
    crops = crop_windows(img, plan)
    assert crops.shape == (1, 3, 112, 56)
    assert torch.equal(crops[0, :, 6:106, 3:53], img)
    assert crops[0, :, :6].abs().sum() == 0 and crops[0, :, :, 53:].abs().sum() == 0
    labels = crop_window_labels(torch.ones(100, 50, dtype=torch.int64), plan)
    assert labels.shape == (1, 112, 56)
    assert (labels[0, :6] == -1).all() and (labels[0, 6:106, 3:53] == 1).all()
    with pytest.raises(ValueError, match="resized size"):
        crop_windows(torch.zeros(3, 10, 10), plan)
    with pytest.raises(ValueError, match="integer"):
        crop_window_labels(torch.zeros(100, 50), plan)


def test_crop_windows_positions() -> None:
    plan = plan_windows((500, 700), 500, 224, 112)
    img = torch.randn(2, 500, 700)
    crops = crop_windows(img, plan)
    assert crops.shape == (len(plan.windows), 2, 224, 224)
    for c, w in zip(crops, plan.windows):
        assert torch.equal(c, img[:, w.y1 : w.y2, w.x1 : w.x2])


def test_merge_counts_divide() -> None:
    # 1x336 strip: windows x1 = 0, 112 (crop 224, stride 112) -> middle third counted twice
    plan = plan_windows((224, 336), 224, 224, 112)
    assert plan.resized_hw == (224, 336) and len(plan.windows) == 2
    logits = torch.zeros(2, 1, 224, 224)
    logits[0] = 1.0
    logits[1] = 3.0
    merged = merge_window_logits(logits, plan)
    assert merged.shape == (1, 224, 336)
    assert torch.allclose(merged[0, :, :112], torch.tensor(1.0))
    assert torch.allclose(merged[0, :, 112:224], torch.tensor(2.0))
    assert torch.allclose(merged[0, :, 224:], torch.tensor(3.0))


def test_merge_roundtrip_with_padding_and_resize() -> None:
    # a constant-per-class map survives crop -> merge, including padding removal and resize back
    plan = plan_windows((300, 450), 200, 112, 56, pad_multiple=56)
    h, w = plan.resized_hw
    canvas = torch.randn(4, h, w)
    crops = crop_windows(canvas, plan, pad_value=1e6)  # padding must be cut off, never averaged in
    merged = merge_window_logits(crops, plan)
    assert merged.shape == (4, 300, 450)
    ref = F.interpolate(canvas[None], size=(300, 450), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(merged, ref, atol=1e-5)


def test_merge_padded_small_window() -> None:
    plan = plan_windows((100, 50), 50, 224, 112, pad_multiple=56)
    logits = torch.full((1, 2, 112, 56), 99.0)
    logits[0, :, 6:106, 3:53] = 5.0
    merged = merge_window_logits(logits, plan)
    assert merged.shape == (2, 100, 50)
    assert torch.allclose(merged, torch.tensor(5.0))


def test_merge_bad_shape() -> None:
    plan = plan_windows((224, 336), 224, 224, 112)
    with pytest.raises(ValueError, match="n_win=2"):
        merge_window_logits(torch.zeros(3, 1, 224, 224), plan)
    with pytest.raises(ValueError, match="floating"):
        merge_window_logits(torch.zeros(2, 1, 224, 224, dtype=torch.int64), plan)


def test_chunked_accumulation_equals_one_shot_merge():
    from ovseg_core.windows import accumulate_window_logits, finish_merge

    plan = plan_windows((300, 500), 336, 224, 112, pad_multiple=56)
    torch.manual_seed(0)
    logits = torch.randn(len(plan.windows), 3, *plan.padded_hw)
    canvas = torch.zeros(3, *plan.resized_hw)
    for start in range(0, len(plan.windows), 2):
        accumulate_window_logits(canvas, logits[start : start + 2], plan, start)
    torch.testing.assert_close(finish_merge(canvas, plan), merge_window_logits(logits, plan))
    with pytest.raises(ValueError, match="windows"):
        accumulate_window_logits(canvas, logits[:2], plan, len(plan.windows) - 1)


def test_half_precision_accumulation_follows_the_reference():
    # CorrCLIPv2's forward_slide: window logits .half(), summed into half `preds`, divided by a half
    # `count_mat`, resized to the original size in half precision
    from ovseg_core.windows import accumulate_window_logits, finish_merge

    plan = plan_windows((90, 160), 100, 64, 32, pad_multiple=56)
    torch.manual_seed(1)
    logits = torch.randn(len(plan.windows), 2, *plan.padded_hw) * 3
    canvas = torch.zeros(2, *plan.resized_hw, dtype=torch.float16)
    accumulate_window_logits(canvas, logits, plan)
    got = finish_merge(canvas, plan)
    preds = torch.zeros(2, *plan.resized_hw, dtype=torch.float16)
    count = torch.zeros(1, *plan.resized_hw, dtype=torch.float16)
    hp, wp = plan.padded_hw
    for i, w in enumerate(plan.windows):
        t, b, l, r = w.pad
        preds[:, w.y1:w.y2, w.x1:w.x2] += logits[i].half()[:, t:hp - b, l:wp - r]
        count[:, w.y1:w.y2, w.x1:w.x2] += 1
    expected = F.interpolate((preds / count)[None], size=plan.orig_hw, mode="bilinear")[0]
    assert got.dtype == torch.float16
    assert torch.equal(got, expected)
    # float32 (the default) is unchanged by the cast
    full = torch.zeros(2, *plan.resized_hw)
    accumulate_window_logits(full, logits, plan)
    torch.testing.assert_close(finish_merge(full, plan), merge_window_logits(logits, plan))
    assert (finish_merge(full, plan) - got.float()).abs().max() > 0
