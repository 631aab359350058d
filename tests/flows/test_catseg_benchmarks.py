"""ADE-847 and PASCAL Context-459 in CAT-Seg's layouts (16-bit ``.tif`` labels, unlabelled 65535): listing,
ingestion, and scoring in both ignore modes end to end, against mmseg's ``IoUMetric`` formula computed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.config import parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.layouts import list_layout
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, computed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOC_JPEGS = sorted((SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[:2]
HW = (90, 120)


def _label(seed: int, num_classes: int) -> np.ndarray:
    """A 16-bit label map with real classes (255 among them), the unlabelled 65535 and the top class."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes, size=HW).astype(np.uint16)
    gt[:20, :30] = 255  # a real class of ADE-847 / PC-459 (the reference evaluator ignores it)
    gt[40:70, 50:90] = 65535  # unlabelled
    gt[-5:, -5:] = num_classes - 1
    return gt


def _write(img_dst: Path, gt_dst: Path, src: Path, gt: np.ndarray) -> None:
    img_dst.parent.mkdir(parents=True, exist_ok=True)
    gt_dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:  # a real photo, made small
        im.convert("RGB").resize(HW[::-1]).save(img_dst, quality=95)
    Image.fromarray(gt).save(gt_dst)  # mode I;16, TIFF
    assert Image.open(gt_dst).mode.startswith("I;16")


def make_ade847(root: Path) -> dict[str, np.ndarray]:
    base = root / "ADE20K_2021_17_01"
    gts = {}
    for k, src in enumerate(VOC_JPEGS):
        stem = f"ADE_val_{k:08d}"
        gts[stem] = _label(k, 847)
        _write(base / "images_detectron2" / "validation" / f"{stem}.jpg",
               base / "annotations_detectron2" / "validation" / f"{stem}.tif", src, gts[stem])
    return gts


def make_pc459(root: Path) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2010"
    gts = {}
    for k, src in enumerate(VOC_JPEGS):
        stem = f"2008_{k:06d}"
        gts[stem] = _label(10 + k, 459)
        _write(base / "JPEGImages" / f"{stem}.jpg", base / "annotations_detectron2" / "pc459_val" / f"{stem}.tif",
               src, gts[stem])
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(gts) + "\n")
    return gts


def test_layouts_list_the_catseg_files(tmp_path):
    ade = make_ade847(tmp_path / "ade")
    base, cands = list_layout("ade847", tmp_path / "ade", "val", None, False)
    assert base == tmp_path / "ade" / "ADE20K_2021_17_01"
    assert {c.rel_path: c.gt.relative_to(base).as_posix() for c in cands} == {
        f"images_detectron2/validation/{s}.jpg": f"annotations_detectron2/validation/{s}.tif" for s in ade}
    pc = make_pc459(tmp_path / "pc")
    base, cands = list_layout("pc459", tmp_path / "pc", "val", None, False)
    assert base == tmp_path / "pc" / "VOCdevkit" / "VOC2010"
    assert [(c.rel_path, c.gt.relative_to(base).as_posix()) for c in cands] == [
        (f"JPEGImages/{s}.jpg", f"annotations_detectron2/pc459_val/{s}.tif") for s in pc]  # split-file order
    with pytest.raises(FileNotFoundError, match=r"layout 'ade847': expected the directory .*images_detectron2"):
        list_layout("ade847", tmp_path / "pc", "val", None, False)
    with pytest.raises(FileNotFoundError, match=r"layout 'pc459': expected the split list .*SegmentationContext/test"):
        list_layout("pc459", tmp_path / "pc", "test", None, False)


def mmseg_iou(preds: list[np.ndarray], gts: list[np.ndarray], k: int, ignore: int) -> np.ndarray:
    """mmseg ``IoUMetric``: per image ``mask = gt != ignore``, histograms over ``[0, K-1]`` with K bins (values
    outside dropped, as ``torch.histc``), summed over the dataset; IoU = intersect / union (nan where 0)."""
    inter, area_p, area_g = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts):
        mask = gt != ignore
        p, g = pred[mask].astype(np.int64), gt[mask].astype(np.int64)
        hist = lambda x: np.histogram(x, bins=k, range=(0, k - 1))[0]  # noqa: E731
        inter += hist(p[p == g])
        area_p += hist(p)
        area_g += hist(g)
    union = area_p + area_g - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


@pytest.mark.parametrize("bench", ["ADE847", "PC459"])
def test_both_ignore_modes_score_as_the_formula(tmp_path, bench):
    layout, make, k = {"ADE847": ("ade847", make_ade847, 847), "PC459": ("pc459", make_pc459, 459)}[bench]
    gts = make(tmp_path / "data")
    entry = {"spec": bench, "layout": layout, "root": str(tmp_path / "data")}
    exp = parse_experiment({
        "name": "catseg", "store": str(tmp_path / "store"),
        "datasets": [{"name": "reference", **entry}, {"name": "unlabelled", **entry, "ignore_mode": "unlabelled"}],
        "models": {"clip": "clip:tiny@random:0"}, "methods": [{"name": "clip", "method": "clip"}],
        "text_templates": "single"})
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0
    # one prediction per image serves both modes; only the scoring differs
    assert computed(summary)["reconstruction"] == 2 and computed(summary)["scoring"] == 4
    plans = {p.dataset.name: p for p in build_plan(exp)}
    st = Store(tmp_path / "store")
    rows = read_table(st, "manifests", ["reference"]).to_pylist()
    pred_node = plans["reference"].methods[0].prediction
    preds, truth = [], []
    for r in rows:
        preds.append(st.read_item(pred_node.stage, pred_node.key, r["image_id"], ["labels"])["labels"])
        truth.append(gts[Path(r["abs_path"]).stem])
    for mode, ignore in (("reference", 255), ("unlabelled", 65535)):
        scoring = plans[mode].methods[0].scoring
        assert scoring.params.ignore_index == ignore
        got = {m["class_index"]: m["iou"] for m in summary.metrics if m["dataset"] == mode and m["class_index"] >= 0}
        want = mmseg_iou(preds, truth, k, ignore)
        assert len(got) == k
        np.testing.assert_allclose([np.nan if got[c] is None else got[c] for c in range(k)], want, rtol=1e-12)
    # reference: 255 never in a label area; unlabelled pixels count through their predictions
    ref = mmseg_iou(preds, truth, k, 255)
    unl = mmseg_iou(preds, truth, k, 65535)
    assert not np.allclose(np.nan_to_num(ref, nan=-1), np.nan_to_num(unl, nan=-1))
    out_of_range = {m["dataset"]: m["gt_out_of_range"] for m in summary.metrics if m["class_index"] == -1}
    assert out_of_range == {"reference": sum(int((g == 65535).sum()) for g in truth), "unlabelled": 0}
