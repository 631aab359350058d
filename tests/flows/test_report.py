"""flows.report: the HTML report over a real temporary store with real VOC sample images."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.report import RANDOM_BANNER, RANDOM_TAG, write_report
from ovseg_core.datasets import class_lines
from ovseg_core.vocabulary import parse_class_lines
from storage.images import load_label
from storage.keys import StageKey, canonical_json
from storage.store import Store
from storage.tables import read_table, write_table
from tests import browser

VOC = Path(__file__).resolve().parents[2] / "examples" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012"
STEMS = ["val_crop_0008", "val_crop_0000", "val_crop_0001"]  # ids sorted: ...0000, ...0001, ...0008
DS = "voc-sample"
NUM_CLASSES = 21
CORR_CFG = {"scope_reconstruction": True, "value_reconstruction": True, "spatial_branch": True, "tau": 0.25}


def _manifest_rows(voc: Path) -> list[dict]:
    rows = []
    for stem in STEMS:
        img = voc / "JPEGImages" / f"{stem}.jpg"
        w, h = Image.open(img).size
        rows.append({"dataset": DS, "image_id": f"{stem}-abc", "rel_path": f"JPEGImages/{stem}.jpg", "abs_path": str(img),
                     "gt_path": str(voc / "SegmentationClass" / f"{stem}.png"), "width": w, "height": h,
                     "content_sha256": "0" * 64, "status": "ok", "error": "", "file_stat": ""})
    return rows


def _metric_rows(experiment, run_id, method, key: StageKey, miou, random_weights, names):
    common = {"experiment": experiment, "run_id": run_id, "dataset": DS, "method": method, "images": len(STEMS),
              "images_total": len(STEMS), "complete": True, "gt_out_of_range": 0,
              "prediction_stage": key.stage, "prediction_key": key.key, "random_weights": random_weights,
              "params_json": canonical_json(key.payload())}
    rows = [{**common, "class_index": c, "class_name": names[c], "iou": (None if c == 20 else miou + 0.01 * (c % 3)),
             "acc": 0.5, "miou": None, "aacc": None} for c in range(NUM_CLASSES)]
    rows.append({**common, "class_index": -1, "class_name": "__summary__", "iou": None, "acc": None,
                 "miou": miou, "aacc": miou + 0.1})
    return rows


def _run_row(experiment, run_id, spec="VOC21"):
    t = datetime(2025, 1, 1, tzinfo=timezone.utc)
    cfg = {"name": experiment, "datasets": [{"name": DS, "spec": spec}]}
    return {"run_id": run_id, "experiment": experiment, "dataset": DS, "stage": "scoring", "key": "k", "params_json": "{}",
            "upstream_json": "{}", "code_version": "1", "weights_json": "null", "random_weights": False, "images_total": 3,
            "images_done": 3, "images_cached": 0, "images_skipped": 0, "images_failed": 0, "seconds": 1.0, "started": t,
            "ended": t, "config_json": json.dumps(cfg), "software_json": "{}", "status": "complete", "methods": ""}


@pytest.fixture()
def voc_store(tmp_path):
    """A store with a VOC manifest, three methods' predictions (one via map_correction) and metrics.

    Experiment ``ablate`` (random weights): ``full`` (reference, reconstruction), ``no-spatial``
    (spatial_branch off) and ``corr-mc`` (map_correction, whose key holds no config). An older
    run of ``full`` with another score must be ignored. Experiment ``real``: one method.
    """
    store = Store(tmp_path / "store")
    voc = tmp_path / "voc"
    shutil.copytree(VOC, voc)
    rows = _manifest_rows(voc)
    write_table(store, "manifests", DS, rows)
    names = parse_class_lines(class_lines("VOC21", "corrclip")).class_names
    rand = {"clip": {"name": "clip:tiny", "random": True}}
    k_full = StageKey("reconstruction", {"method": "corrclip", "config": CORR_CFG, "prob_thd": 0.2}, weights=rand)
    k_nosp = StageKey("reconstruction", {"method": "corrclip", "config": {**CORR_CFG, "spatial_branch": False},
                                         "prob_thd": 0.2}, weights=rand)
    k_mc = StageKey("map_correction", {"m0_quirk": True}, {"reconstruction": k_nosp.key})
    k_real = StageKey("reconstruction", {"method": "scclip", "config": {"anomaly_repair": True}})
    for r in rows:
        gt = load_label(r["gt_path"]).astype(np.int64)
        pred = np.where(gt == 255, 0, gt).astype(np.uint16)
        prob = np.ones(pred.shape, np.float32)
        for k in (k_full, k_nosp, k_mc, k_real):
            store.write_item(k, r["image_id"], {"labels": pred, "prob": prob})
    metrics = (_metric_rows("ablate", "20250101T000000Z-aaaaaa", "full", k_full, 0.9, True, names)
               + _metric_rows("ablate", "20250102T000000Z-bbbbbb", "full", k_full, 0.4712, True, names)
               + _metric_rows("ablate", "20250102T000000Z-bbbbbb", "no-spatial", k_nosp, 0.4212, True, names)
               + _metric_rows("ablate", "20250102T000000Z-bbbbbb", "corr-mc", k_mc, 0.5, True, names))
    write_table(store, "metrics", f"ablate--{DS}", metrics)
    write_table(store, "metrics", f"real--{DS}", _metric_rows("real", "20250103T000000Z-cccccc", "scclip-paper", k_real,
                                                               0.6345, False, names))
    write_table(store, "runs", "20250102T000000Z-bbbbbb", [_run_row("ablate", "20250102T000000Z-bbbbbb")])
    write_table(store, "runs", "20250103T000000Z-cccccc", [_run_row("real", "20250103T000000Z-cccccc")])
    return store, voc, rows


def _section(text: str, title: str) -> str:
    start = text.index(f"<h2>{title}")
    end = text.find("<h2>", start + 4)
    return text[start:end if end >= 0 else len(text)]


def test_report_contents(voc_store, tmp_path):
    store, _, rows = voc_store
    index = write_report(store.location, tmp_path / "out", samples=2)
    assert index == tmp_path / "out" / "index.html"
    text = index.read_text(encoding="utf-8")
    scores = _section(text, "1. Scores")
    # newest run only: 47.12 (not the older 90.00), aAcc = mIoU + 10 points
    assert "47.12" in scores and "57.12" in scores and "90.00" not in scores
    assert "42.12" in scores and "63.45" in scores and "73.45" in scores
    # random weights flagged in every section, and on the random rows only
    for title in ("1. Scores", "2. Per-class IoU", "3. Ablations", "4. Samples"):
        assert RANDOM_BANNER in _section(text, title), title
    real_row = next(r for r in scores.split("<tr") if "scclip-paper" in r)
    assert RANDOM_TAG not in real_row
    assert RANDOM_TAG in next(r for r in scores.split("<tr") if "no-spatial" in r)
    # ablation: the spatial_branch switch differs from the reference, with the mIoU delta
    abl = _section(text, "3. Ablations")
    nosp = next(r for r in abl.split("<tr") if "no-spatial" in r)
    assert "spatial_branch" in nosp and "-5.00" in nosp
    mc = next(r for r in abl.split("<tr") if "corr-mc" in r)  # config found through map_correction's upstream
    assert "spatial_branch" in mc and "+2.88" in mc
    assert "real —" not in abl  # single-method experiments are not ablations
    # samples: first 2 sorted ids, embedded images decode as PNGs
    samp = _section(text, "4. Samples")
    assert "is not complete" not in samp and "unavailable" not in samp
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == 1 + 2 * 2  # one IoU chart + 2 samples x 2 experiments
    for b64 in embedded:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    pngs = sorted((tmp_path / "out" / "figures").glob("*.png"))
    assert len(pngs) == len(embedded)
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    names = " ".join(p.name for p in pngs)
    assert "val_crop_0000" in names and "val_crop_0001" in names and "val_crop_0008" not in names


def test_report_experiment_filter_without_random_runs(voc_store, tmp_path):
    store, _, _ = voc_store
    text = write_report(store.location, tmp_path / "out", experiments=["real", "nope"], samples=1).read_text()
    assert "63.45" in text and "47.12" not in text
    assert RANDOM_BANNER not in text and RANDOM_TAG not in text
    assert "experiment 'nope' has no metrics and no recorded run" in html.unescape(text)


def test_report_degrades_on_moved_image_and_missing_prediction(voc_store, tmp_path):
    store, voc, rows = voc_store
    (voc / "JPEGImages" / "val_crop_0000.jpg").unlink()
    first = sorted(r["image_id"] for r in rows)[0]
    k_real = StageKey("reconstruction", {"method": "scclip", "config": {"anomaly_repair": True}})
    store.drop_items("reconstruction", k_real.key, [first], reason="test: a missing prediction")
    k_full = StageKey("reconstruction", {"method": "corrclip", "config": CORR_CFG, "prob_thd": 0.2},
                      weights={"clip": {"name": "clip:tiny", "random": True}})
    store.write_item(k_full, first, {"labels": np.zeros((7, 9), np.uint16)})
    text = write_report(store.location, tmp_path / "out", samples=1).read_text()
    samp = _section(text, "4. Samples")
    assert "input image unavailable" in samp and "no such file" in samp
    assert "prediction of scclip-paper unavailable" in samp
    assert "prediction of full is 9x7" not in samp  # the input is gone: nothing to compare the size with
    (voc / "JPEGImages" / "val_crop_0000.jpg").write_bytes((VOC / "JPEGImages" / "val_crop_0000.jpg").read_bytes())
    samp = _section(write_report(store.location, tmp_path / "out", samples=1).read_text(), "4. Samples")
    assert "prediction of full is 9x7 but the image is" in samp
    assert samp.count("data:image/png;base64,") == 2  # the figures are still drawn


def test_report_on_empty_store_and_unknown_spec(tmp_path, voc_store):
    index = write_report(str(tmp_path / "empty"), tmp_path / "out-empty")
    assert "no metrics and no predictions in this store yet" in index.read_text()
    store, _, _ = voc_store
    write_table(store, "runs", "20250104T000000Z-dddddd", [_run_row("real", "20250104T000000Z-dddddd", spec="NOPE")])
    text = write_report(store.location, tmp_path / "out", experiments=["real"], samples=1).read_text()
    assert "ground truth shown without label conversion" in text


def test_a_run_known_only_by_its_journal(voc_store, tmp_path):
    """The report a run writes at its end (``--report``) comes before the run's row of the runs table: the ground-truth
    conversion, the overrides and the datasets without ground truth come from its journal and the stage.json files."""
    store, voc, rows = voc_store
    run_id = "20250105T000000Z-eeeeee"
    names = parse_class_lines(class_lines("VOC21", "corrclip")).class_names
    k_pred = StageKey("reconstruction", {"method": "scclip", "config": {"anomaly_repair": False}})
    # scored as ADE20K would be: raw 0 ignored, every other value v is class v - 1 (a conversion VOC21 does not use)
    k_score = StageKey("scoring", {"spec": "ADE20K", "num_classes": 21, "conversion": "reduce_zero_label",
                                   "ignore_index": 255, "strict": False}, {"prediction": k_pred.key})
    k_text = StageKey("text_embeddings", {"classes": ["sky", "tree, wood"], "separator": ", "})
    k_photo = StageKey("reconstruction", {"method": "scclip", "config": {"anomaly_repair": False}, "other": 1})
    k_photo_score = StageKey("scoring", {"spec": "custom", "num_classes": 2, "conversion": "none", "ignore_index": 255,
                                         "strict": False}, {"prediction": k_photo.key})
    for k in (k_score, k_text, k_photo, k_photo_score):
        store.register_stage(k)
    for r in rows:
        gt = load_label(r["gt_path"]).astype(np.int64)
        store.write_item(k_pred, r["image_id"], {"labels": np.where(gt == 255, 0, gt).astype(np.uint16)})
    photos = [{**r, "dataset": "photos", "gt_path": ""} for r in rows[:1]]
    write_table(store, "manifests", "photos", photos)
    h, w = load_label(rows[0]["gt_path"]).shape
    store.write_item(k_photo, photos[0]["image_id"], {"labels": np.ones((h, w), np.uint16)})
    write_table(store, "metrics", f"live--{DS}", _metric_rows("live", run_id, "scclip", k_pred, 0.3, False, names))
    plan = [{"dataset": DS, "stage": "reconstruction", "key": k_pred.key, "methods": ["scclip"]},
            {"dataset": DS, "stage": "scoring", "key": k_score.key, "methods": ["scclip"]},
            {"dataset": "photos", "stage": "text_embeddings", "key": k_text.key, "methods": ["scclip"]},
            {"dataset": "photos", "stage": "reconstruction", "key": k_photo.key, "methods": ["scclip"]},
            {"dataset": "photos", "stage": "scoring", "key": k_photo_score.key, "methods": ["scclip"]}]
    journal = store.journal(run_id, {"experiment": "live", "overrides": ["methods.0.params.anomaly_repair=false"],
                                     "plan": plan}).start()
    try:
        text = write_report(store.location, tmp_path / "out", experiments=["live"], samples=1)
    finally:
        journal.finish("complete", 0)
    text = text.read_text(encoding="utf-8")
    assert "without label conversion" not in text
    (row,) = _table(text, "scores", "<h2>1. Scores")[1:]
    assert row[2] == "scclip" and row[8] == "methods.0.params.anomaly_repair=false"
    first = sorted(rows, key=lambda r: r["image_id"])[0]
    raw = np.unique(load_label(first["gt_path"]))
    samp = _section(text, "4. Samples")
    block = _group(samp, "live", DS)
    gt = _chips(block[block.index("In the ground truth"):block.index("Only in predictions")])
    assert gt == [f"{v - 1} {names[v - 1]}" for v in raw if v not in (0, 255)]  # names as the metrics table has them
    photo = _group(samp, "live", "photos")
    assert "has no ground truth" in html.unescape(photo) and _chips(photo) == ["1 tree"]


@pytest.mark.parametrize("samples", [-1, 1.5, True])
def test_report_rejects_bad_samples(tmp_path, samples):
    with pytest.raises(ValueError, match="samples must be"):
        write_report(str(tmp_path / "s"), tmp_path / "o", samples=samples)


# ----------------------------------------------------------------------------- a store built by the pipeline
ADE = Path(__file__).resolve().parents[2] / "examples" / "data" / "ade20k-sample"
CAMVID = Path(__file__).resolve().parents[2] / "examples" / "data" / "camvid-sample"
PHOTOS = "sky; tree; road, street; building"  # a custom vocabulary on a folder without ground truth
OVERRIDE = "methods.0.params.sim_threshold=0.5"
HOSTILE_EXP = "x\" onmouseover=\"alert('exp')"  # Prefect flow names refuse < > & / %: quotes are what can get through
HOSTILE_METHOD = "<script>alert(1)<\\script>"
CONTENT_WIDTH_PX = 1300 - 2 * 16  # the page's text column: body max-width minus its padding (report.css)


@dataclass
class PipelineStore:
    store: Store
    run_id: str  # the run of experiment "tiny-report"
    in_run_report: Path  # the report that run wrote at its end (``report_dir``), before its run record existed
    experiment: Any  # the "tiny-report" experiment


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory):
    """ADE20K (150 classes), VOC21 and a folder without ground truth (custom vocabulary) through the real pipeline
    with tiny random SC-CLIP, writing its report at the end; the same outputs again (all cached) under a hostile
    experiment and method name; and a run of experiment "tiny-override" with a ``--set`` override."""
    from flows.config import load_experiment
    from flows.pipeline import run_experiment
    from tests.flows.conftest import SAMPLE, tiny_experiment

    tmp = tmp_path_factory.mktemp("pipeline")
    store = tmp / "store"
    (tmp / "photos").mkdir()
    shutil.copy(CAMVID / "val" / "0016E5_07959.png", tmp / "photos" / "street.png")
    datasets = [{"name": "ade", "spec": "ADE20K", "layout": "ade20k", "root": str(ADE), "limit": 1},
                {"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"), "limit": 1},
                {"name": "photos", "layout": "folder", "root": str(tmp / "photos"), "classes": PHOTOS}]
    exp = tiny_experiment(store, name="tiny-report", datasets=datasets, text_templates="single",
                          methods=[{"name": "scclip", "method": "scclip"}])
    summary = run_experiment(exp, progress=False, report_dir=str(tmp / "in-run-report"))
    assert summary.failed == 0 and summary.report
    hostile = run_experiment(tiny_experiment(store, name=HOSTILE_EXP, datasets=datasets, text_templates="single",
                                             methods=[{"name": HOSTILE_METHOD, "method": "scclip"}]), progress=False)
    assert hostile.failed == 0
    exp_file = tmp / "override.yaml"
    exp_file.write_text(yaml.safe_dump({**exp.model_dump(mode="json"), "name": "tiny-override", "datasets": datasets[1:2]}))
    overridden = run_experiment(load_experiment(exp_file, overrides=[OVERRIDE]), progress=False)
    assert overridden.failed == 0
    return PipelineStore(Store(store), summary.run_id, Path(summary.report), exp)


def _report(store: Store, out: Path, **kw) -> str:
    return write_report(store.location, out, **kw).read_text(encoding="utf-8")


def _table(text: str, css_class: str, after: str) -> list[list[str]]:
    """Cells (tags stripped, unescaped) of the first ``<table class=css_class>`` after the text ``after``."""
    start = text.index(f'<table class="{css_class}">', text.index(after))
    body = text[start:text.index("</table>", start)]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def _css_px(text: str, selector: str) -> int:
    return int(re.search(re.escape(selector) + r"\{[^}]*font-size:(\d+)px", text).group(1))


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_150_classes_chart_fits_and_class_table_is_text(pipeline_store, tmp_path):
    store = pipeline_store.store
    text = _report(store, tmp_path / "out", experiments=["tiny-report"], samples=1)
    ade_names = parse_class_lines(class_lines("ADE20K", "scclip")).class_names
    assert len(ade_names) == 150
    rows = _table(text, "classes", "<h3>ade")
    assert rows[0][:3] == ["colour", "#", "class"]
    assert [(r[1], r[2]) for r in rows[1:]] == [(str(i), n) for i, n in enumerate(ade_names)]
    assert _css_px(text, "table") >= 12 and _css_px(text, ".chips") >= 12  # HTML text at >= 12 px, not 7 px in a PNG
    # the chart fits the text column (no sideways scrolling), with the red title at its top left
    with Image.open(tmp_path / "out" / "figures" / "iou_ade.png") as im:
        chart = np.asarray(im.convert("RGB")).astype(int)
    assert chart.shape[1] <= CONTENT_WIDTH_PX and chart.shape[0] > chart.shape[1] / 2  # wrapped into rows
    top_left = chart[:60, :400]
    red = (top_left[..., 0] > 150) & (top_left[..., 1] < 90) & (top_left[..., 2] < 90)
    assert red.sum() > 200  # "ade: per-class IoU  [random weights]" in red
    # the sample's classes are listed as text: exactly the ground truth's classes (ADE: raw v -> v - 1, 0 ignored)
    row = read_table(store, "manifests", ["ade"]).to_pylist()[0]
    raw = np.unique(np.asarray(Image.open(row["gt_path"])))
    expected = [f"{v - 1} {ade_names[v - 1]}" for v in raw if v != 0]
    samp = _section(text, "4. Samples")
    gt_block = samp[samp.index("In the ground truth"):samp.index("Only in predictions")]
    assert [html.unescape(re.sub(r"<[^>]+>", "", li)).strip() for li in re.findall(r"<li[^>]*>(.*?)</li>", gt_block)] \
        == expected
    assert f"In the ground truth ({len(expected)} classes)" in gt_block


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_class0_is_coloured_and_named(pipeline_store, tmp_path):
    store = pipeline_store.store
    text = _report(store, tmp_path / "out", experiments=["tiny-report"], samples=1)

    def swatch(after: str, label: str) -> str:
        start = text.index(after)
        return re.search(r'background:(#[0-9a-f]{6})"></span></td><td>0</td><td class="l">' + label, text[start:]).group(1)

    black, white, voc1 = "#000000", "#ffffff", "#800000"  # voc1: the published VOC colour of class 1 (128, 0, 0)
    # VOC21's class 0 is its background: white. ADE20K has no background class: wall (class 0) gets VOC colour 1,
    # like a first class, never white (unlabelled-looking) nor black (ignored)
    assert swatch("<h3>voc", "background") == white and swatch("<h3>ade", "wall") == voc1
    # the caption says which colour is which
    samp = _section(text, "4. Samples")
    assert f'background:{black}"></span>black = ignored pixels' in samp
    assert "white = class 0 (background)" in samp and "white = class 0 (wall)" not in samp
    assert "No background class: class 0 (wall) has a colour like every other class" in samp
    # the metrics table names VOC21's class 0 "sky" (older stores) or "background": the page says "background" either way
    stored = read_table(store, "metrics", ["tiny-report--voc"]).to_pylist()
    assert next(r["class_name"] for r in stored if r["class_index"] == 0) in ("sky", "background")
    copy = Store(shutil.copytree(store.location, tmp_path / "copy"))
    write_table(copy, "metrics", "tiny-report--voc", [{**r, "class_name": "background"} if r["class_index"] == 0 else r
                                                     for r in stored])
    rows = _table(_report(copy, tmp_path / "out2", experiments=["tiny-report"], samples=0), "classes", "<h3>voc")
    assert rows[1][1:3] == ["0", "background"] and rows[2][1:3] == ["1", "aeroplane"]


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_scores_table_has_run_id_and_date(pipeline_store, tmp_path):
    store, run_id = pipeline_store.store, pipeline_store.run_id
    text = _report(store, tmp_path / "out", experiments=["tiny-report"], samples=0)
    rows = _table(text, "scores", "<h2>1. Scores")
    header, body = rows[0], rows[1:]
    assert header == ["experiment", "dataset", "method", "mIoU", "aAcc", "images scored", "run id", "run date",
                      "overrides", "memory bank"]
    assert [(r[0], r[1], r[2]) for r in body] == [("tiny-report", "ade", f"scclip {RANDOM_TAG}"),
                                                   ("tiny-report", "voc", f"scclip {RANDOM_TAG}")]
    started = datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    for r in body:
        assert r[6] == run_id
        shown = datetime.strptime(r[7], "%Y-%m-%d %H:%M UTC").replace(tzinfo=timezone.utc)
        assert abs((shown - started).total_seconds()) < 120
        assert r[5] == "1 / 1"  # scored / images of the dataset
        assert r[8] == "—"  # no overrides
        assert r[9] == "–"  # no memory bank (SC-CLIP)
    assert 'class="rnd incomplete"' not in text and "rnd" in text


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_coverage_column_flags_incomplete_rows(pipeline_store, tmp_path):
    store = pipeline_store.store
    copy = Store(shutil.copytree(store.location, tmp_path / "copy"))
    ade = read_table(copy, "metrics", ["tiny-report--ade"]).to_pylist()
    voc = read_table(copy, "metrics", ["tiny-report--voc"]).to_pylist()
    write_table(copy, "metrics", "tiny-report--ade", [{**r, "images_total": 3, "complete": False} for r in ade])
    write_table(copy, "metrics", "tiny-report--voc", [{**r, "images_total": 1, "complete": True} for r in voc])
    text = _report(copy, tmp_path / "out", experiments=["tiny-report"], samples=0)
    body = {r[1]: r for r in _table(text, "scores", "<h2>1. Scores")[1:]}
    assert body["ade"][5] == "1 / 3 incomplete" and body["voc"][5] == "1 / 1"
    assert text.count('class="rnd incomplete"') == 1
    assert f"scclip {RANDOM_TAG}" == body["ade"][2]  # the random tag stays on flagged rows
    # a metrics table written before the columns existed reads back as images_total 0, complete False: not flagged
    write_table(copy, "metrics", "tiny-report--ade", [{**r, "images_total": 0, "complete": False} for r in ade])
    body = {r[1]: r for r in _table(_report(copy, tmp_path / "out2", experiments=["tiny-report"], samples=0), "scores",
                                    "<h2>1. Scores")[1:]}
    assert body["ade"][5] == "1"


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_hostile_names_are_escaped(pipeline_store, tmp_path):
    store = pipeline_store.store
    text = _report(store, tmp_path / "out", samples=1)
    assert "<script" not in text and "<img src=x" not in text
    assert text.count("<img ") == len(list((tmp_path / "out" / "figures").glob("*.png")))
    assert "&lt;script&gt;alert(1)&lt;\\script&gt;" in text
    assert 'onmouseover="' not in text and "x&#34; onmouseover=&#34;alert(&#39;exp&#39;)" in text
    rows = _table(text, "scores", "<h2>1. Scores")
    assert (HOSTILE_EXP, "ade", f"{HOSTILE_METHOD} {RANDOM_TAG}") in {(r[0], r[1], r[2]) for r in rows}
    for title in ("1. Scores", "2. Per-class IoU", "3. Ablations", "4. Samples"):
        assert RANDOM_BANNER in _section(text, title), title


def _chips(block: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", li)).strip() for li in re.findall(r"<li[^>]*>(.*?)</li>", block)]


def _group(samples: str, experiment: str, dataset: str) -> str:
    """The part of section 4 about one experiment's dataset."""
    start = samples.index(f"<h3>{experiment} — {dataset}")
    end = samples.find("<h3>", start + 4)
    return samples[start:end if end >= 0 else len(samples)]


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_the_report_written_by_the_run_converts_the_ground_truth(pipeline_store):
    """``ovseg run --report`` / ``make demo`` write the report before the run's record exists: the ground truth must
    still be converted as it is scored (ADE20K: reduce_zero_label; VOC21: 255 ignored, 0 = background)."""
    text = pipeline_store.in_run_report.read_text(encoding="utf-8")
    assert "without label conversion" not in text and "unknown" not in text
    samp = _section(text, "4. Samples")
    store = pipeline_store.store
    ade_names = parse_class_lines(class_lines("ADE20K", "scclip")).class_names
    voc_names = ["background", *parse_class_lines(class_lines("VOC21", "scclip")).class_names[1:]]
    for ds, expected in (("ade", lambda v: None if v == 0 else f"{v - 1} {ade_names[v - 1]}"),
                         ("voc", lambda v: None if v == 255 else f"{v} {voc_names[v]}")):
        (row,) = read_table(store, "manifests", [ds]).to_pylist()
        raw = np.unique(np.asarray(Image.open(row["gt_path"])))
        block = _group(samp, "tiny-report", ds)
        gt_block = block[block.index("In the ground truth"):block.index("Only in predictions")]
        want = [c for c in (expected(int(v)) for v in raw) if c is not None]
        assert _chips(gt_block) == want, ds
    # the ADE sample holds wall (raw 1): unconverted it would have read as "1 building"
    assert "0 wall" in _chips(_group(samp, "tiny-report", "ade"))


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
@pytest.mark.parametrize("written_by", ["run", "ovseg report"])
def test_a_dataset_without_ground_truth_shows_its_predictions(pipeline_store, tmp_path, written_by):
    from flows.graph import build_plan

    store = pipeline_store.store
    text = (pipeline_store.in_run_report.read_text(encoding="utf-8") if written_by == "run"
            else _report(store, tmp_path / "out", experiments=["tiny-report"]))
    assert "tiny-report — photos: has no ground truth: its predictions are shown, nothing is scored" \
        in html.unescape(_section(text, "1. Scores"))
    block = _group(_section(text, "4. Samples"), "tiny-report", "photos")
    assert RANDOM_TAG in block and "has no ground truth" in html.unescape(block)
    assert block.count("data:image/png;base64,") == 1 and "In the ground truth" not in block
    # the classes listed are exactly those of the stored prediction, named by the custom vocabulary
    plan = next(p for p in build_plan(pipeline_store.experiment) if p.dataset.name == "photos")
    node = plan.methods[0].prediction
    (row,) = read_table(store, "manifests", ["photos"]).to_pylist()
    labels = store.read_item(node.stage, node.key, row["image_id"], ["labels"])["labels"]
    names = ["sky", "tree", "road", "building"]
    assert _chips(block[block.index("In the predictions"):]) == [f"{v} {names[v]}" for v in np.unique(labels)]
    # a custom vocabulary has no background class: its class 0 (sky) is coloured like the others, not white
    assert "No background class: class 0 (sky)" in block
    swatches = re.findall(r'<li title="0 sky"><span class="sw" style="background:(#[0-9a-f]{6})"', block)
    assert swatches in ([], ["#800000"])  # listed only when predicted; then VOC colour 1, never white
    pngs = list((pipeline_store.in_run_report.parent if written_by == "run" else tmp_path / "out").glob(
        "figures/sample_tiny-report_photos_*.png"))
    assert len(pngs) == 1


