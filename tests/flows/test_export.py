"""``ovseg export``: PNGs from stored predictions, compared with the store's label maps and the VOC palette."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from flows.export import label_image, output_names
from flows.graph import build_plan
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore")

VOC_ROOT = str(SAMPLE / "voc2012-sample")


def voc_colour(i: int) -> tuple[int, int, int]:
    """The classic PASCAL VOC colormap (bitget over the class index), class 0 white as ovseg paints it."""
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
    exp = tiny_experiment(base / "store", text_templates="single", methods=[{"name": "scclip", "method": "scclip"}],
                          datasets=[{"name": "voc21", "spec": "VOC21", "layout": "voc", "root": VOC_ROOT, "limit": 2},
                                    {"name": "voc20", "spec": "VOC20", "layout": "voc", "root": VOC_ROOT, "limit": 1}])
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
    assert "3 PNG(s) written" in capsys.readouterr().out
    for dataset, offset in (("voc21", 0), ("voc20", 1)):  # VOC20 is scored with reduce_zero_label: ids from 1
        stored = _stored(exp_file, store, dataset)
        files = sorted((out / dataset / "scclip").glob("*.png"))
        assert [f.stem for f in files] == sorted(stored)
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
        np.testing.assert_allclose(blended, 0.5 * image + 0.5 * expected, atol=0.51)


def test_export_never_computes_and_lists_missing_predictions(computed, tmp_path, capsys):
    exp_file, store = computed
    before = sorted(p for p in store.rglob("*") if p.is_file())
    # another logit scale is another reconstruction key, never computed
    rc = main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--set", "methods.0.logit_scale=77", "-q"])
    assert rc == 3
    out = capsys.readouterr().out
    assert "0 PNG(s) written" in out and "3 image(s) have no complete prediction" in out
    assert "voc21 scclip JPEGImages/val_crop_0000.jpg" in out and "voc20 scclip JPEGImages/val_crop_0000.jpg" in out
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before
    assert not list(tmp_path.glob("x/**/*.png"))


def test_export_usage_errors_list_what_exists(computed, tmp_path, capsys):
    exp_file, store = computed
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--dataset", "voc", "-q"]) == 2
    assert "unknown dataset 'voc'; the experiment's datasets: voc21, voc20" in capsys.readouterr().err
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--method", "sclip", "-q"]) == 2
    assert "unknown method 'sclip'; the experiment's methods: scclip" in capsys.readouterr().err
    assert main(["export", str(exp_file), "--out", str(tmp_path / "x"), "--store", str(tmp_path / "nope")]) == 2
    assert "no ovseg store" in capsys.readouterr().err and not (tmp_path / "nope").exists()
