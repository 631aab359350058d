"""Memory banks through the pipeline (issue 22): a bank of sample images built from the CLI with tiny random
models, its retrieval against a numpy brute force, extension by new images, an unreadable image, a damaged pack.
Random weights: every number here checks the machinery, none is a method result."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from flows.cli import main
from flows.config import ExperimentError, load_experiment, parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from ovseg_core.bank.config import SearchConfig
from ovseg_core.bank.index import index_from_bytes
from ovseg_core.bank.search import search_index
from storage.bank import read_registry
from storage.bank_rows import SUFFIX
from storage.store import Store
from tasks.bank_index import fuse_with_bank, image_names, registry_of, retrieve_batch
from tasks.bank_params import BANK_ITEM
from tasks.runtime import RunSettings, StageContext
from tests.flows.concurrent_runs import finish, has_complete_item, kill_when, records_per_item, spawn
from tests.flows.kill_point import POINTS
from tests.flows.conftest import SAMPLE, assert_same_outputs, computed, store_snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOC = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
MODELS = {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"}
BANK_IMAGES = ["val_crop_0000.jpg", "val_crop_0001.jpg", "val_crop_0008.jpg"]
WINDOW = {"short_side": 224, "crop": 112, "stride": 112}  # small windows: a fast bank (the authors': 448 / 336 / 112)


def _experiment(tmp: Path, images: Path, **bank) -> dict:
    return {"name": "bank", "store": str(tmp / "store"), "models": MODELS, "regions": {"source": "slic"},
            "banks": [{"name": "sample", "root": str(images), "window": WINDOW, **bank}],
            "text_templates": "single", "feature_dtype": "float32"}


def _write(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _folder(tmp: Path, names: list[str], broken: bool = False) -> Path:
    folder = tmp / "bank-images"
    folder.mkdir(exist_ok=True)
    for n in names:
        shutil.copy(VOC / n, folder / n)
    if broken:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def _index_node(exp):
    return next(n for p in build_plan(exp) for n in p.nodes.values() if n.stage == "bank_index")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bank of two sample images and one unreadable file, built by ``ovseg run`` (exit 1: one image failed)."""
    tmp = tmp_path_factory.mktemp("bank")
    folder = _folder(tmp, BANK_IMAGES[:2], broken=True)
    exp_file = _write(_experiment(tmp, folder, index={"kind": "flat"}), tmp / "bank.yaml")
    code = main(["run", str(exp_file), "--no-prefect", "-q"])
    return tmp, folder, exp_file, code


