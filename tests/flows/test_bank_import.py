"""``ovseg bank import``: a synthetic bank in the authors' format (built here with torch and faiss as their builder
does) into the store, checked, then used by a corrclipv2 method with DMCE (tiny random models: machinery only)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import yaml

from flows.cli import main
from flows.config import load_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from ovseg_core.bank.config import SearchConfig
from ovseg_core.bank.index import index_from_bytes
from ovseg_core.bank.search import search_index
from storage.reading import DamagedOutputError
from storage.row_files import ROW_FILE, ROWS, FileRows
from storage.store import Store
from tasks.bank_index import image_names
from tasks.bank_params import BANK_ITEM
from tests.conftest import fill_disk
from tests.flows.concurrent_runs import finish, records_per_item, spawn_cli
from tests.flows.conftest import SAMPLE, assert_same_outputs, computed, store_snapshot
from tests.flows.kill_point import IMPORT_POINTS
from storage.fsio import is_temporary
from storage.leases import LEASES
from tests.ovseg_core.test_bank_authors_format import _authors_index, _authors_search

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, D_KEY, D_VALUE = 2500, 64, 32  # the tiny VFM's and tiny CLIP's dimensions; more rows than one chunk
CLIPS = ["clip:tiny@random:0", "clip:tiny@random:1"]  # main and DMCE's auxiliary (random: not DFN2B)


def _files(root):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, D_KEY))
    keys = centres[rng.integers(0, 30, N)] + 0.8 * rng.standard_normal((N, D_KEY))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True) * 0.8).astype(np.float16)
    main_values = rng.standard_normal((N, D_VALUE)).astype(np.float16)
    aux_values = rng.standard_normal((N, D_VALUE)).astype(np.float16)
    torch.save(torch.from_numpy(main_values), root / "synth_metaclip_b.pt")
    torch.save(torch.from_numpy(aux_values), root / "synth_dfnclip_b.pt")
    index = _authors_index(keys)
    faiss.write_index(index, str(root / "synth_radiov3.faiss"))
    return keys, main_values, aux_values, index


def _experiment(tmp, values, index):
    data = {"name": "imported", "store": str(tmp / "store"),
            "models": {"clip": CLIPS[0], "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"},
            "regions": {"source": "slic"}, "text_templates": "single", "feature_dtype": "float32",
            "runner": {"lease_ttl": 5},  # a killed import's lease is taken over 5 s after its last heartbeat
            "banks": [{"name": "synth", "imported": {"values": [str(v) for v in values], "index": str(index)},
                       "clips": CLIPS}],
            "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                          "limit": 1}],
            "methods": [{"name": "v2bank", "method": "corrclipv2", "params": {"bank": "synth"}}]}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_an_authors_bank_imports_streamed_and_checked_and_serves_their_neighbours(tmp_path, capsys):
    faiss.omp_set_num_threads(1)
    keys, main_values, aux_values, index = _files(tmp_path)
    exp_file = _experiment(tmp_path, [tmp_path / "synth_metaclip_b.pt", tmp_path / "synth_dfnclip_b.pt"],
                           tmp_path / "synth_radiov3.faiss")
    assert main(["bank", "import", str(exp_file)]) == 0
    assert "2500 regions" in capsys.readouterr().out
    exp = load_experiment(exp_file)
    (plan,) = build_plan(exp)  # an imported bank has nothing to run: only the dataset's plan
    node = plan.methods[0].prediction.upstream["reconstruction"].upstream["bank_index"]
    store = Store(tmp_path / "store")
    arrays = store.read_item("bank_index", node.key, BANK_ITEM)
    attrs = store.item_attrs("bank_index", node.key, BANK_ITEM)
    assert [f["file"] for f in attrs["imported"]] == ["synth_metaclip_b.pt", "synth_dfnclip_b.pt", "synth_radiov3.faiss"]
    assert all(len(f["sha256"]) == 64 for f in attrs["imported"]) and (attrs["kind"], attrs["metric"]) == ("ivfpq", "reference")
    # every row, bit for bit, in one row file per store, read back in any order (repeats included)
    assert image_names(arrays) == [ROWS]
    order = np.random.default_rng(2).integers(0, N, 3 * N)
    for role, expected in (("bank_values", main_values), ("bank_aux_values", aux_values)):
        vnode = node.upstream[role]
        assert store.complete_items("bank_values", vnode.key) == {ROWS}
        rows = FileRows(store, "bank_values", vnode.key)
        np.testing.assert_array_equal(rows.rows(np.arange(N)), expected)
        np.testing.assert_array_equal(rows.rows(order), expected[order])
    # the imported index returns the authors' search's neighbours
    rng = np.random.default_rng(1)
    queries = keys[rng.integers(0, N, 10)].astype(np.float32) + 0.05 * rng.standard_normal((10, D_KEY)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bank = index_from_bytes(arrays["index"].tobytes(), reverse_map=False)
    np.testing.assert_array_equal(search_index(bank, queries, SearchConfig(k=20)), _authors_search(index, queries, 20))
    # a second import is a no-op; the experiment then uses the bank (DMCE: the auxiliary CLIP's own vocabulary)
    assert main(["bank", "import", str(exp_file)]) == 0
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0 and computed(summary)["text_embeddings"] == 2  # main and auxiliary CLIP
    rec = plan.methods[0].prediction.upstream["reconstruction"]
    assert {"bank_index", "aux_text_embeddings"} <= set(rec.upstream)
    (item,) = store.complete_items("reconstruction", rec.key)
    assert store.item_attrs("reconstruction", rec.key, item)["bank"]["name"] == "synth"
    assert main(["bank", "ls", "--store", str(tmp_path / "store")]) == 0
    assert "synth" in capsys.readouterr().out
    # gc keeps what the newest run read: the imported bank (outside every plan) included
    assert main(["cache", "gc", "--store", str(tmp_path / "store")]) == 0
    assert BANK_ITEM in Store(tmp_path / "store").complete_items("bank_index", node.key)
    values_key = node.upstream["bank_values"].key
    assert Store(tmp_path / "store").complete_items("bank_values", values_key) == {ROWS}
    # a damaged row is found by cache verify and never returned (the read un-marks the store: imported again)
    path = tmp_path / "store" / "stages" / "bank_values" / values_key / ROW_FILE
    held = FileRows(Store(tmp_path / "store"), "bank_values", values_key)  # a long-lived serving process's reader
    data = bytearray(path.read_bytes())
    data[777 * 2 * D_VALUE + 5] ^= 0xFF  # row 777
    path.write_bytes(bytes(data))
    assert main(["cache", "verify", "--store", str(tmp_path / "store")]) == 1
    assert "row 777 does not match its CRC-32" in capsys.readouterr().out
    with pytest.raises(DamagedOutputError, match="row 777 does not match"):
        FileRows(Store(tmp_path / "store"), "bank_values", values_key).rows(np.array([3, 777, 2000]))
    assert main(["bank", "import", str(exp_file)]) == 0
    assert main(["cache", "verify", "--store", str(tmp_path / "store")]) == 0
    np.testing.assert_array_equal(FileRows(Store(tmp_path / "store"), "bank_values", values_key).rows(np.arange(N)),
                                  main_values)
    # the reader held across the re-import reads the new file, not the damaged one it held open (which it used to
    # report damaged, un-marking the re-imported store)
    np.testing.assert_array_equal(held.rows(np.array([777, 3, 2000])), main_values[[777, 3, 2000]])
    assert Store(tmp_path / "store").complete_items("bank_values", values_key) == {ROWS}


@pytest.mark.slow
def test_files_that_are_not_one_bank_are_refused(tmp_path, capsys):
    keys, main_values, _, index = _files(tmp_path)
    torch.save(torch.from_numpy(main_values[:-5]), tmp_path / "short_metaclip_b.pt")  # 5 rows fewer than indexed
    exp_file = _experiment(tmp_path, [tmp_path / "short_metaclip_b.pt", tmp_path / "synth_dfnclip_b.pt"],
                           tmp_path / "synth_radiov3.faiss")
    assert main(["bank", "import", str(exp_file)]) == 2
    assert "2500 rows, expected 2495" in capsys.readouterr().err  # the auxiliary store has another N
    torch.save(torch.from_numpy(main_values[:-5]), tmp_path / "short_dfnclip_b.pt")
    exp_file = _experiment(tmp_path, [tmp_path / "short_metaclip_b.pt", tmp_path / "short_dfnclip_b.pt"],
                           tmp_path / "synth_radiov3.faiss")
    assert main(["bank", "import", str(exp_file)]) == 2
    assert "out of range" in capsys.readouterr().err  # the index holds ids the stores lack
    torch.save({"not": "a tensor"}, tmp_path / "dict_metaclip_b.pt")
    exp_file = _experiment(tmp_path, [tmp_path / "dict_metaclip_b.pt"], tmp_path / "synth_radiov3.faiss")
    data = yaml.safe_load(exp_file.read_text())
    data["banks"][0]["clips"] = CLIPS[:1]
    exp_file.write_text(yaml.safe_dump(data))
    assert main(["bank", "import", str(exp_file)]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["2m"], indirect=True)
def test_an_import_onto_a_full_disk_exits_4_naming_the_store_and_leaves_no_temporary(tmp_path, small_disk, capsys):
    _files(tmp_path)
    exp_file = _experiment(tmp_path, [tmp_path / "synth_metaclip_b.pt", tmp_path / "synth_dfnclip_b.pt"],
                           tmp_path / "synth_radiov3.faiss")
    store = small_disk / "store"
    exp_file.write_text(exp_file.read_text().replace(str(tmp_path / "store"), str(store)))
    fill_disk(small_disk, leave=96 * 1024)  # room for the stage folders, not for a 160 kB row file
    assert main(["bank", "import", str(exp_file)]) == 4  # 2 before: a raw OSError, reported as bad input
    err = capsys.readouterr().err
    assert f"error: the store {store} cannot be written" in err and "No space left on device" in err, err
    assert "then rerun the same command" in err and "Traceback" not in err
    assert not list(store.rglob(".tmp-*")) and not list(store.rglob("values.f16"))
    os.remove(small_disk / "filler")
    assert main(["bank", "import", str(exp_file)]) == 0  # with room again, the same command completes
    assert main(["cache", "verify", "--store", str(store)]) == 0


@pytest.fixture(scope="module")
def imported_reference(tmp_path_factory):
    """The synthetic authors' files and a store they were imported into without interruption."""
    tmp = tmp_path_factory.mktemp("import-reference")
    _files(tmp)
    exp_file = _experiment(tmp, [tmp / "synth_metaclip_b.pt", tmp / "synth_dfnclip_b.pt"], tmp / "synth_radiov3.faiss")
    assert main(["bank", "import", str(exp_file)]) == 0
    return exp_file, tmp / "store"


