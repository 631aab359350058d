"""Stage store: markers, keys, bulk completeness, gc, concurrency, tables."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from storage.keys import StageKey, canonical_json
from storage.store import MissingOutputError, Store
from storage.tables import MANIFEST_SCHEMA, read_table, write_table


def _key(stage="dino_features", **params) -> StageKey:
    return StageKey(stage, params or {"crop": 336}, {}, "1", {"name": "dino:tiny8", "random": True, "seed": 0})


def test_write_read_roundtrip(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    qk = np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float16)
    s.write_item(k, "img-a", {"qk": qk, "n": np.arange(3)}, {"note": "x"}, chunk_first_axis=["qk"])
    out = s.read_item("dino_features", k.key, "img-a")
    np.testing.assert_array_equal(out["qk"], qk)
    np.testing.assert_array_equal(out["n"], np.arange(3))
    with pytest.raises(ValueError, match="0-dimensional"):
        s.write_item(k, "img-b", {"n": np.int64(3)})
    assert s.item_attrs("dino_features", k.key, "img-a")["note"] == "x"
    assert s.stage_attrs("dino_features", k.key)["stage_key"]["params"] == {"crop": 336}


def test_output_without_marker_is_missing_and_rewritten(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    s.write_item(k, "img-a", {"x": np.arange(4)})
    # simulate a crash after the arrays but before the marker: drop the marker, corrupt the data
    marker = tmp_path / "st" / "stages" / "dino_features" / k.key / ".complete" / "img-a.json"
    marker.unlink()
    assert s.missing("dino_features", k.key, ["img-a"]) == ["img-a"]
    with pytest.raises(MissingOutputError, match="not complete"):
        s.read_item("dino_features", k.key, "img-a")
    done, partial = s.items("dino_features", k.key)
    assert done == set() and partial == {"img-a"}
    s.write_item(k, "img-a", {"y": np.ones(2)})
    assert set(s.read_item("dino_features", k.key, "img-a")) == {"y"}  # leftovers removed, not mixed in


def test_bulk_completeness(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    for i in range(5):
        s.write_item(k, f"img-{i}", {"x": np.full(3, i)})
    assert s.complete_items("dino_features", k.key) == {f"img-{i}" for i in range(5)}
    assert s.missing("dino_features", k.key, ["img-1", "img-9", "img-3"]) == ["img-9"]
    assert s.complete_items("dino_features", "0" * 20) == set()


def test_key_changes_with_params_code_weights_and_upstream():
    base = StageKey("clip_layers", {"crop": 224}, {"ingest": "u1"}, "1", {"name": "clip:tiny", "random": True})
    variants = [
        StageKey("clip_layers", {"crop": 336}, {"ingest": "u1"}, "1", {"name": "clip:tiny", "random": True}),
        StageKey("clip_layers", {"crop": 224}, {"ingest": "u2"}, "1", {"name": "clip:tiny", "random": True}),
        StageKey("clip_layers", {"crop": 224}, {"ingest": "u1"}, "2", {"name": "clip:tiny", "random": True}),
        StageKey("clip_layers", {"crop": 224}, {"ingest": "u1"}, "1", {"name": "clip:tiny", "random": True, "seed": 1}),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 5
    same = StageKey("clip_layers", {"crop": 224}, {"ingest": "u1"}, "1", {"random": True, "name": "clip:tiny"})
    assert same.key == base.key  # canonical JSON: key order does not matter
    assert base.is_random_weights


def test_canonical_json_rejects_nan():
    with pytest.raises(ValueError, match="not finite"):
        canonical_json({"tau": float("nan")})


def test_gc_removes_unreferenced_keys_and_leftovers(tmp_path: Path):
    s = Store(tmp_path / "st")
    k1, k2 = _key(crop=1), _key(crop=2)
    s.write_item(k1, "a", {"x": np.arange(2)})
    s.write_item(k1, "b", {"x": np.arange(2)})
    s.write_item(k2, "a", {"x": np.arange(2)})
    (tmp_path / "st" / "stages" / "dino_features" / k1.key / ".complete" / "b.json").unlink()
    plan = s.gc(keep=[("dino_features", k1.key)], dry_run=True)
    assert any(k2.key in p for p in plan) and any(p.endswith("/b") for p in plan)
    assert s.complete_items("dino_features", k2.key) == {"a"}  # dry run removed nothing
    s.gc(keep=[("dino_features", k1.key)])
    assert [(i.stage, i.key) for i in s.list_stages()] == [("dino_features", k1.key)]
    assert s.items("dino_features", k1.key) == ({"a"}, set())


def _writer(root: str, start: int, n: int) -> None:
    s = Store(root)
    k = _key()
    for i in range(start, start + n):
        s.write_item(k, f"img-{i:03d}", {"x": np.full((8, 8), i, dtype=np.int32)})


def test_two_processes_writing_one_store_lose_nothing(tmp_path: Path):
    root = str(tmp_path / "st")
    Store(root)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, 0, 20)), ctx.Process(target=_writer, args=(root, 20, 20))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = Store(root)
    k = _key()
    assert s.complete_items("dino_features", k.key) == {f"img-{i:03d}" for i in range(40)}
    for i in (0, 19, 20, 39):
        assert (s.read_item("dino_features", k.key, f"img-{i:03d}")["x"] == i).all()


def test_claims_exclude_a_second_claimant_and_expire_for_dead_processes(tmp_path: Path):
    s = Store(tmp_path / "st")
    assert s.try_claim("st", "k", "a")
    assert not s.try_claim("st", "k", "a")
    s.release("st", "k", "a")
    assert s.try_claim("st", "k", "a")
    lock = tmp_path / "st" / "locks" / "st" / "k" / "a.lock"
    lock.write_text('{"host": "%s", "pid": 999999999, "time": 1e12}' % __import__("socket").gethostname())
    assert s.try_claim("st", "k", "a")  # holder is gone: stale lock taken over


def test_memory_url_store():
    s = Store("memory://ovseg-test-store")
    k = _key()
    s.write_item(k, "a", {"x": np.arange(3)})
    assert s.complete_items("dino_features", k.key) == {"a"}
    np.testing.assert_array_equal(s.read_item("dino_features", k.key, "a")["x"], np.arange(3))


def test_tables_roundtrip_with_schema(tmp_path: Path):
    s = Store(tmp_path / "st")
    row = dict(dataset="voc", image_id="x-1", rel_path="a.jpg", abs_path="/a.jpg", gt_path="", width=3, height=2,
               content_sha256="ab", status="ok", error="", file_stat="3:1")
    write_table(s, "manifests", "voc", [row])
    t = read_table(s, "manifests")
    assert t.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert t.to_pylist() == [row]
    with pytest.raises(ValueError, match="lack fields"):
        write_table(s, "manifests", "bad", [{"dataset": "voc"}])
    with pytest.raises(ValueError, match="unknown table"):
        write_table(s, "nope", "x", [row])


def test_bad_names_rejected(tmp_path: Path):
    s = Store(tmp_path / "st")
    with pytest.raises(ValueError, match="invalid item name"):
        s.write_item(_key(), "../evil", {"x": np.arange(1)})


def test_tables_written_with_an_older_schema_stay_readable(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = Store(tmp_path / "st")
    old = MANIFEST_SCHEMA.remove(MANIFEST_SCHEMA.get_field_index("file_stat"))
    row = dict(dataset="voc", image_id="x-1", rel_path="a.jpg", abs_path="/a.jpg", gt_path="", width=3, height=2,
               content_sha256="ab", status="ok", error="")
    path = Path(s.table_path("manifests", "voc"))
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old), path)
    assert read_table(s, "manifests").to_pylist() == [{**row, "file_stat": ""}]
