"""Fused stage chains (``tasks.chain``, ``flows.fused``): the same outputs as stage by stage, only the missing
stages on a rerun, and each image decoded once by a cold run's stages."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg_core.clip_ops
import storage.ingest
import tasks.common
import tasks.scoring
from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.conftest import SAMPLE, assert_same_outputs, computed, store_snapshot, tiny_experiment

METHODS = [{"name": "corrclip", "method": "corrclip"}, {"name": "scclip", "method": "scclip"}]
STAGE_BY_STAGE = {"kind": "local", "workers": 1, "batch_size": 8, "fuse": False}


def _attrs(store: Path) -> dict:
    """Every complete item's attrs without its timing and its pack's record (run id): ``{(stage, key, item): attrs}``."""
    st = Store(store)
    out = {}
    for s, k in st.stage_sets():
        for i in st.complete_items(s, k):
            attrs = st.item_attrs(s, k, i)
            attrs.pop("seconds", None)
            attrs.pop("record", None)
            out[(s, k, i)] = attrs
    return out


def _packs(store: Path) -> Counter:
    """Files per stage output set (packs, completion records, index)."""
    return Counter("/".join(p.relative_to(store / "stages").parts[:2]) + ":" + p.suffix
                   for p in (store / "stages").rglob("*") if p.is_file())


@pytest.mark.slow
def test_fused_outputs_are_bit_identical_to_stage_by_stage(tmp_path):
    fused = run_experiment(tiny_experiment(tmp_path / "fused", methods=METHODS), progress=False, orchestrate=False)
    plain = run_experiment(tiny_experiment(tmp_path / "plain", methods=METHODS, runner=STAGE_BY_STAGE),
                           progress=False, orchestrate=False)
    assert fused.status == plain.status == "complete"
    assert [(s.stage, s.key, s.done, s.cached, s.failed) for s in fused.stages] == \
        [(s.stage, s.key, s.done, s.cached, s.failed) for s in plain.stages]
    a, b = store_snapshot(tmp_path / "fused"), store_snapshot(tmp_path / "plain")
    assert sum(s != "text_embeddings" for s, _, _ in a) == 2 * 11  # 11 per-image stage outputs of both images
    assert_same_outputs(a, b)
    assert _attrs(tmp_path / "fused") == _attrs(tmp_path / "plain")
    assert _packs(tmp_path / "fused") == _packs(tmp_path / "plain")  # one pack and record per batch and stage output
    assert [{k: v for k, v in m.items() if k != "run_id"} for m in fused.metrics] == \
        [{k: v for k, v in m.items() if k != "run_id"} for m in plain.metrics]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mask_class_tokens", "clip_layers", "sam_masks"])
def test_rerun_after_deleting_one_stage_computes_only_that_stage(tmp_path, stage):
    exp = tiny_experiment(tmp_path / "store", methods=METHODS)
    assert run_experiment(exp, progress=False, orchestrate=False).status == "complete"
    before = store_snapshot(tmp_path / "store")
    st = Store(tmp_path / "store")
    sets = [(s, k) for s, k in st.stage_sets() if s == stage]
    for s, k in sets:
        st.drop_items(s, k, sorted(st.complete_items(s, k)), reason="test")
    again = run_experiment(exp, progress=False, orchestrate=False)
    assert again.status == "complete"
    assert computed(again) == {stage: 2 * len(sets)}  # its items of every output set of the stage, nothing else
    assert_same_outputs(store_snapshot(tmp_path / "store"), before)


def _counting(monkeypatch, module, name: str, counts: Counter, tag: str) -> None:
    """Count the calls of the real ``module.name`` per (tag, file) and still run it."""
    real = getattr(module, name)

    def counted(path, *args, **kwargs):
        counts[(tag, Path(path).name)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.slow
def test_cold_corrclip_run_decodes_each_image_once_in_its_stages(tmp_path, monkeypatch):
    counts: Counter = Counter()
    _counting(monkeypatch, tasks.common, "load_rgb", counts, "stage image")
    _counting(monkeypatch, tasks.scoring, "load_label", counts, "stage gt")
    _counting(monkeypatch, storage.ingest, "load_rgb", counts, "ingest image")
    _counting(monkeypatch, storage.ingest, "load_label", counts, "ingest gt")
    exp = tiny_experiment(tmp_path / "store", methods=[{"name": "corrclip", "method": "corrclip"}])
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.status == "complete"
    assert computed(summary)["mask_class_tokens"] == 2  # sam_masks, dino, clip, semantic branch: four image readers
    images = {f for tag, f in counts if tag == "stage image"}
    gts = {f for tag, f in counts if tag == "stage gt"}
    assert len(images) == len(gts) == 2  # the two images of the run (ingest also reads the sample's other files)
    assert {f: counts[("stage image", f)] for f in images} == {f: 1 for f in images}
    assert {f: counts[("stage gt", f)] for f in gts} == {f: 1 for f in gts}
    assert {f: counts[("ingest image", f)] for f in images} == {f: 1 for f in images}  # the readability check


@pytest.mark.slow
def test_a_failed_item_is_skipped_downstream_in_the_chain_as_stage_by_stage(tmp_path):
    voc = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    stems = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))[:2]
    masks = tmp_path / "masks"
    masks.mkdir()
    gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{stems[1]}.png")).astype(np.int64)
    np.savez(masks / f"{stems[1]}.npz", instance_mask=np.where(gt == 255, 0, gt + 7))  # none for stems[0]
    regions = {"source": "files", "params": {"dir": str(masks), "pattern": "{stem}.npz"}}
    corrclip = [{"name": "corrclip", "method": "corrclip"}]
    fused = run_experiment(tiny_experiment(tmp_path / "fused", methods=corrclip, regions=regions),
                           progress=False, orchestrate=False)
    plain = run_experiment(tiny_experiment(tmp_path / "plain", methods=corrclip, regions=regions,
                                           runner=STAGE_BY_STAGE), progress=False, orchestrate=False)

    def outcome(summary):
        return [(s.stage, s.done, s.failed, s.skipped, sorted(s.failures)) for s in summary.stages]

    assert fused.status == plain.status == "failed"
    assert outcome(fused) == outcome(plain)
    by_stage = {s.stage: s for s in fused.stages}
    assert by_stage["sam_masks"].failed == 1 and by_stage["dino_features"].done == 2  # the other stages go on
    assert by_stage["mask_clustering"].skipped == 1 and by_stage["scoring"].skipped == 1
    assert "its sam_masks output failed in this run" in by_stage["mask_clustering"].failures[0][2]
    assert_same_outputs(store_snapshot(tmp_path / "fused"), store_snapshot(tmp_path / "plain"))


def _counting_embeddings(monkeypatch, counts: dict[str, Counter]) -> None:
    """Count in ``counts["now"]``, per window content (crop side, bytes of the normalised crop), the windows the
    real ``clip_ops.embed_tokens`` embeds, and still run it."""
    real = ovseg_core.clip_ops.embed_tokens

    def counted(visual, images):
        for w in images.detach().float().cpu():
            counts["now"][(int(w.shape[-1]), hashlib.sha1(w.numpy().tobytes()).hexdigest())] += 1
        return real(visual, images)

    monkeypatch.setattr(ovseg_core.clip_ops, "embed_tokens", counted)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [None, 1])
def test_fused_run_embeds_each_clip_window_once_and_matches_stage_by_stage(tmp_path, monkeypatch, threads):
    if threads is not None:
        torch.set_num_threads(threads)  # restored by tests/conftest.py
    counts = {"now": Counter()}
    _counting_embeddings(monkeypatch, counts)
    fused = run_experiment(tiny_experiment(tmp_path / "fused", methods=METHODS), progress=False, orchestrate=False)
    fused_counts, counts["now"] = counts["now"], Counter()
    plain = run_experiment(tiny_experiment(tmp_path / "plain", methods=METHODS, runner=STAGE_BY_STAGE),
                           progress=False, orchestrate=False)
    plain_counts = counts["now"]
    assert fused.status == plain.status == "complete"
    assert computed(fused) == computed(plain) and computed(fused)["mask_class_tokens"] == 2
    assert_same_outputs(store_snapshot(tmp_path / "fused"), store_snapshot(tmp_path / "plain"))
    assert _attrs(tmp_path / "fused") == _attrs(tmp_path / "plain")
    # VOC21 presets: CorrCLIP 336-pixel windows (clip_layers and mask_class_tokens), SC-CLIP 224 (clip_layers only)
    assert set(fused_counts) == set(plain_counts) and {side for side, _ in fused_counts} == {336, 224}
    assert sum(side == 336 for side, _ in fused_counts) >= 2  # at least one window of each image
    assert set(fused_counts.values()) == {1}  # fused: each window embedded once, mask_class_tokens reused it
    assert {(side, n) for (side, _), n in plain_counts.items()} == {(336, 2), (224, 1)}  # stage by stage: 336 twice
