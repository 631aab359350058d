"""A built bank serves its values from the row segments its index item writes (``storage.bank_rows``): fused outputs
bit-identical to the values read directly from the per-image items' packs with zarr, and on an S3 store to a local
store's; a grown bank appends its new regions' rows only; a damaged segment is found by ``cache verify`` and written again. A DMCE bank (two tiny random
CLIPs) of sample images, a flat index. Random weights: the numbers check the machinery, none is a method result."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from flows.cli import main
from flows.config import parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from ovseg_core.bank.retrieval import ValueStore, fuse_support
from ovseg_core.bank.rows import ArrayRows
from storage.bank_rows import RowSegments, SegmentRows
from storage.store import Store
from tasks.bank_index import _SERVING, bank_serving, fuse_with_bank, image_names, retrieve_batch
from tasks.bank_params import BANK_ITEM
from tasks.runtime import RunSettings, StageContext
from tests.s3server import shared_server
from tests.flows.conftest import SAMPLE, computed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOC = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
CLIPS = ["clip:tiny@random:0", "clip:tiny@random:1"]  # main and DMCE's auxiliary (random: not DFN2B)
IMAGES = ["val_crop_0000.jpg", "val_crop_0001.jpg", "val_crop_0008.jpg"]
ROLES = ("bank_values", "bank_aux_values")


def _experiment(tmp: Path) -> dict:
    return {"name": "bankrows", "store": str(tmp / "store"),
            "models": {"clip": CLIPS[0], "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"},
            "regions": {"source": "slic"}, "text_templates": "single", "feature_dtype": "float32",
            "banks": [{"name": "sample", "root": str(tmp / "bank-images"), "clips": CLIPS, "index": {"kind": "flat"},
                       "window": {"short_side": 224, "crop": 112, "stride": 112}}],
            "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                          "limit": 1}],
            "methods": [{"name": "v2bank", "method": "corrclipv2", "params": {"bank": "sample", "bank_k": 5}}]}


def _zarr_values(store_dir: Path, key: str) -> dict[str, np.ndarray]:
    """Every ``bank_values`` item's ``values`` of an output set, read from its packs by zarr (not by ovseg)."""
    out = {}
    for pack in sorted((store_dir / "stages" / "bank_values" / key / "packs").glob("*.zip")):
        with zipfile.ZipFile(pack) as z:
            names = {n.split("/")[0] for n in z.namelist() if n.endswith("/values/zarr.json")}
        g = zarr.open_group(zarr.storage.ZipStore(pack, mode="r"), mode="r")
        out.update({n: np.asarray(g[f"{n}/values"][...]) for n in names})
    return out


def _segment_files(store: Store, attrs: dict) -> dict[str, Path]:
    return {f"{role}:{s}": Path(RowSegments.from_attrs(a).path(store, s)) for role, a in attrs["value_rows"].items()
            for s in RowSegments.from_attrs(a).segments}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bankrows")
    (tmp / "bank-images").mkdir()
    for n in IMAGES[:2]:
        shutil.copy(VOC / n, tmp / "bank-images" / n)
    exp = parse_experiment(_experiment(tmp), source="test")
    assert run_experiment(exp, progress=False, orchestrate=False).failed == 0
    return tmp, exp


def _index_node(exp):
    return next(n for p in build_plan(exp) for n in p.nodes.values() if n.stage == "bank_index")


