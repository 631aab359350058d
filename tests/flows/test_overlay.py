"""flows.overlay: VOC palette, colourising, blending and legend handles."""

from __future__ import annotations

import numpy as np
import pytest

from flows.overlay import (
    IGNORE_COLOR,
    LEGEND_ROW_PX,
    class_color,
    colorize,
    has_background,
    legend_panel,
    legend_patches,
    overlay,
    overlay_with_legend,
    palette,
)

VOC1, VOC2, VOC3 = [128, 0, 0], [0, 128, 0], [128, 128, 0]  # the published VOC colours of classes 1, 2, 3


def test_palette_matches_voc_colours():
    pal = palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    # the published VOC colours: aeroplane, bicycle, bird, boat, person (15), tvmonitor (20)
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0]
    assert pal[4].tolist() == [0, 0, 128]
    assert pal[15].tolist() == [192, 128, 128]
    assert pal[20].tolist() == [0, 64, 128]
    assert pal[255].tolist() == [224, 224, 192]  # VOC's own border colour; colorize paints it black


def test_class0_is_white_never_the_ignore_black():
    # VOC paints class 0 black, the colour of ignored pixels; here class 0 is white and no other class is
    pal = palette(1 << 12)
    assert pal[0].tolist() == [255, 255, 255]
    assert not (pal[1:] == 255).all(axis=1).any()
    assert IGNORE_COLOR == (0, 0, 0) and class_color(0) == (255, 255, 255)
    rgb = colorize(np.array([[0, 255]], np.uint8))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]
    assert colorize(np.array([[0]]), ignore_index=None)[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_allclose(legend_patches(["background"], [0])[0].get_facecolor()[:3], [1.0, 1.0, 1.0])


def test_without_a_background_class_class0_is_coloured_like_any_class():
    # a custom vocabulary ("sky; tree; road") or ADE20K (class 0 = wall): an all-class-0 map must not look unlabelled
    # (white) nor ignored (black): class i takes VOC colour i + 1
    pal = palette(1 << 12, background=False)
    assert pal[:3].tolist() == [VOC1, VOC2, VOC3]
    np.testing.assert_array_equal(pal[:-1], palette(1 << 12)[1:])
    assert not (pal == 255).all(axis=1).any() and not (pal == 0).all(axis=1).any()
    sky = colorize(np.zeros((2, 2), np.int64), ignore_index=None, background=False)
    assert (sky.reshape(-1, 3) == VOC1).all()
    assert class_color(0, background=False) == tuple(VOC1) and class_color(255, background=False) == (0, 0, 0)
    img = np.full((1, 1, 3), 100, np.uint8)
    assert overlay(img, np.zeros((1, 1), np.int64), 0.5, background=False)[0, 0].tolist() == [114, 50, 50]
    # legends follow the vocabulary: class 0 named "background" is white, any other class 0 is not
    assert has_background(["Background ", "cat"]) and not has_background(["sky", "tree"]) and not has_background([])
    np.testing.assert_allclose(legend_patches(["sky", "tree"], [0])[0].get_facecolor()[:3], np.array(VOC1) / 255.0)
    np.testing.assert_allclose(legend_patches(["wall"], [0])[0].get_facecolor()[:3], np.array(VOC1) / 255.0)


def _swatch(panel: np.ndarray, row: int, column: int = 0) -> list[int]:
    """Centre pixel of the colour swatch of one legend entry."""
    return panel[4 + row * LEGEND_ROW_PX + 8, 6 + column * 190 + 6].tolist()


def test_legend_panel_lists_the_classes_present_with_their_colours():
    names = ["sky", "tree", "road", "building"]
    panel = legend_panel(names, [3, 0, 3, 255], height=100)
    assert panel.dtype == np.uint8 and panel.shape == (100, 190, 3)
    assert _swatch(panel, 0) == VOC1 and _swatch(panel, 1) == [0, 0, 128]  # sky (class 0), building (class 3)
    assert (panel[4 + 2 * LEGEND_ROW_PX:, :] == 255).all()  # two entries: the ignore index is not listed
    tall = legend_panel(names, range(4), height=2 * LEGEND_ROW_PX + 8)  # 2 rows per column: 2 columns
    assert tall.shape[1] == 2 * 190 and _swatch(tall, 0, 1) == VOC3
    voc = legend_panel(["background", "aeroplane"], [0, 1], height=60)
    assert _swatch(voc, 0) == [255, 255, 255] and _swatch(voc, 1) == VOC1


def test_overlay_with_legend_keeps_the_overlay_and_adds_the_legend():
    img = np.full((60, 30, 3), 100, np.uint8)
    labels = np.zeros((60, 30), np.int64)
    labels[:, 15:] = 2
    out = overlay_with_legend(img, labels, ["sky", "tree", "road"], alpha=0.5)
    assert out.shape == (60, 30 + 190, 3)  # 60 px hold 2 legend rows: one column
    np.testing.assert_array_equal(out[:, :30], overlay(img, labels, 0.5, background=False))
    assert out[0, 0].tolist() == [114, 50, 50]  # sky: 0.5 * 100 + 0.5 * VOC1, never white
    assert _swatch(out[:, 30:], 0) == VOC1 and _swatch(out[:, 30:], 1) == VOC3
    short = overlay_with_legend(img[:5], labels[:5], ["sky", "tree", "road"])
    assert short.shape == (LEGEND_ROW_PX + 8, 30 + 2 * 190, 3) and (short[5:, :30] == 255).all()  # 1 row per column


def test_palette_is_distinct_and_extends_past_256():
    pal = palette(1000)
    assert len({tuple(c) for c in pal.tolist()}) == 1000
    np.testing.assert_array_equal(pal[:256], palette(256))


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_palette_rejects_bad_length(n):
    with pytest.raises(ValueError, match="n must be"):
        palette(n)


def test_colorize_lookup_and_ignore_black():
    labels = np.array([[0, 1, 255], [15, 300, 2]], dtype=np.uint16)
    rgb = colorize(labels)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [128, 0, 0]
    assert rgb[0, 2].tolist() == [0, 0, 0]
    assert rgb[1, 0].tolist() == [192, 128, 128]
    assert rgb[1, 1].tolist() == palette(301)[300].tolist()
    assert colorize(labels, ignore_index=None)[0, 2].tolist() == [224, 224, 192]
    assert class_color(255) == (0, 0, 0) and class_color(1) == (128, 0, 0)


@pytest.mark.parametrize(
    "labels",
    [np.zeros((2, 2), np.float32), np.zeros((2, 2, 1), np.int64), np.array([[0, -1]]), [[0, 1]]],
)
def test_colorize_rejects_bad_labels(labels):
    with pytest.raises(ValueError, match="labels must be"):
        colorize(labels)


def test_overlay_blends_with_known_values():
    img = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[1, 0], [255, 2]], np.int32)
    out = overlay(img, labels, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [114, 50, 50]  # 0.5 * 100 + 0.5 * (128, 0, 0)
    assert out[1, 0].tolist() == [50, 50, 50]  # ignore: blended with black
    assert out[0, 1].tolist() == [178, 178, 178]  # class 0: 0.5 * 100 + 0.5 * 255 = 177.5, rounded to even
    np.testing.assert_array_equal(overlay(img, labels, alpha=0.0), img)
    np.testing.assert_array_equal(overlay(img, labels, alpha=1.0), colorize(labels))


def test_overlay_rejects_bad_inputs():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match image shape"):
        overlay(img, np.zeros((4, 5), np.int64))
    with pytest.raises(ValueError, match="alpha must be"):
        overlay(img, np.zeros((4, 4), np.int64), alpha=1.5)
    with pytest.raises(ValueError, match="image_rgb must be"):
        overlay(img.astype(np.float32), np.zeros((4, 4), np.int64))


def test_legend_patches_present_classes_only():
    names = ["background", "aeroplane", "bicycle"]
    handles = legend_patches(names, [2, 0, 2, 255, 7])
    assert [h.get_label() for h in handles] == ["0 background", "2 bicycle", "7 7"]
    np.testing.assert_allclose(handles[1].get_facecolor()[:3], np.array([0, 128, 0]) / 255.0)
    assert legend_patches(names, []) == []
    with pytest.raises(ValueError, match="must be >= 0"):
        legend_patches(names, [-1])