@pytest.mark.slow  # the pipeline_store fixture runs three pipelines
def test_the_scores_table_shows_the_overrides_of_each_run(pipeline_store, tmp_path):
    text = _report(pipeline_store.store, tmp_path / "out", experiments=["tiny-report", "tiny-override"], samples=0)
    body = _table(text, "scores", "<h2>1. Scores")[1:]
    overrides = {(r[0], r[1]): r[8] for r in body}
    assert overrides == {("tiny-report", "ade"): "—", ("tiny-report", "voc"): "—", ("tiny-override", "voc"): OVERRIDE}


@pytest.mark.slow  # the pipeline_store fixture; chromium
@pytest.mark.skipif(not browser.available(), reason="chromium is not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("written_by", ["run", "ovseg report"])
def test_report_renders_in_headless_chromium(pipeline_store, tmp_path, written_by):
    """The page as a browser shows it: no console error, every image decodes, every dataset has its sections."""
    index = (pipeline_store.in_run_report if written_by == "run"
             else write_report(pipeline_store.store.location, tmp_path / "out"))
    shot = tmp_path / "shot.png"
    page = browser.render(index.resolve().as_uri(), screenshot=shot)
    assert page.errors == [] and page.console == []
    assert page.images == index.read_text(encoding="utf-8").count("<img ") > 0 and page.broken_images == 0
    assert [h for h in page.headings if h[:2] in ("1.", "2.", "3.", "4.")] == [
        "1. Scores (%)", "2. Per-class IoU", "3. Ablations", "4. Samples"]
    experiments = ["tiny-report"] if written_by == "run" else ["tiny-report", HOSTILE_EXP]
    for exp in experiments:
        for ds in ("ade", "voc", "photos"):
            assert f"{exp} — {ds} {RANDOM_TAG}" in page.headings, (exp, ds)
    for ds in ("ade", "voc"):  # the per-class charts of the scored datasets
        assert f"{ds} {RANDOM_TAG}" in page.headings
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[1] == 1400 and a.shape[0] == page.height
    red = (a[..., 0] > 180) & (a[..., 1] < 70) & (a[..., 2] < 70)
    assert red.sum() > 1000  # the random-weights banners are drawn


def test_the_ablations_survive_an_unreadable_reconstruction_stage_json(voc_store, tmp_path):
    """``corr-mc``'s config is found through its map_correction's reconstruction (``report_data.reconstruction_key``,
    the walk the bank column takes too); a read error on that reconstruction's ``stage.json`` leaves its config
    unknown (the row is no ablation) instead of stopping the report."""
    store, _, _ = voc_store
    k_nosp = StageKey("reconstruction", {"method": "corrclip", "config": {**CORR_CFG, "spatial_branch": False},
                                         "prob_thd": 0.2}, weights={"clip": {"name": "clip:tiny", "random": True}})
    path = Path(store.stage_dir("reconstruction", k_nosp.key)) / "stage.json"
    assert json.loads(path.read_text())["stage_key"]["params"]["config"]["spatial_branch"] is False
    path.unlink()
    path.mkdir()  # reading it is an OSError (IsADirectoryError), as an I/O error would be
    abl = _section(write_report(store.location, tmp_path / "out", samples=1).read_text(), "3. Ablations")
    assert "corr-mc" not in abl and "no-spatial" in abl  # no-spatial's own key still holds its config