@pytest.mark.slow
def test_retrieval_through_the_row_segments_equals_the_per_image_items_bit_for_bit(served):
    tmp, exp = served
    store = Store(tmp / "store")
    rec = build_plan(exp)[1].methods[0].prediction.upstream["reconstruction"]
    index = rec.upstream["bank_index"]
    attrs = store.item_attrs("bank_index", index.key, BANK_ITEM)
    arrays = store.read_item("bank_index", index.key, BANK_ITEM)
    names, registry = image_names(arrays), arrays["registry"]
    # independently: each store's rows in region-id order, from the packs by zarr
    direct = {}
    for role in ROLES:
        items = _zarr_values(tmp / "store", index.upstream[role].key)
        direct[role] = np.concatenate([items[n] for n in names])
        assert direct[role].shape[0] == int(registry[-1].sum())
        assert RowSegments.from_attrs(attrs["value_rows"][role]).segments == ((0, direct[role].shape[0]),)
    row = {"image_id": next(iter(store.complete_items("reconstruction", rec.key)))}
    ctx = StageContext(rec, RunSettings(str(tmp / "store")), "voc")
    serving = bank_serving(ctx, ctx.read_shared("bank_index", BANK_ITEM))
    assert isinstance(serving.values, SegmentRows) and isinstance(serving.aux_values, SegmentRows)
    ids_map = ctx.read_upstream("sam_masks", row, ["ids"])["ids"]
    vfm = torch.from_numpy(ctx.read_upstream("vfm_features", row, ["features"])["features"])
    text = torch.from_numpy(ctx.read_shared("text_embeddings")["embeddings"]).float()
    aux_text = torch.from_numpy(ctx.read_shared("aux_text_embeddings")["embeddings"]).float()
    hw = rec.params.window.plan(ids_map.shape).resized_hw
    own = torch.randn((text.shape[0], *hw), generator=torch.Generator().manual_seed(0))
    (got,) = retrieve_batch(ctx, arrays, [(hw, ids_map, vfm)])
    assert (got.neighbours >= 0).any()
    fused, support = fuse_with_bank(ctx, arrays, own.clone(), got, text, aux_text)
    stores = [ValueStore(ArrayRows(direct["bank_values"]), text), ValueStore(ArrayRows(direct["bank_aux_values"]),
                                                                               aux_text)]
    expected, exp_support = fuse_support(own.clone(), got.region_ids, got.labels, got.neighbours, stores,
                                         rec.params.bank.fusion)
    assert torch.equal(fused, expected) and torch.equal(support.logits, exp_support.logits)
    assert not torch.equal(fused, own)  # the bank changed the logits


@pytest.mark.slow
def test_on_an_s3_store_the_bank_serves_from_its_segments_the_local_outputs_bit_for_bit(served):
    tmp, exp = served  # before the growth test: the same images, so the same keys
    url = f"s3://{shared_server().create_bucket()}/st"
    s3_exp = parse_experiment({**_experiment(tmp), "store": url}, source="test")
    assert run_experiment(s3_exp, progress=False, orchestrate=False).failed == 0
    local, remote = Store(tmp / "store"), Store(url)
    node = _index_node(exp)
    attrs = remote.item_attrs("bank_index", node.key, BANK_ITEM)
    assert attrs["value_rows"] == local.item_attrs("bank_index", node.key, BANK_ITEM)["value_rows"]
    for a in attrs["value_rows"].values():
        rs = RowSegments.from_attrs(a)
        assert [remote.backend.get(rs.path(remote, s)) for s in rs.segments] == [
            Path(rs.path(local, s)).read_bytes() for s in rs.segments]
    for stage in ("reconstruction", "map_correction", "bank_index"):
        for key in {k for s, k in local.stage_sets() if s == stage}:
            items = local.complete_items(stage, key)
            assert items and remote.complete_items(stage, key) == items
            for i in items:
                a, b = local.read_item(stage, key, i), remote.read_item(stage, key, i)
                assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a), (stage, i)


@pytest.mark.slow
def test_a_grown_bank_appends_its_rows_and_a_damaged_segment_is_found_and_written_again(served, capsys):
    tmp, exp = served
    store = Store(tmp / "store")
    before = store.item_attrs("bank_index", _index_node(exp).key, BANK_ITEM)
    old_files = _segment_files(store, before)
    old_bytes = {k: p.read_bytes() for k, p in old_files.items()}
    old_inodes = {k: p.stat().st_ino for k, p in old_files.items()}
    shutil.copy(VOC / IMAGES[2], tmp / "bank-images" / IMAGES[2])  # the bank grows by one image
    assert run_experiment(exp, progress=False, orchestrate=False).failed == 0
    node = _index_node(exp)
    attrs = store.item_attrs("bank_index", node.key, BANK_ITEM)
    arrays = store.read_item("bank_index", node.key, BANK_ITEM)
    names = image_names(arrays)
    n_old, n_new = before["registry_regions"], attrs["registry_regions"]
    files = _segment_files(store, attrs)
    for role in ROLES:
        rs = RowSegments.from_attrs(attrs["value_rows"][role])
        assert rs.segments == ((0, n_old), (n_old, n_new))  # the old segment kept, the new ids appended
        assert files[f"{role}:{(0, n_old)}"].stat().st_ino == old_inodes[f"{role}:{(0, n_old)}"]  # not rewritten
        assert files[f"{role}:{(0, n_old)}"].read_bytes() == old_bytes[f"{role}:{(0, n_old)}"]
        items = _zarr_values(tmp / "store", node.upstream[role].key)
        expected = np.concatenate([items[n] for n in names])
        np.testing.assert_array_equal(SegmentRows(store, rs).rows(np.arange(n_new)), expected)
        # the new segment holds exactly the new image's rows and their CRC-32s
        assert files[f"{role}:{(n_old, n_new)}"].stat().st_size == (n_new - n_old) * (rs.dim * 2 + 4)
    # damage: one byte of the new auxiliary segment, under a long-lived serving process's reader
    path = files[f"bank_aux_values:{(n_old, n_new)}"]
    aux = RowSegments.from_attrs(attrs["value_rows"]["bank_aux_values"])
    held = SegmentRows(Store(tmp / "store"), aux, ("bank_index", node.key, BANK_ITEM))
    aux_rows = held.rows(np.arange(n_new))
    inodes = {k: p.stat().st_ino for k, p in files.items() if p != path}
    good = path.read_bytes()
    data = bytearray(good)
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["cache", "verify", "--store", str(tmp / "store")]) == 1
    out = capsys.readouterr().out
    assert f"bank_index/{node.key}/{BANK_ITEM}:" in out and path.name in out and "CRC-32" in out
    assert main(["cache", "verify", "--repair", "--store", str(tmp / "store")]) == 1
    assert not path.exists() and BANK_ITEM not in Store(tmp / "store").complete_items("bank_index", node.key)
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary) == {"bank_index": 1}  # nothing else recomputed
    assert path.read_bytes() == good  # written again, identical
    assert {k: files[k].stat().st_ino for k in inodes} == inodes  # the undamaged segments were kept
    assert main(["cache", "verify", "--store", str(tmp / "store")]) == 0
    # the reader held across the repair reads the new file (it held the damaged one open: it used to report it
    # damaged, un-mark the rebuilt index and delete the new file)
    np.testing.assert_array_equal(held.rows(np.arange(n_new)), aux_rows)
    assert path.read_bytes() == good and BANK_ITEM in Store(tmp / "store").complete_items("bank_index", node.key)


