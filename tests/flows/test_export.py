"""``ovseg export``: PNGs from stored predictions, compared with the store's label maps and the VOC palette."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from flows.export import _select, label_image, output_names
from flows.graph import build_plan
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore")

VOC_ROOT = str(SAMPLE / "voc2012-sample")


PHOTOS = ["sky", "tree", "road", "building"]  # a custom vocabulary: no background class


def voc_colour(i: int, background: bool = True) -> tuple[int, int, int]:
    """The classic PASCAL VOC colormap (bitget over the class index), class 0 white as ovseg paints a background
    class; without a background class, class i takes VOC colour i + 1."""
    if not background:
        return voc_colour(i + 1)
    if i == 0:
        return (255, 255, 255)
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return (r, g, b)


@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("export")
    (base / "photos").mkdir()
    photo = SAMPLE / "camvid-sample" / "val" / "0016E5_07959.png"
    (base / "photos" / "street.png").write_bytes(photo.read_bytes())
    exp = tiny_experiment(base / "store", text_templates="single", methods=[{"name": "scclip", "method": "scclip"}],
                          datasets=[{"name": "voc21", "spec": "VOC21", "layout": "voc", "root": VOC_ROOT, "limit": 2},
                                    {"name": "voc20", "spec": "VOC20", "layout": "voc", "root": VOC_ROOT, "limit": 1},
                                    {"name": "photos", "layout": "folder", "root": str(base / "photos"),
                                     "classes": "; ".join(PHOTOS)}])
    exp_file = base / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["run", str(exp_file), "-q", "--no-prefect"]) == 0
    return exp_file, base / "store"


def _stored(exp_file: Path, store: Path, dataset: str) -> dict[str, np.ndarray]:
    """Stored scclip labels per image base name."""
    from flows.config import load_experiment

    plan = next(p for p in build_plan(load_experiment(exp_file)) if p.dataset.name == dataset)
    node = plan.methods[0].prediction
    st = Store(store)
    rows = [r for r in read_table(st, "manifests", [dataset]).to_pylist() if r["status"] == "ok"]
    return {Path(r["rel_path"]).stem: st.read_item(node.stage, node.key, r["image_id"], ["labels"])["labels"]
            for r in rows}


def test_label_ids_as_mmseg_writes_them():
    labels = np.array([[0, 1], [149, 2]], dtype=np.int32)
    out = label_image(labels, 150, reduce_zero_label=True)  # ADE20K: ids 1..150
    assert out.dtype == np.uint8 and out.tolist() == [[1, 2], [150, 3]]
    out = label_image(labels, 150, reduce_zero_label=False)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1], [149, 2]]
    assert label_image(labels, 256, reduce_zero_label=False).dtype == np.uint8  # largest id 255
    wide = label_image(np.array([[0, 255]]), 256, reduce_zero_label=True)  # largest id 256
    assert wide.dtype == np.uint16 and wide.tolist() == [[1, 256]]
    big = label_image(np.array([[170, 0]]), 171, reduce_zero_label=False)
    assert big.dtype == np.uint8 and big.tolist() == [[170, 0]]


def test_output_names_keep_what_tells_images_apart():
    assert output_names(["JPEGImages/a.jpg", "JPEGImages/b.jpeg"]) == {"JPEGImages/a.jpg": "a.png",
                                                                       "JPEGImages/b.jpeg": "b.png"}
    assert output_names(["leftImg8bit/val/frankfurt/x.png", "leftImg8bit/val/munster/y.png"]) == {
        "leftImg8bit/val/frankfurt/x.png": "frankfurt/x.png", "leftImg8bit/val/munster/y.png": "munster/y.png"}
    assert output_names(["a.jpg", "sub/b.jpg"]) == {"a.jpg": "a.png", "sub/b.jpg": "sub/b.png"}


def test_export_labels_equal_the_stored_predictions(computed, tmp_path, capsys):
    exp_file, store = computed
    out = tmp_path / "labels"
    assert main(["export", str(exp_file), "--out", str(out), "-q"]) == 0
    assert "4 PNG(s) written" in capsys.readouterr().out
    # VOC20 is scored with reduce_zero_label: ids from 1; a custom vocabulary's ids start at 0
    for dataset, offset in (("voc21", 0), ("voc20", 1), ("photos", 0)):
        stored = _stored(exp_file, store, dataset)
        files = sorted((out / dataset / "scclip").glob("*.png"))
        assert [f.stem for f in files] == sorted(stored)
        assert not (out / dataset / "scclip.legend.png").exists()  # label ids need no legend
        for f in files:
            png = Image.open(f)
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), stored[f.stem].astype(np.int64) + offset)


def test_export_color_and_overlay_use_the_voc_palette(computed, tmp_path):
    exp_file, store = computed
    stored = _stored(exp_file, store, "voc21")
    assert main(["export", str(exp_file), "--out", str(tmp_path / "c"), "--format", "color", "--dataset", "voc21",
                 "-q"]) == 0
    assert main(["export", str(exp_file), "--out", str(tmp_path / "o"), "--format", "overlay", "--method", "scclip",
                 "--dataset", "voc21", "-q"]) == 0
    assert not (tmp_path / "c" / "voc20").exists()
    for stem, labels in stored.items():
        expected = np.array([voc_colour(int(i)) for i in labels.ravel()], dtype=np.uint8).reshape(*labels.shape, 3)
        colour = np.asarray(Image.open(tmp_path / "c" / "voc21" / "scclip" / f"{stem}.png").convert("RGB"))
        np.testing.assert_array_equal(colour, expected)
        image = np.asarray(Image.open(Path(VOC_ROOT) / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg")
                           .convert("RGB")).astype(np.float64)
        blended = np.asarray(Image.open(tmp_path / "o" / "voc21" / "scclip" / f"{stem}.png").convert("RGB"))
        h, w = labels.shape
        assert blended.shape[0] == h and blended.shape[1] > w  # the image, then its legend
        np.testing.assert_allclose(blended[:, :w], 0.5 * image + 0.5 * expected, atol=0.51)
        assert _legend_colours(blended[:, w:]) == [voc_colour(int(i)) for i in np.unique(labels)]


def _legend_colours(panel: np.ndarray) -> list[tuple[int, int, int]]:
    """Colours of a legend panel's swatches, column by column, top to bottom (a blank row ends a column)."""
    from flows.overlay import LEGEND_COLUMN_PX, LEGEND_ROW_PX

    out = []
    for left in range(0, panel.shape[1] - LEGEND_COLUMN_PX + 1, LEGEND_COLUMN_PX):
        for top in range(4, panel.shape[0] - LEGEND_ROW_PX + 1, LEGEND_ROW_PX):
            row = panel[top:top + LEGEND_ROW_PX, left:left + LEGEND_COLUMN_PX]
            if (row == 255).all():
                break
            out.append(tuple(int(v) for v in row[8, 12]))  # the swatch's centre
    return out


