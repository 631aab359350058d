"""Trustworthy overnight state, end to end on real stores: dead leases, honest outcomes, damaged outputs and
metadata, gc at the wrong time, fail-fast validation, a broken lease folder, a backbone that cannot load."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import assert_same_outputs, computed, store_snapshot, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect

SCCLIP = [{"name": "scclip", "method": "scclip"}]



def _yaml(exp, path: Path) -> Path:
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


def _node(exp, stage: str):
    return next(n for n in build_plan(exp)[0].nodes.values() if n.stage == stage)


def _ids(store: Path) -> list[str]:
    return sorted(r["image_id"] for r in read_table(Store(store), "manifests", ["voc"]).to_pylist())


def _lease(store: Path, node, items: list[str], heartbeat: float, ttl: float, lease_id: str = "0000000000000001-aa"):
    path = store / "leases" / node.stage / node.key / f"{lease_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"owner": {"host": "another-container", "pid": 1, "run_id": "20260101T000000Z-dead00"},
                                "items": items, "created": heartbeat, "heartbeat": heartbeat, "ttl": ttl}))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A complete CorrCLIP + SC-CLIP run on two images, and its outputs."""
    store = tmp_path_factory.mktemp("reference") / "store"
    summary = run_experiment(tiny_experiment(store), progress=False)
    assert summary.status == "complete" and summary.exit_code == 0
    return store, store_snapshot(store)


def _copy(reference, tmp_path: Path) -> tuple[Path, object]:
    store = tmp_path / "store"
    shutil.copytree(reference[0], store)
    return store, tiny_experiment(store)


# 1. a dead run's lease never blocks a rerun for longer than the TTL, wherever its owner ran
def test_a_stale_lease_of_another_host_is_taken_over(tmp_path):
    store = tmp_path / "store"
    exp = tiny_experiment(store, methods=SCCLIP)
    run_experiment(exp, progress=False, only_stages=["text_embeddings"])
    ids = _ids(store)
    clip = _node(exp, "clip_layers")
    old = _lease(store, clip, ids, heartbeat=time.time() - 3600, ttl=120)  # killed an hour ago elsewhere
    summary = run_experiment(exp, progress=False)
    assert summary.status == "complete" and computed(summary)["clip_layers"] == 2
    assert not old.exists()


def test_a_lease_whose_heartbeat_stops_is_waited_for_at_most_its_ttl(tmp_path):
    store = tmp_path / "store"
    exp = tiny_experiment(store, methods=SCCLIP)
    run_experiment(exp, progress=False, only_stages=["text_embeddings"])
    _lease(store, _node(exp, "clip_layers"), _ids(store), heartbeat=time.time(), ttl=4)  # alive now, then silent
    t0 = time.time()
    summary = run_experiment(exp, progress=False)
    assert summary.status == "complete" and computed(summary)["clip_layers"] == 2
    assert time.time() - t0 < 120  # waited about 4 s for the lease to die, not for hours


# 2. incomplete runs do not look complete; a partial score never replaces a complete one
def test_busy_items_make_the_run_incomplete_and_keep_the_complete_scores(reference, tmp_path, capsys):
    store, exp = _copy(reference, tmp_path)
    before = {m["method"]: m for m in read_table(Store(store), "metrics").to_pylist() if m["class_index"] == -1}
    assert all(m["complete"] and m["images"] == m["images_total"] == 2 for m in before.values())
    score = next(mp.scoring for mp in build_plan(exp)[0].methods if mp.entry.name == "corrclip")
    victim = _ids(store)[0]
    Store(store).drop_items(score.stage, score.key, [victim], reason="test")
    _lease(store, score, [victim], heartbeat=time.time(), ttl=600)  # another live run holds it
    exp_file = _yaml(exp, tmp_path / "exp.yaml")
    assert main(["run", str(exp_file), "--no-wait", "-q"]) == 3
    out = capsys.readouterr().out
    assert "incomplete" in out and "being computed by run 20260101T000000Z-dead00 on another-container" in out
    assert "1/2 (partial)" in out and "were not stored over the complete scores" in out
    after = {m["method"]: m for m in read_table(Store(store), "metrics").to_pylist() if m["class_index"] == -1}
    assert after["corrclip"]["run_id"] == before["corrclip"]["run_id"] and after["corrclip"]["images"] == 2
    runs, _ = Store(store).runs()
    assert runs[-1].status == "incomplete" and runs[-1].data["exit_code"] == 3