@pytest.mark.slow
def test_a_bank_of_the_sample_builds_from_the_cli_and_the_unreadable_image_fails_alone(built, capsys):
    tmp, folder, exp_file, code = built
    assert code == 1  # the broken file is a failed image of the run, never silently dropped
    exp = load_experiment(exp_file)
    node = _index_node(exp)
    store = Store(tmp / "store")
    arrays = store.read_item("bank_index", node.key, BANK_ITEM)
    names = image_names(arrays)
    assert len(names) == 2 and not any(n.startswith("broken") for n in names)
    runs, _ = store.runs()
    assert runs[-1].data["counts"]["failed"] >= 1
    # every region of both images is indexed once, under the registry's ids; values and keys row-aligned
    reg = registry_of(arrays)
    assert reg.n_regions == arrays["region_ids"].size and sorted(arrays["region_ids"]) == list(range(reg.n_regions))
    keys_node, values_node = node.upstream["bank_keys"], node.upstream["bank_values"]
    for iid, count in zip(reg.images, reg.count):
        values = store.read_item("bank_values", values_node.key, iid)
        keys = store.read_item("bank_keys", keys_node.key, iid)
        assert values["values"].shape[0] == keys["keys"].shape[0] == count > 0
        np.testing.assert_array_equal(values["mask_ids"], keys["mask_ids"])
        assert (values["mask_ids"] > 0).all()  # the unsegmented id 0 is not a bank region
        np.testing.assert_allclose(np.linalg.norm(values["values"].astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert (np.linalg.norm(keys["keys"].astype(np.float32), axis=1) <= 1.0 + 1e-3).all()
    assert read_registry(store, "sample", keys_node.upstream["sam_masks"].key) == reg
    assert store.stage_attrs("bank_index", node.key)["random_weights"] is True
    capsys.readouterr()
    assert main(["bank", "ls", "--store", str(tmp / "store")]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("sample ")]
    assert " 2 " in line and f" {reg.n_regions} " in line and "flat/inner_product" in line
    assert "values=clip:tiny@random:0" in line and "keys=vfm:tiny_radiov3@random:0" in line and "random-weight" in out


def _queries(vfm: np.ndarray, region_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's queries, computed directly: VFM map resized to the region map, unit per pixel, region means,
    unit (every id, the unsegmented one included)."""
    h, w = region_map.shape
    up = F.interpolate(torch.from_numpy(vfm).float()[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    unit = F.normalize(up, dim=0).numpy().reshape(up.shape[0], -1)
    ids = np.unique(region_map)
    q = np.stack([unit[:, region_map.reshape(-1) == i].mean(axis=1) for i in ids])
    return ids, q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.slow
def test_retrieval_equals_a_numpy_brute_force_over_the_stored_keys(built):
    tmp, folder, exp_file, _ = built
    data = yaml.safe_load(exp_file.read_text())
    data.update(datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                           "limit": 1}],
                methods=[{"name": "v2bank", "method": "corrclipv2", "params": {"bank": "sample", "bank_k": 7}}])
    exp = parse_experiment(data, source="test")
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert computed(summary).get("bank_values", 0) == 0  # the bank is reused, not rebuilt
    (bank_plan, plan) = build_plan(exp)
    rec = plan.methods[0].prediction.upstream["reconstruction"]
    store = Store(tmp / "store")
    row = {"image_id": next(iter(store.complete_items("reconstruction", rec.key)))}
    attrs = store.item_attrs("reconstruction", rec.key, row["image_id"])
    assert attrs["bank"]["name"] == "sample" and attrs["bank"]["without_support"] == 0
    # the pipeline's retrieval, on the test image's own inputs
    ctx = StageContext(rec, RunSettings(str(tmp / "store")), "voc")
    ids_map = ctx.read_upstream("sam_masks", row, ["ids"])["ids"]
    vfm = ctx.read_upstream("vfm_features", row, ["features"])["features"]
    text = torch.from_numpy(ctx.read_shared("text_embeddings")["embeddings"]).float()
    hw = rec.params.window.plan(ids_map.shape).resized_hw
    own = torch.zeros((text.shape[0], *hw))
    arrays = ctx.read_shared("bank_index", BANK_ITEM)
    (got,) = retrieve_batch(ctx, arrays, [(hw, ids_map, torch.from_numpy(vfm))])
    fused, support = fuse_with_bank(ctx, arrays, own, got, text, None)
    # independently: every stored key, unit-normalised, exact inner products, top 7
    index = rec.upstream["bank_index"]
    reg = registry_of(arrays)
    keys = np.concatenate([store.read_item("bank_keys", index.upstream["bank_keys"].key, i)["keys"] for i in reg.images])
    values = np.concatenate([store.read_item("bank_values", index.upstream["bank_values"].key, i)["values"]
                             for i in reg.images]).astype(np.float32)
    keys = keys.astype(np.float32) / (np.linalg.norm(keys.astype(np.float32), axis=1, keepdims=True) + 1e-12)
    region_map = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(ids_map.astype(np.float32))[None, None],
                                                            size=hw, mode="nearest")[0, 0]).astype(np.int64)
    ids, queries = _queries(vfm, region_map)
    np.testing.assert_array_equal(support.region_ids, ids)
    scores = queries @ keys.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    got = support.neighbours
    # the same neighbours; where random tiny-model keys tie to float rounding, the same scores
    same = (np.sort(got, axis=1) == np.sort(expected, axis=1)).all(axis=1)
    assert same.mean() > 0.9
    np.testing.assert_allclose(np.take_along_axis(scores, got, 1), np.take_along_axis(scores, expected, 1), atol=1e-5)
    mean = values[got].mean(axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(support.logits.numpy(), mean @ text.numpy().T, atol=1e-4)
    # own logits are zero here, so the fused map is (1 - alpha) times the broadcast support logits
    labels = np.searchsorted(ids, region_map)
    np.testing.assert_allclose(fused.numpy(), 0.5 * (mean @ text.numpy().T)[labels].transpose(2, 0, 1), atol=1e-4)


@pytest.mark.slow
def test_extending_a_bank_computes_only_the_new_images_and_keeps_the_old_ids(tmp_path):
    folder = _folder(tmp_path, BANK_IMAGES[:2])
    exp = parse_experiment(_experiment(tmp_path, folder, index={"kind": "flat"}), source="test")
    first = run_experiment(exp, progress=False, orchestrate=False)
    assert first.failed == 0
    store = Store(tmp_path / "store")
    old = registry_of(store.read_item("bank_index", _index_node(exp).key, BANK_ITEM))
    _folder(tmp_path, BANK_IMAGES[2:])  # one more image
    grown = run_experiment(exp, progress=False, orchestrate=False)
    per_image = {s: n for s, n in computed(grown).items() if s != "bank_index"}
    assert per_image == {"sam_masks": 1, "bank_values": 1, "bank_keys": 1}  # its intermediates: in memory, not stored
    assert computed(grown)["bank_index"] == 1  # a new image set: a new index
    new = registry_of(store.read_item("bank_index", _index_node(exp).key, BANK_ITEM))
    attrs = store.item_attrs("bank_index", _index_node(exp).key, BANK_ITEM)  # the reference's growth: added, not retrained
    added = new.n_regions - old.n_regions
    assert attrs["built"].startswith(f"{added} keys added") and attrs["n_trained"] == old.n_regions == attrs["regions"] - added
    assert new.images[:2] == old.images and new.first[:2] == old.first and new.count[:2] == old.count
    assert new.first[2] == old.n_regions  # appended after every old id
    assert main(["cache", "verify", "--store", str(tmp_path / "store")]) == 0
    # a damaged value pack is found by cache verify (and un-marked, so the next run recomputes it)
    values = _index_node(exp).upstream["bank_values"]
    packs = sorted((tmp_path / "store" / "stages" / "bank_values" / values.key / "packs").glob("*.zip"))
    data = bytearray(packs[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    packs[0].write_bytes(bytes(data))
    assert main(["cache", "verify", "--store", str(tmp_path / "store")]) == 1


def test_a_method_names_a_bank_that_exists_and_bank_parameters_are_checked(tmp_path):
    base = {"name": "x", "store": str(tmp_path / "s"), "models": MODELS, "regions": {"source": "slic"},
            "banks": [{"name": "sample", "root": str(VOC), "index": {"kind": "flat"}}],
            "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample")}]}
    with pytest.raises(ExperimentError, match=r"unknown bank 'sampel' \(did you mean 'sample'\?\)"):
        parse_experiment({**base, "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sampel"}}]})
    with pytest.raises(ExperimentError, match="only corrclipv2 retrieves"):
        parse_experiment({**base, "methods": [{"name": "m", "method": "corrclip", "params": {"bank": "sample"}}]})
    exp = parse_experiment({**base, "methods": [{"name": "m", "method": "corrclipv2",
                                                 "params": {"bank": "sample", "bank_kk": 3}}]})
    with pytest.raises(ValueError, match=r"params.bank_kk: unknown bank parameter \(did you mean 'bank_k'\?\)"):
        build_plan(exp)
    bad_index = {**base, "banks": [{"name": "sample", "root": str(VOC), "index": {"knd": "flat"}}],
                 "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sample"}}]}
    with pytest.raises(ValueError, match=r"banks\[sample\].index.knd: unknown key \(did you mean 'kind'\?\)"):
        build_plan(parse_experiment(bad_index))
    bad_ef = {**base, "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sample", "bank_coarse_ef": 0}}]}
    with pytest.raises(ValueError, match="SearchConfig.coarse_ef_search must be None"):
        build_plan(parse_experiment(bad_ef))
    bad_dtype = {**base, "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sample", "bank_coarse_dtype": "fp8"}}]}
    with pytest.raises(ValueError, match="SearchConfig.coarse_dtype must be one of"):
        build_plan(parse_experiment(bad_dtype))
    bad_fastscan = {**base, "banks": [{"name": "sample", "root": str(VOC), "index": {"kind": "ivfpq_fastscan"}}],
                    "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sample"}}]}
    with pytest.raises(ValueError, match="kind='ivfpq_fastscan' needs pq_nbits=4"):
        build_plan(parse_experiment(bad_fastscan))
    bad_coarse = {**base, "banks": [{"name": "sample", "root": str(VOC), "index": {"kind": "flat", "coarse": "hnsw"}}],
                  "methods": [{"name": "m", "method": "corrclipv2", "params": {"bank": "sample"}}]}
    with pytest.raises(ValueError, match="IndexConfig.coarse='hnsw' needs kind 'ivfpq'"):
        build_plan(parse_experiment(bad_coarse))


def test_changing_k_or_alpha_moves_only_the_reconstruction_and_what_follows(tmp_path):
    base = {"name": "x", "store": str(tmp_path / "s"), "models": MODELS, "regions": {"source": "slic"},
            "banks": [{"name": "sample", "root": str(VOC), "index": {"kind": "flat"}}],
            "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample")}]}
    plans = {}
    for name, params in {"plain": {}, "k20": {"bank": "sample"}, "k5": {"bank": "sample", "bank_k": 5},
                         "alpha": {"bank": "sample", "bank_alpha": 0.3},
                         "coarse_ef": {"bank": "sample", "bank_coarse_ef": 64},
                         "fast": {"bank": "sample", "bank_coarse_dtype": "bfloat16", "bank_rerank": True,
                                  "bank_rerank_candidates": 40}}.items():
        exp = parse_experiment({**base, "methods": [{"name": "m", "method": "corrclipv2", "params": params}]})
        plans[name] = {n.stage: n.key for p in build_plan(exp) for n in p.nodes.values() if p.dataset.name == "voc"}
    moved = {s for s in plans["k20"] if plans["k20"][s] != plans["k5"][s]}
    assert moved == {"reconstruction", "map_correction", "scoring"}
    assert {s for s in plans["k20"] if plans["k20"][s] != plans["alpha"][s]} == moved
    assert {s for s in plans["k20"] if plans["k20"][s] != plans["coarse_ef"][s]} == moved
    assert {s for s in plans["k20"] if plans["k20"][s] != plans["fast"][s]} == moved
    # with and without a bank: the same upstream (its keys before banks existed: tests/flows/test_key_stability.py)
    assert {s for s in plans["k20"] if plans["k20"][s] != plans["plain"][s]} == moved


@pytest.mark.slow
def test_a_sigkill_during_the_value_stage_then_a_rerun_gives_the_bank_of_an_uninterrupted_build(tmp_path):
    folder = _folder(tmp_path, BANK_IMAGES)
    data = _experiment(tmp_path, folder, index={"kind": "flat"})
    data["runner"] = {"kind": "local", "workers": 1, "batch_size": 1, "lease_ttl": 6.0}
    data["banks"][0]["batch_size"] = 1  # one image per batch: the kill lands between images
    reference = tmp_path / "reference"
    exp = parse_experiment({**data, "store": str(reference)}, source="test")
    assert run_experiment(exp, progress=False, orchestrate=False).failed == 0
    exp_file = _write(data, tmp_path / "bank.yaml")
    proc = spawn(exp_file)
    store = tmp_path / "store"
    kill_when(proc, has_complete_item(store, "bank_values"))  # fails if the run ends before one value is stored
    partial = store_snapshot(store)
    assert not any(s == "bank_index" for s, _, _ in partial)
    time.sleep(6.5)  # the dead run's leases expire
    summary = run_experiment(parse_experiment(data, source="test"), progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary)["bank_values"] < len(BANK_IMAGES)  # done work is kept
    assert_same_outputs(store_snapshot(store), store_snapshot(reference))
    key = _index_node(exp).upstream["bank_keys"].upstream["sam_masks"].key
    assert read_registry(Store(store), "sample", key) == read_registry(Store(reference), "sample", key)


def _assert_same_neighbours(st: Store, ref: Store, node) -> None:
    """Both stores' index items of ``node`` return the same 5 neighbours for every stored key as a query (equal
    bytes imply it; searched to show the stored index loads and answers)."""
    keys_node = node.upstream["bank_keys"]
    reg = registry_of(st.read_item("bank_index", node.key, BANK_ITEM))
    queries = np.concatenate([st.read_item("bank_keys", keys_node.key, i)["keys"] for i in reg.images]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = [search_index(index_from_bytes(s.read_item("bank_index", node.key, BANK_ITEM)["index"].tobytes()), queries,
                          SearchConfig(k=5)) for s in (st, ref)]
    np.testing.assert_array_equal(found[0], found[1])


def _segments(store: Path) -> list[Path]:
    """The row segment files of every value store (``storage.bank_rows``)."""
    return sorted((store / "stages" / "bank_values").glob(f"*/rows/*/*/*{SUFFIX}"))


@pytest.fixture(scope="module")
def ivfpq_reference(tmp_path_factory):
    """An IVF-PQ bank (FAISS training, not only a flat index) of the three sample images, built uninterrupted by a
    fresh ``ovseg run`` process; the kill tests build into other stores from the same image folder."""
    tmp = tmp_path_factory.mktemp("ivfpq")
    folder = _folder(tmp, BANK_IMAGES)
    # 4-bit codes and nlist = sqrt(N): a few hundred regions train an IVF-PQ (the default needs >= 256 keys)
    data = _experiment(tmp, folder, index={"kind": "ivfpq", "pq_m": 8, "pq_nbits": 4, "nlist_factor": 1.0})
    data["runner"] = {"kind": "local", "workers": 1, "batch_size": 1, "lease_ttl": 6.0}
    data["banks"][0]["batch_size"] = 1  # one image per batch: the kill lands between images
    code, out = finish(spawn(_write(data, tmp / "reference.yaml")))
    assert code == 0, out[-2000:]
    return data, tmp / "store"


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_sigkill_during_the_index_stage_then_a_rerun_gives_the_index_of_an_uninterrupted_build(
        tmp_path, ivfpq_reference, point):
    """Killed after the registry is replaced, with the index pack's temporary complete, or with the pack in
    place before its record: the index is not complete, the rerun computes it once more (nothing else) and
    stores the reference's bytes, registry and search results."""
    data, reference = ivfpq_reference
    store = tmp_path / "store"
    data = {**data, "store": str(store)}
    exp_file = _write(data, tmp_path / "bank.yaml")
    code, out = finish(spawn(exp_file, kill_point=point))
    assert code == -signal.SIGKILL, f"the run ended before the kill point {point!r} (exit {code}):\n{out[-2000:]}"
    exp = parse_experiment(data, source="test")
    node = _index_node(exp)
    assert BANK_ITEM not in Store(store).complete_items("bank_index", node.key)  # a half-written index is not done
    kept = {p: p.stat().st_ino for p in _segments(store)}  # value rows in region-id order the killed run moved in
    assert bool(kept) == (point in ("segment", "pack", "record"))
    time.sleep(6.5)  # the dead run's leases expire
    code, out = finish(spawn(exp_file))
    assert code == 0, out[-2000:]
    assert {p: p.stat().st_ino for p in kept} == kept  # reused, not written again
    assert {p.relative_to(store): p.read_bytes() for p in _segments(store)} == {
        p.relative_to(reference): p.read_bytes() for p in _segments(reference)}
    records = records_per_item(store)
    assert records[("bank_index", node.key, BANK_ITEM)] == 1
    assert set(records.values()) == {1}  # nothing the killed run finished was computed again
    assert_same_outputs(store_snapshot(store), store_snapshot(reference))
    st, ref = Store(store), Store(reference)
    attrs = st.item_attrs("bank_index", node.key, BANK_ITEM)
    assert attrs["kind"] == "ivfpq" and attrs["built"] == "trained on all keys"
    key = node.upstream["bank_keys"].upstream["sam_masks"].key
    assert read_registry(st, "sample", key) == read_registry(ref, "sample", key)
    _assert_same_neighbours(st, ref, node)


@pytest.mark.slow
def test_a_damaged_index_is_found_by_cache_verify_and_rebuilt_identical(tmp_path, ivfpq_reference, capsys):
    data, reference = ivfpq_reference
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    data = {**data, "store": str(store)}
    node = _index_node(parse_experiment(data, source="test"))
    (pack,) = (store / "stages" / "bank_index" / node.key / "packs").glob("*.zip")
    damaged = bytearray(pack.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the index bytes (most of the pack)
    pack.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["cache", "verify", "--store", str(store)]) == 1
    assert f"bank_index/{node.key}/{BANK_ITEM}:" in capsys.readouterr().out
    assert BANK_ITEM in Store(store).complete_items("bank_index", node.key)  # verify alone changes nothing
    assert main(["cache", "verify", "--repair", "--store", str(store)]) == 1
    assert BANK_ITEM not in Store(store).complete_items("bank_index", node.key)  # un-marked: the next run rebuilds it
    summary = run_experiment(parse_experiment(data, source="test"), progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary) == {"bank_index": 1}  # only the index, every key reused
    assert main(["cache", "verify", "--store", str(store)]) == 0
    assert_same_outputs(store_snapshot(store), store_snapshot(reference))
    _assert_same_neighbours(Store(store), Store(reference), node)
