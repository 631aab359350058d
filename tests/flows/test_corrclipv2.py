"""CorrCLIPv2 through the pipeline: its stages, what it shares with CorrCLIP v1, and its predictions against a
direct computation from the image with the ``ovseg_core`` functions (tiny random CLIP and VFM, real architectures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import main
from flows.config import load_experiment, parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from ovseg_core.backbones import load_backbone
from ovseg_core.corrclip.pipeline import corrclip_window_features
from ovseg_core.corrclip.vfm_correlation import vfm_window_features
from ovseg_core.datasets import FAMILY_MODELS
from ovseg_core.features.clip import normalize_clip
from ovseg_core.features.regions import resize_regions_nearest
from ovseg_core.features.vfm import vfm_dense_features
from ovseg_core.methods import get_method
from ovseg_core.postprocess import predict, window_logits
from ovseg_core.windows import crop_window_labels, crop_windows, merge_window_logits, resize_image
from storage.images import load_rgb
from storage.store import Store
from storage.tables import read_table
from tasks.params import WindowParams
from tasks.reconstruction import _indexed, _vfm_windows
from tests.flows.conftest import SAMPLE, computed, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[2]
CLIP, VFM = "clip:tiny@random:0", "vfm:tiny_radiov3@random:0"
MODELS = {"clip": CLIP, "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0", "vfm": VFM}
# a 300 crop is zero-padded to 336 (the 56 multiple): padding, replicate-padded VFM features and the mask sentinel
# are exercised; the stride makes windows overlap
WINDOW = {"crop": 300, "stride": 150}
METHODS = [{"name": "v1", "method": "corrclip", "window": WINDOW}, {"name": "v2", "method": "corrclipv2", "window": WINDOW},
           {"name": "v2-tau3", "method": "corrclipv2", "params": {"tau": 3.0}, "window": WINDOW},
           {"name": "v2-dbscan", "method": "corrclipv2", "params": {"mask_clustering": True}, "window": WINDOW}]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    store = tmp_path_factory.mktemp("v2") / "store"
    voc = {"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"), "limit": 1}
    exp = tiny_experiment(store, datasets=[voc], methods=METHODS, models=MODELS, text_templates="single",
                          feature_dtype="float32")
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0
    return store, exp, summary


def _nodes(mp) -> dict[str, object]:
    out, stack = {}, [mp.scoring]
    while stack:
        n = stack.pop()
        out[n.stage] = n
        stack.extend(n.upstream.values())
    return out


def test_v1_and_v2_share_every_upstream_output_their_inputs_allow(ran):
    store, exp, summary = ran
    # one image; hand-counted from which inputs the four methods have in common: one vocabulary (same CLIP, same
    # class lines), one CLIP dump and one region map for all; one DINO + clustering (v1) and one VFM map (v2);
    # mask class tokens: v1's and one for the v2 methods without DBSCAN (tau does not change them; the DBSCAN
    # variant computes its own in the reconstruction); everything else per method.
    assert computed(summary) == {"text_embeddings": 1, "sam_masks": 1, "clip_layers": 1, "dino_features": 1,
                                 "mask_clustering": 1, "vfm_features": 1, "mask_class_tokens": 2,
                                 "reconstruction": 4, "map_correction": 4, "scoring": 4}
    (plan,) = build_plan(exp)
    nodes = {mp.entry.name: _nodes(mp) for mp in plan.methods}
    for stage in ("text_embeddings", "clip_layers", "sam_masks"):
        assert len({nodes[m][stage].key for m in nodes}) == 1, stage
    assert "vfm_features" not in nodes["v1"] and {"dino_features", "mask_clustering"}.isdisjoint(nodes["v2"])
    assert nodes["v2"]["mask_class_tokens"] is nodes["v2-tau3"]["mask_class_tokens"]
    assert nodes["v2"]["mask_class_tokens"].upstream["mask_clustering"] is nodes["v2"]["sam_masks"]
    assert "mask_class_tokens" not in nodes["v2-dbscan"]
    assert nodes["v2"]["clip_layers"].params.window.pad_multiple == 56
    again = run_experiment(exp, progress=False, orchestrate=False)
    assert computed(again) == {}


def _direct(exp, plan, st: Store, row: dict, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """The method computed from the image with the core functions: the VFM on the original image, the
    correlation per window, CLIP run by the CorrCLIP forward itself (mask class tokens included)."""
    mp = next(m for m in plan.methods if m.entry.params == params and m.method.name == "corrclipv2")
    rec = mp.prediction.upstream["reconstruction"]
    p = rec.params
    image = torch.from_numpy(np.array(load_rgb(row["abs_path"]))).permute(2, 0, 1)
    wplan = p.window.plan(tuple(image.shape[1:]))
    crops = crop_windows(normalize_clip(resize_image(image.float(), wplan.resized_hw)[None])[0], wplan)
    assert crops.shape[-2:] == (336, 336) and len(wplan.windows) > 1  # padded, overlapping windows
    vfm = load_backbone(VFM)
    vmap = vfm_dense_features(vfm.model, "radio", vfm.patch_size, image)
    clip = load_backbone(CLIP)
    corr = vfm_window_features(vmap, wplan, clip.patch_size)
    ids = st.read_item("sam_masks", rec.upstream["sam_masks"].key, row["image_id"])["ids"]
    regions = crop_window_labels(torch.as_tensor(resize_regions_nearest(ids, wplan.resized_hw), dtype=torch.int64),
                                 wplan, -1)
    cfg = get_method("corrclipv2").build(params, clip.num_blocks)
    text = st.read_item("text_embeddings", rec.upstream["text_embeddings"].key, "vocab")
    emb = torch.from_numpy(text["embeddings"])
    with torch.inference_mode():
        feats = corrclip_window_features(clip.model.visual, crops, corr, regions, cfg)
        merged = merge_window_logits(window_logits(feats, emb, tuple(crops.shape[-2:])), wplan)
    labels, prob = predict(merged, torch.from_numpy(text["query_to_class"]), p.logit_scale, p.prob_thd, p.area_thd)
    return labels.numpy(), prob.numpy()


@pytest.mark.parametrize("params", [{}, {"mask_clustering": True}], ids=["default", "dbscan"])
def test_v2_reconstruction_equals_the_direct_computation(ran, params):
    store, exp, _ = ran
    st = Store(store)
    (plan,) = build_plan(exp)
    mp = next(m for m in plan.methods if m.entry.params == params and m.method.name == "corrclipv2")
    rec = mp.prediction.upstream["reconstruction"]
    for row in read_table(st, "manifests", ["voc"]).to_pylist():
        stored = st.read_item("reconstruction", rec.key, row["image_id"])
        labels, prob = _direct(exp, plan, st, row, params)
        assert (stored["labels"] == labels).mean() > 0.999
        np.testing.assert_allclose(stored["prob"].astype(np.float32), prob, atol=2e-3)


def _experiment(**models) -> object:
    return parse_experiment({
        "name": "v2-models", "store": "unused",
        "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample")}],
        "models": models, "regions": {"source": "slic"},
        "methods": [{"name": "v1", "method": "corrclip"}, {"name": "v2", "method": "corrclipv2"},
                    {"name": "v2-dino", "method": "corrclipv2", "vfm": "vfm:dinov2_l14_reg4"}]})


def _backbones(exp) -> dict[str, tuple[str, str | None]]:
    missing: list[str] = []  # no weight file here: planned with "missing" identities
    (plan,) = build_plan(exp, missing)
    out = {}
    for mp in plan.methods:
        nodes = _nodes(mp)
        out[mp.entry.name] = (nodes["clip_layers"].params.backbone,
                              nodes["vfm_features"].params.backbone if "vfm_features" in nodes else None)
    return out


def test_each_method_gets_its_papers_backbones_unless_the_experiment_names_them():
    got = _backbones(_experiment())
    assert got == {"v1": ("clip:ViT-B-16-quickgelu@metaclip_fullcc", None),
                   "v2": ("clip:ViT-L-14-quickgelu@metaclip_fullcc", "vfm:radiov3_l"),
                   "v2-dino": ("clip:ViT-L-14-quickgelu@metaclip_fullcc", "vfm:dinov2_l14_reg4")}
    assert FAMILY_MODELS["corrclipv2"].clip == got["v2"][0] and FAMILY_MODELS["corrclipv2"].vfm == got["v2"][1]
    assert dict(get_method("corrclipv2").default_models) == {"clip": got["v2"][0], "vfm": got["v2"][1]}
    named = _backbones(_experiment(clip="clip:ViT-B-16-quickgelu@metaclip_fullcc", vfm="vfm:dinov3_l16"))
    assert named == {"v1": ("clip:ViT-B-16-quickgelu@metaclip_fullcc", None),
                     "v2": ("clip:ViT-B-16-quickgelu@metaclip_fullcc", "vfm:dinov3_l16"),
                     "v2-dino": ("clip:ViT-B-16-quickgelu@metaclip_fullcc", "vfm:dinov2_l14_reg4")}


def test_vfm_size_cap_and_dtype_enter_the_vfm_key_only():
    base = _experiment(clip=CLIP, vfm=VFM)
    capped = base.model_copy(update={"models": base.models.model_copy(update={"vfm_max_side": 640})})
    (a,), (b,) = build_plan(base, []), build_plan(capped, [])
    changed = {n.stage for n in b.nodes.values() if n.ident not in a.nodes}
    assert changed == {"vfm_features", "reconstruction", "map_correction", "scoring"}
    vfm = next(n for n in b.nodes.values() if n.stage == "vfm_features")
    assert (vfm.params.max_side, vfm.params.dtype, vfm.params.feature_dtype) == (640, "float32", "float16")


def test_unlabelled_ignore_mode_needs_a_dataset_with_an_unlabelled_value():
    exp = parse_experiment({
        "name": "x", "store": "unused", "models": {"clip": CLIP},
        "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                      "ignore_mode": "unlabelled"}], "methods": [{"name": "clip", "method": "clip"}]})
    with pytest.raises(ValueError, match=r"datasets\[voc\]\.ignore_mode: 'unlabelled' needs a dataset .* VOC21 "
                                         r"ignores 255 already"):
        build_plan(exp)


def test_window_features_of_a_batch_are_the_images_own():
    """Windows of several images in one forward get the correlation features of their own image and window."""
    torch.manual_seed(0)
    plans = [tiny_plan((100, 150)), tiny_plan((120, 90))]
    maps = [torch.randn(8, 5, 7), torch.randn(8, 6, 4)]
    wins = [_indexed(i, {"window": torch.arange(len(pl.windows))}) for i, pl in enumerate(plans)]
    at = torch.cat([w["at"] for w in wins])[1:]  # a batch starting at the second window of the first image
    got = _vfm_windows(at, maps, plans, 16, torch.float32)
    want = torch.cat([vfm_window_features(maps[i], plans[i], 16, w, w + 1) for i, w in at.tolist()])
    torch.testing.assert_close(got, want)


def tiny_plan(hw: tuple[int, int]):
    return WindowParams(112, 56, 28, 56).plan(hw)


def test_v2_experiment_records_its_models(ran):
    store, _, summary = ran
    runs = read_table(Store(store), "runs").to_pylist()
    assert any(r["stage"] == "vfm_features" and r["random_weights"] for r in runs)
    assert all(m["random_weights"] for m in summary.metrics)


def test_v2_reads_the_authors_mask_files_in_both_forms(tmp_path):
    """``regions: {source: files}`` with masks as the authors release them (``instance_mask``: a 2-D int32 map,
    0 = unsegmented) and the bank builder's 3-D bool stack (painted with ``stacked: paint``)."""
    voc = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    stems = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))[:2]
    hw = np.asarray(load_rgb(voc / "JPEGImages" / f"{stems[0]}.jpg")).shape[:2]
    masks = tmp_path / "masks"
    masks.mkdir()
    flat = np.zeros(hw, np.int32)
    flat[: hw[0] // 2] = 3
    flat[hw[0] // 2 :, : hw[1] // 3] = 8
    np.savez_compressed(masks / f"{stems[0]}.npz", instance_mask=flat)
    hw1 = np.asarray(load_rgb(voc / "JPEGImages" / f"{stems[1]}.jpg")).shape[:2]
    stack = np.zeros((2, *hw1), bool)
    stack[0, :100, :100] = True
    stack[1, 50:150, 50:150] = True
    np.savez_compressed(masks / f"{stems[1]}.npz", instance_mask=stack)
    exp = tiny_experiment(tmp_path / "store", methods=[{"name": "v2", "method": "corrclipv2"}], models=MODELS,
                          text_templates="single",
                          regions={"source": "files", "params": {"dir": str(masks), "stacked": "paint"}})
    assert run_experiment(exp, progress=False, orchestrate=False).failed == 0
    st = Store(tmp_path / "store")
    (plan,) = build_plan(exp)
    sam = next(n for n in plan.nodes.values() if n.stage == "sam_masks")
    rows = {Path(r["abs_path"]).stem: r["image_id"] for r in read_table(st, "manifests", ["voc"]).to_pylist()}
    np.testing.assert_array_equal(st.read_item("sam_masks", sam.key, rows[stems[0]])["ids"],
                                  np.select([flat == 3, flat == 8], [1, 2], 0))
    painted = np.zeros(hw1, np.int32)
    painted[:100, :100] = 1
    painted[50:150, 50:150] = 2
    np.testing.assert_array_equal(st.read_item("sam_masks", sam.key, rows[stems[1]])["ids"], painted)


def _clone(tmp_path: Path) -> Path:
    """A fresh clone's files the sample experiment reads: the embedded data and the config."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "examples", clone / "examples")
    (clone / "configs").mkdir()
    shutil.copy(REPO / "configs" / "first-corrclipv2.yaml", clone / "configs")
    return clone


def test_the_sample_corrclipv2_experiment_runs_through_the_cli(tmp_path, capsys):
    clone = _clone(tmp_path)
    exp_file = clone / "configs" / "first-corrclipv2.yaml"
    assert main(["run", str(exp_file), "--no-prefect"]) == 0
    assert "RANDOM" in capsys.readouterr().out.upper()
    exp = load_experiment(exp_file)
    st = Store(clone / "ovseg-store")
    for plan in build_plan(exp):
        rows = read_table(st, "manifests", [plan.dataset.name]).to_pylist()
        for mp in plan.methods:
            assert st.missing(mp.scoring.stage, mp.scoring.key, [r["image_id"] for r in rows]) == []
    metrics = read_table(st, "metrics").to_pylist()
    assert {(m["dataset"], m["method"]) for m in metrics} == {
        (d, m) for d in ("voc21-sample", "ade20k-sample") for m in ("corrclipv2", "corrclip")}
    assert all(m["random_weights"] for m in metrics)
    assert main(["run", str(exp_file), "--no-prefect", "--dry-run"]) == 0
    planned = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    assert all(int(r[3]) == 0 for r in planned if len(r) >= 5 and r[0] in ("voc21-sample", "ade20k-sample")
               and r[3].isdigit())  # everything stored: nothing to compute


@pytest.mark.slow  # a process of its own with a temporary Prefect server, as a user runs it
def test_the_sample_corrclipv2_experiment_runs_as_a_command(tmp_path):
    clone = _clone(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run("ovseg run configs/first-corrclipv2.yaml", shell=True, cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert len(read_table(Store(clone / "ovseg-store"), "metrics").to_pylist()) == 2 * (2 + 21 + 150)


def test_backbones_command_lists_the_vfms_with_official_files_and_pages(capsys):
    assert main(["backbones"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    # written out from the model releases (docs/backbones.md), not read from the registry
    expected = {
        "vfm:radiov3_l": ("c-radio-v3_l_half.pth.tar", "https://huggingface.co/nvidia/C-RADIOv3-L"),
        "vfm:dinov2_l14_reg4": ("dinov2_vitl14_reg4_pretrain.pth", "https://github.com/facebookresearch/dinov2"),
        "vfm:dinov3_l16": ("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "https://github.com/facebookresearch/dinov3"),
        "vfm:pe_spatial_l14_448": ("PE-Spatial-L14-448.pt", "https://huggingface.co/facebook/PE-Spatial-L14-448"),
    }
    for name, (file, page) in expected.items():
        assert lines[name].split()[1] == file and f"(page: {page})" in lines[name]
    assert "random / tiny only" in lines["vfm:tiny_radiov3"]


def test_v2_runs_at_reduced_precision(tmp_path):
    """``dtype: bfloat16`` (float16 needs CUDA): the VFM under autocast, CLIP in bfloat16, the stored features
    entering the reconstruction at the CLIP's dtype (it failed with "mixed dtype" before), a float32 canvas."""
    voc = {"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"), "limit": 1}
    exp = tiny_experiment(tmp_path / "store", datasets=[voc], methods=[{"name": "v2", "method": "corrclipv2"}],
                          models=MODELS, text_templates="single", dtype="bfloat16")
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary)["reconstruction"] == 1
    (plan,) = build_plan(exp)
    vfm = next(n for n in plan.nodes.values() if n.stage == "vfm_features")
    assert vfm.params.dtype == "bfloat16"