# 3. a missing, truncated or altered output is never read as data; it is recomputed
def test_deleted_and_truncated_packs_are_reported_and_recomputed(reference, tmp_path, capsys):
    store, exp = _copy(reference, tmp_path)
    clip = _node(exp, "clip_layers")
    dino = _node(exp, "dino_features")
    (clip_pack,) = (store / "stages" / "clip_layers" / clip.key / "packs").glob("*.zip")
    (dino_pack,) = (store / "stages" / "dino_features" / dino.key / "packs").glob("*.zip")
    clip_pack.unlink()
    dino_pack.write_bytes(dino_pack.read_bytes()[: dino_pack.stat().st_size // 3])
    assert main(["cache", "verify", "--store", str(store), "--sizes-only"]) == 1
    out = capsys.readouterr().out
    assert "is missing" in out and "truncated" in out and "--repair" in out
    summary = run_experiment(exp, progress=False)  # a plain rerun finds and recomputes exactly those
    assert summary.status == "complete"
    assert computed(summary) == {"clip_layers": 2, "dino_features": 2}
    assert any("missing or truncated" in n for n in summary.notes)
    assert_same_outputs(store_snapshot(store), reference[1])
    assert main(["cache", "verify", "--store", str(store)]) == 0


def test_altered_bytes_are_caught_by_checksum_and_repaired(reference, tmp_path, capsys):
    store, exp = _copy(reference, tmp_path)
    mct = _node(exp, "mask_class_tokens")
    (pack,) = (store / "stages" / "mask_class_tokens" / mct.key / "packs").glob("*.zip")
    record = json.loads((pack.parent.parent / "records" / f"{pack.stem}.json").read_text())
    chunk = next(m for m in next(iter(record["items"].values()))["members"] if "/c/" in m[0])
    data = bytearray(pack.read_bytes())
    data[chunk[1] + chunk[2] // 2] ^= 0xFF  # same size: only the CRC-32 tells
    pack.write_bytes(bytes(data))
    assert main(["cache", "verify", "--store", str(store), "--stage", "mask_class_tokens", "--repair"]) == 1
    assert "CRC-32" in capsys.readouterr().out
    summary = run_experiment(exp, progress=False)
    assert computed(summary) == {"mask_class_tokens": 1}
    assert_same_outputs(store_snapshot(store), reference[1])


# 4. one damaged metadata file never stops a command, and the error names the file and the fix
def test_damaged_record_stage_metadata_and_tables_name_the_file_and_runs_continue(reference, tmp_path, capsys, caplog):
    store, exp = _copy(reference, tmp_path)
    clip = _node(exp, "clip_layers")
    (record,) = (store / "stages" / "clip_layers" / clip.key / "records").glob("*.json")
    record.write_text(record.read_text()[:50])
    text = _node(exp, "text_embeddings")
    stage_json = store / "stages" / "text_embeddings" / text.key / "stage.json"
    stage_json.write_text("{\"stage_key\": {")
    (store / "tables" / "manifests" / "voc.parquet").write_bytes(b"garbage, not parquet")
    (store / "tables" / "metrics" / "tiny--voc.parquet").write_bytes(b"PAR1 truncated")
    run_file = next((store / "tables" / "runs").glob("*.parquet"))
    run_file.write_bytes(b"garbage")
    assert main(["cache", "ls", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert str(record) in out and "(stage.json damaged)" in out
    summary = run_experiment(exp, progress=False)
    assert summary.status == "complete" and computed(summary) == {"clip_layers": 2}
    messages = " ".join(r.getMessage() for r in caplog.records) + " ".join(summary.notes)
    assert str(record) in messages and "voc.parquet" in messages and "re-ingest" in messages.lower()
    assert "tiny--voc.parquet" in messages
    assert json.loads(stage_json.read_text())["stage_key"] == text.stage_key.payload()  # rewritten from the plan
    assert read_table(Store(store), "metrics", ["tiny--voc"]).num_rows == 2 * 22  # rebuilt
    assert main(["runs", "--store", str(store)]) == 0  # the journals still list every run
    assert run_file.stem in capsys.readouterr().out
    assert not record.exists()  # the stale unreadable record went once its items were complete again
    from flows.report_data import load_runs

    notes: list[str] = []
    runs = load_runs(Store(store), notes)  # the other runs keep their rows: only the garbage file is skipped
    assert "voc" in runs[summary.run_id].datasets  # read from this run's runs-table file (journals lack it)
    assert any(str(run_file) in n and "that run is shown from its journal" in n for n in notes)
    assert main(["cache", "verify", "--store", str(store)]) == 1  # verify checks the tables too
    out = capsys.readouterr().out
    assert str(run_file) in out and str(record) not in out
    assert main(["cache", "verify", "--store", str(store), "--repair"]) == 1
    assert not run_file.exists()
    assert main(["cache", "verify", "--store", str(store)]) == 0


# 5. gc never deletes what a live run or the newest run of an experiment needs
def test_gc_refuses_during_a_live_run_and_keeps_its_plan(reference, tmp_path, capsys):
    store, exp = _copy(reference, tmp_path)
    journal = Store(store).journal("29990101T000000Z-live00", {
        "experiment": "someone-else", "plan": [{"dataset": "voc", "stage": n.stage, "key": n.key}
                                                for n in build_plan(tiny_experiment(store, methods=SCCLIP))[0].nodes.values()]})
    journal.start()
    try:
        assert main(["cache", "gc", "--store", str(store), "--only-experiments"]) == 2
        assert "29990101T000000Z-live00" in capsys.readouterr().err
        assert main(["cache", "gc", "--store", str(store), "--only-experiments", "--force"]) == 0
    finally:
        journal.finish("complete", 0)
    left = {s for s, _ in Store(store).stage_sets()}
    assert left == {"text_embeddings", "clip_layers", "reconstruction", "scoring"}  # exactly the live run's plan


def test_gc_after_running_one_stage_keeps_the_whole_experiment(reference, tmp_path, capsys):
    store, exp = _copy(reference, tmp_path)
    exp_file = _yaml(exp, tmp_path / "exp.yaml")
    assert main(["stage", "map_correction", str(exp_file), "-q"]) == 0
    before = set(Store(store).stage_sets())
    assert main(["cache", "gc", "--store", str(store)]) == 0
    assert set(Store(store).stage_sets()) == before
    assert_same_outputs(store_snapshot(store), reference[1])


# fail fast, delete late
@pytest.mark.parametrize("overrides,message", [
    ({"device": "cuda:0"}, "CUDA is not available"),
    ({"methods": [{"name": "s", "method": "scclip", "window": {"crop": 112, "stride": 200}}]}, "must not exceed"),
    ({"models": {"clip": "clip:ViT-B-16@openai", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0"}},
     "ViT-B-16.pt"),
    ({"methods": [{"name": "s", "method": "scclip", "params": {"contamination": 7}}]}, "contamination"),
])
def test_an_invalid_plan_touches_no_store_and_deletes_nothing(reference, tmp_path, monkeypatch, overrides, message):
    monkeypatch.delenv("OVSEG_WEIGHTS", raising=False)
    fresh = tmp_path / "fresh"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_experiment(tiny_experiment(fresh, **overrides), progress=False)
    assert not fresh.exists()
    store, exp = _copy(reference, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_experiment(tiny_experiment(store, **overrides), force=["clip_layers"], progress=False)
    assert_same_outputs(store_snapshot(store), reference[1])  # --force deleted nothing


def test_a_broken_lease_folder_fails_items_not_the_run(tmp_path, capsys):
    store = tmp_path / "store"
    exp = tiny_experiment(store, methods=SCCLIP)
    Store(store)
    (store / "leases").write_text("a file where the lease folder must be (as good as a full disk)")
    assert main(["run", str(_yaml(exp, tmp_path / "exp.yaml")), "-q"]) == 1
    out = capsys.readouterr().out
    assert "LeaseError" in out and "Traceback" not in out


def test_a_corrupted_checkpoint_fails_its_stage_once(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "dino_deitsmall16_pretrain.pth").write_bytes(b"not a checkpoint")
    voc = tiny_experiment(tmp_path).datasets[0].model_dump()
    exp = tiny_experiment(tmp_path / "store", models={"clip": "clip:tiny@random:0", "dino": "dino:vits16",
                                                     "sam": "sam:tiny@random:0", "weights_dir": str(weights)},
                          runner={"kind": "local", "workers": 1, "batch_size": 1}, datasets=[{**voc, "limit": 3}])
    summary = run_experiment(exp, progress=False)
    assert summary.exit_code == 1
    dino = next(s for s in summary.stages if s.stage == "dino_features")
    assert dino.failed == 3 and {f[1] for f in dino.failures} == {"BackboneLoadError"}
    assert any("not attempted" in f[2] for f in dino.failures)  # the second batch never tried to load it again
    assert all("dino_deitsmall16_pretrain.pth" in f[2] for f in dino.failures)
    scclip = next(m for m in summary.metrics if m["method"] == "scclip" and m["class_index"] == -1)
    assert scclip["complete"]  # what does not need DINO still ran
