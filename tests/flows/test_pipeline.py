"""The overnight flow on a real store with tiny real-architecture backbones and real sample images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flows.config import ExperimentError, parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, computed, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]  # whole flows through the pipeline and Prefect


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    exp = tiny_experiment(store)
    summary = run_experiment(exp, progress=False)
    return store, exp, summary


def test_first_run_computes_every_stage_and_scores(first_run):
    store, exp, summary = first_run
    assert summary.failed == 0
    assert computed(summary) == {
        "text_embeddings": 2, "sam_masks": 2, "dino_features": 2, "clip_layers": 4, "mask_clustering": 2,
        "mask_class_tokens": 2, "reconstruction": 4, "map_correction": 2, "scoring": 4,
    }
    summary_rows = [m for m in summary.metrics if m["class_index"] == -1]
    assert {m["method"] for m in summary_rows} == {"corrclip", "scclip"}
    assert all(m["random_weights"] for m in summary.metrics)
    metrics = read_table(Store(store), "metrics").to_pylist()
    assert len(metrics) == 2 * (21 + 1)
    runs = read_table(Store(store), "runs").to_pylist()
    assert {r["stage"] for r in runs} >= {"sam_masks", "reconstruction", "scoring"}
    assert all(r["random_weights"] for r in runs if r["stage"] in ("clip_layers", "dino_features"))
    assert '"clip:tiny@random:0"' in runs[0]["config_json"] or "clip:tiny@random:0" in runs[0]["config_json"]


def test_outputs_are_keyed_marked_and_attributed(first_run):
    store, exp, _ = first_run
    st = Store(store)
    plan = build_plan(exp)[0]
    ids = sorted(r["image_id"] for r in read_table(st, "manifests", ["voc"]).to_pylist())
    for node in plan.nodes.values():
        items = ["vocab"] if node.stage == "text_embeddings" else ids
        assert st.missing(node.stage, node.key, items) == [], node.stage
        attrs = st.item_attrs(node.stage, node.key, items[0])
        assert "software" in attrs["record"] and "seconds" in attrs
        # random weights anywhere upstream mark the output (superpixel regions use none)
        assert attrs["random_weights"] is attrs["record"]["random_weights"] is (node.stage != "sam_masks")
        assert st.stage_attrs(node.stage, node.key)["stage_key"]["code_version"]
    corr = next(m for m in plan.methods if m.method.name == "corrclip")
    pred = st.read_item(corr.prediction.stage, corr.prediction.key, ids[0])
    assert pred["labels"].shape == (513, 513) and pred["labels"].dtype == np.uint16
    assert int(pred["labels"].max()) < 21
    dino = next(n for n in plan.nodes.values() if n.stage == "dino_features")
    qk = st.read_item("dino_features", dino.key, ids[0])["qk"]
    assert qk.dtype == np.float16 and qk.shape[0] == 1 and qk.shape[1:3] == (42, 42)  # 336 crop / patch 8


def test_second_run_computes_nothing(first_run):
    store, exp, _ = first_run
    again = run_experiment(exp, progress=False)
    assert computed(again) == {}
    assert again.failed == 0
    assert sum(s.cached for s in again.stages) > 0


def test_parameter_change_recomputes_exactly_the_affected_stages(first_run, tmp_path):
    store, exp, _ = first_run
    methods = [{"name": "corrclip", "method": "corrclip", "params": {"tau": 3.0}}, {"name": "scclip", "method": "scclip"}]
    changed = tiny_experiment(store, methods=methods)
    summary = run_experiment(changed, progress=False)
    assert computed(summary) == {"reconstruction": 2, "map_correction": 2, "scoring": 2}


def test_region_parameter_change_recomputes_sam_and_its_dependants_only(first_run):
    store, exp, _ = first_run
    changed = tiny_experiment(store, regions={"source": "slic", "params": {"n_segments": 20}})
    summary = run_experiment(changed, progress=False)
    assert computed(summary) == {"sam_masks": 2, "mask_clustering": 2, "mask_class_tokens": 2, "reconstruction": 2,
                                 "map_correction": 2, "scoring": 2}


def test_dry_run_plans_without_computing(first_run, tmp_path):
    store, exp, _ = first_run
    plan = run_experiment(exp, dry_run=True, progress=False)
    assert plan.plan_only and all(s.done == 0 for s in plan.stages)
    fresh = run_experiment(tiny_experiment(tmp_path / "fresh"), dry_run=True, progress=False)
    assert all(s.done == s.total and s.cached == 0 for s in fresh.stages)
    assert not (tmp_path / "fresh").exists()  # a dry run writes nothing


def test_force_recomputes_a_stage_and_its_dependants(tmp_path):
    src = tmp_path / "store"
    exp = tiny_experiment(src, methods=[{"name": "corrclip", "method": "corrclip"}])
    run_experiment(exp, progress=False)
    summary = run_experiment(exp, force=["mask_clustering"], progress=False)
    assert computed(summary) == {"mask_clustering": 2, "mask_class_tokens": 2, "reconstruction": 2,
                                 "map_correction": 2, "scoring": 2}


def test_output_without_completion_record_is_recomputed(tmp_path):
    store = tmp_path / "store"
    exp = tiny_experiment(store, methods=[{"name": "scclip", "method": "scclip"}])
    run_experiment(exp, progress=False)
    st = Store(store)
    clip = next(n for n in build_plan(exp)[0].nodes.values() if n.stage == "clip_layers")
    items = sorted(st.complete_items("clip_layers", clip.key))
    before = {i: st.read_item("clip_layers", clip.key, i) for i in items}
    records = list((store / "stages" / "clip_layers" / clip.key / "records").iterdir())
    assert len(records) == 1  # one batch, one pack, one record
    records[0].unlink()  # as if the writer died between writing the pack and its record
    summary = run_experiment(exp, progress=False)
    assert computed(summary) == {"clip_layers": 2}
    fresh = Store(store)
    for i in items:
        after = fresh.read_item("clip_layers", clip.key, i)
        for k in before[i]:
            np.testing.assert_array_equal(before[i][k], after[k])


def test_bad_image_is_recorded_and_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    shutil.copy(src / "val_crop_0000.jpg", folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    exp = tiny_experiment(
        tmp_path / "store",
        datasets=[{"name": "mine", "layout": "folder", "root": str(folder), "classes": ["cat", "dog, puppy", "grass"]}],
        methods=[{"name": "scclip", "method": "scclip"}],
    )
    summary = run_experiment(exp, progress=False)
    ingest = [s for s in summary.stages if s.stage == "ingest"]
    assert ingest and ingest[0].failed == 1 and "broken.jpg" in ingest[0].failures[0][2]
    assert computed(summary) == {"text_embeddings": 1, "clip_layers": 1, "reconstruction": 1}
    fails = read_table(Store(tmp_path / "store"), "failures").to_pylist()
    assert any("broken" in f["image_id"] for f in fails)


def test_experiment_errors_name_the_key(tmp_path):
    base = tiny_experiment(tmp_path).model_dump()
    bad = dict(base, methods=[{"name": "x", "method": "corrclip", "tua": 1}])
    with pytest.raises(ExperimentError, match=r"methods\.0\.tua: unknown key"):
        parse_experiment(bad)
    bad = dict(base, runner={"kind": "slurm"})
    with pytest.raises(ExperimentError, match=r"runner\.kind"):
        parse_experiment(bad)
    bad = dict(base, methods=[{"name": "x", "method": "corrclip", "params": {"tau": -1.0}}])
    with pytest.raises(ValueError, match="tau"):
        build_plan(parse_experiment(bad))
    bad = dict(base, methods=[{"name": "x", "method": "corrclip", "params": {"tua": 1.0}}])
    with pytest.raises(ValueError, match=r"unknown key 'tua' \(did you mean 'tau'\?\)"):
        build_plan(parse_experiment(bad))