def _leftovers(store: Path) -> list[str]:
    """What writers left in the store: temporaries, packs without a record, lease files."""
    st = Store(store)
    out = [str(p) for p in store.rglob("*") if is_temporary(p.name)]
    for stage, key in st.stage_sets():
        known = st.state(stage, key).known_packs()
        out += [str(p) for p in Path(st.stage_dir(stage, key), "packs").glob("*.zip")
                if p.stem not in known and not is_temporary(p.name)]
    return out + [str(p) for p in (store / LEASES).rglob("*.json")]


def _row_files(store) -> dict[str, bytes]:
    return {p.parent.parent.name: p.read_bytes() for p in (store / "stages" / "bank_values").glob(f"*/{ROW_FILE}")}


@pytest.mark.slow
@pytest.mark.parametrize("point", IMPORT_POINTS)
def test_a_sigkill_during_an_import_then_a_rerun_gives_the_store_of_an_uninterrupted_import(
        tmp_path, imported_reference, point, capsys):
    """Killed with half a row file in its temporary, with the row file in place before its ``rows`` item, with
    one value store complete, with the index pack's temporary complete, or with the pack in place before its
    record: no half-written row file or index counts as complete (``cache verify`` is clean), and a rerun gives
    the reference's items, row files and provenance, writing again only what the killed import had not
    completed."""
    ref_exp, reference = imported_reference
    store = tmp_path / "store"
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ref_exp.read_text().replace(str(reference), str(store)))
    code, out = finish(spawn_cli("bank", "import", str(exp_file), "-q", kill_point=point))
    assert code == -signal.SIGKILL, f"the import ended before the kill point {point!r} (exit {code}):\n{out[-2000:]}"
    killed = records_per_item(store)
    values_done = {"rows": 0, "rows_moved": 0, "values": 1, "pack": 2, "record": 2}[point]
    assert sorted(k[0] for k in killed) == ["bank_values"] * values_done, killed  # no index item: not imported
    if point == "rows":  # half the first store's rows in a temporary, never moved into place
        (tmp,) = store.glob(f"stages/bank_values/*/rows/.tmp-*{ROW_FILE.rsplit('/', 1)[-1]}")
        assert tmp.stat().st_size == N * D_VALUE  # half of N rows of D fp16 values
        assert not list(store.glob(f"stages/bank_values/*/{ROW_FILE}"))
    if point == "rows_moved":  # the whole row file in place, without the item of its CRCs: not complete
        (moved,) = store.glob(f"stages/bank_values/*/{ROW_FILE}")
        assert moved.stat().st_size == 2 * N * D_VALUE
        assert ROWS not in Store(store).complete_items("bank_values", moved.parent.parent.name)
    assert main(["cache", "verify", "--store", str(store)]) == 0  # nothing half-written is marked complete
    left = _leftovers(store)  # what the killed import left: its lease, a temporary or a pack without its record
    garbage = {"rows": 1, "rows_moved": 0, "values": 0, "pack": 1, "record": 1}[point]
    assert len(left) == 1 + garbage and sum(f"/{LEASES}/" in p for p in left) == 1, left
    for stage, key, item in killed:  # what is complete reads back as the reference's
        np.testing.assert_array_equal(Store(store).read_item(stage, key, item)["crc"],
                                      Store(reference).read_item(stage, key, item)["crc"])
    capsys.readouterr()
    assert main(["bank", "import", str(exp_file)]) == 0
    assert "2500 regions" in capsys.readouterr().out
    assert_same_outputs(store_snapshot(store), store_snapshot(reference))
    assert _row_files(store) == _row_files(reference) and len(_row_files(store)) == 2
    index = [(s, k) for s, k in Store(store).stage_sets() if s == "bank_index"]
    assert index and all(Store(store).item_attrs(s, k, BANK_ITEM) == Store(reference).item_attrs(s, k, BANK_ITEM)
                         for s, k in index)
    records = records_per_item(store)
    assert set(records.values()) == {1}  # every item written once: the value stores the killed import completed
    assert {k: 1 for k in killed} == {k: records[k] for k in killed}  # were not copied again
    assert main(["cache", "verify", "--store", str(store)]) == 0
    assert _leftovers(store) == []  # the rerun removed the dead import's temporary (or pack) and its lease