@pytest.mark.slow
def test_gc_removes_the_segments_no_kept_index_lists_and_the_bank_still_serves(served, capsys):
    """After the growth above, the bank shrinks back to its first two images: the index of those (still in the
    store) is used again, and gc drops the grown index and exactly the segments only it listed (the new image's
    rows); the first index's segment stays, in place, and serves."""
    tmp, exp = served
    store = Store(tmp / "store")
    grown = store.item_attrs("bank_index", _index_node(exp).key, BANK_ITEM)
    (tmp / "bank-images" / IMAGES[2]).unlink()
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary) == {}  # the two-image index and its outputs are complete
    node = _index_node(exp)
    attrs = store.item_attrs("bank_index", node.key, BANK_ITEM)
    kept, dropped = _segment_files(store, attrs), _segment_files(store, grown)
    dropped = {k: p for k, p in dropped.items() if p not in kept.values()}
    assert len(kept) == 2 and len(dropped) == 2  # per store: the first images' segment, the new image's segment
    for p in [*kept.values(), *dropped.values()]:
        os.utime(p, (0, 0))  # older than the lease TTL: no writer is about to list them
    inodes = {k: p.stat().st_ino for k, p in kept.items()}
    capsys.readouterr()
    assert main(["cache", "gc", "--dry-run", "--store", str(tmp / "store")]) == 0
    out = capsys.readouterr().out
    listed = [ln for ln in out.splitlines() if "bank value row segment no kept bank index lists" in ln]
    assert len(listed) == 2 and all(p.exists() for p in dropped.values()), out
    assert "2 unlisted bank value row segments" in out.splitlines()[-1]
    assert main(["cache", "gc", "--store", str(tmp / "store")]) == 0
    assert "2 unlisted bank value row segments" in capsys.readouterr().out
    assert not any(p.exists() for p in dropped.values())
    assert {k: p.stat().st_ino for k, p in kept.items()} == inodes
    store = Store(tmp / "store")
    arrays = store.read_item("bank_index", node.key, BANK_ITEM)
    for role in ROLES:
        items = _zarr_values(tmp / "store", node.upstream[role].key)
        expected = np.concatenate([items[n] for n in image_names(arrays)])
        rs = RowSegments.from_attrs(attrs["value_rows"][role])
        np.testing.assert_array_equal(SegmentRows(store, rs).rows(np.arange(expected.shape[0])), expected)
    assert main(["cache", "verify", "--store", str(tmp / "store")]) == 0
    rec = build_plan(exp)[1].methods[0].prediction.upstream["reconstruction"]
    _SERVING.clear()  # as a new serving process: its readers open the segments in the store now
    summary = run_experiment(exp, progress=False, orchestrate=False, force={"reconstruction"})
    assert summary.failed == 0 and computed(summary).get("reconstruction") == 1
    assert store.complete_items("reconstruction", rec.key)