def test_export_of_a_custom_vocabulary_never_paints_a_class_white(computed, tmp_path):
    """"sky; tree; road; building": class 0 (sky) is a real class: it must not look unlabelled (white)."""
    exp_file, store = computed
    stored = _stored(exp_file, store, "photos")
    for fmt in ("color", "overlay"):
        assert main(["export", str(exp_file), "--out", str(tmp_path / fmt), "--format", fmt, "--dataset", "photos",
                     "-q"]) == 0
    (labels,) = stored.values()
    expected = np.array([voc_colour(int(i), background=False) for i in labels.ravel()], np.uint8).reshape(*labels.shape, 3)
    colour = np.asarray(Image.open(tmp_path / "color" / "photos" / "scclip" / "street.png").convert("RGB"))
    np.testing.assert_array_equal(colour, expected)
    assert not (colour == 255).all(axis=2).any()
    assert voc_colour(0, background=False) == (128, 0, 0)  # sky, wherever it is predicted
    blended = np.asarray(Image.open(tmp_path / "overlay" / "photos" / "scclip" / "street.png").convert("RGB"))
    assert _legend_colours(blended[:, labels.shape[1]:]) == [voc_colour(int(i), False) for i in np.unique(labels)]
    # every class of the vocabulary with its colour, beside the method's folder (never among the images)
    legend = np.asarray(Image.open(tmp_path / "color" / "photos" / "scclip.legend.png").convert("RGB"))
    assert _legend_colours(legend) == [voc_colour(i, background=False) for i in range(len(PHOTOS))]
    assert sorted(p.name for p in (tmp_path / "color" / "photos" / "scclip").iterdir()) == ["street.png"]


def test_export_never_computes_and_lists_missing_predictions(computed, tmp_path, capsys):
    exp_file, store = computed
    before = sorted(p for p in store.rglob("*") if p.is_file())
    # another logit scale is another reconstruction key, never computed
    rc = main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--set", "methods.0.logit_scale=77", "-q"])
    assert rc == 3
    out = capsys.readouterr().out
    assert "0 PNG(s) written" in out and "4 image(s) have no complete prediction" in out
    assert "voc21 scclip JPEGImages/val_crop_0000.jpg" in out and "voc20 scclip JPEGImages/val_crop_0000.jpg" in out
    assert "photos scclip street.png" in out
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before
    assert not list(tmp_path.glob("x/**/*.png"))


def test_export_usage_errors_list_what_exists(computed, tmp_path, capsys):
    exp_file, store = computed
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--dataset", "voc", "-q"]) == 2
    assert "unknown dataset 'voc' (did you mean 'voc21'?); the experiment's datasets: voc21, voc20, photos" \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown method 'corrclp' \(did you mean 'corrclip'\?\); the experiment's "
                                         r"methods: corrclip, scclip"):
        _select(["corrclp"], ["corrclip", "scclip"], "method")
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--method", "sclip", "-q"]) == 2
    assert "unknown method 'sclip' (did you mean 'scclip'?); the experiment's methods: scclip" in capsys.readouterr().err
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--store", str(tmp_path / "nope")]) == 2
    assert "no ovseg store" in capsys.readouterr().err and not (tmp_path / "nope").exists()