@pytest.mark.slow
def test_two_imports_at_once_write_each_store_once_and_never_remove_each_others_temporary(
        tmp_path, imported_reference, monkeypatch):
    """The first import pauses with half a row file in its temporary; the second, started then, waits for its lease
    (it neither removes that live temporary nor copies the store a second time); both end complete."""
    ref_exp, reference = imported_reference
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.mkdir()
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ref_exp.read_text().replace(str(reference), str(store)))
    monkeypatch.setenv("OVSEG_HOLD_DIR", str(hold))
    first = spawn_cli("bank", "import", str(exp_file), "-q", kill_point="rows_hold")
    end = time.time() + 300
    while not (hold / "held").exists() and first.poll() is None and time.time() < end:
        time.sleep(0.05)
    assert (hold / "held").exists(), finish(first)[1][-2000:]
    temporary = Path((hold / "held").read_text())
    second = spawn_cli("bank", "import", str(exp_file))  # not quiet: its log says when it waits
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ln.decode() for ln in iter(second.stdout.readline, b"")))
    reader.start()
    while not any("waiting for it" in ln for ln in lines) and second.poll() is None and time.time() < end:
        time.sleep(0.05)
    waited = any("waiting for it" in ln for ln in lines)
    still_there = temporary.exists()  # the second import met the first's live temporary and left it
    (hold / "go").touch()
    code, out = finish(first)
    reader.join(timeout=600)
    assert second.wait(timeout=600) == 0, "".join(lines)[-2000:]
    assert code == 0, out[-2000:]
    assert waited and still_there, "".join(lines)[-2000:]
    assert set(records_per_item(store).values()) == {1}  # each store copied once, the index written once
    assert_same_outputs(store_snapshot(store), store_snapshot(reference))
    assert _row_files(store) == _row_files(reference) and _leftovers(store) == []
    assert main(["cache", "verify", "--store", str(store)]) == 0
