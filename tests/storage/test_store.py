"""Stage store: packs readable by zarr, completion records, verified reads, damage, registration, tables."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.fserrors import StoreWriteError
from storage.keys import StageKey, canonical_json
from storage.maintenance import list_stages
from storage.store import DamagedOutputError, MissingOutputError, Store, StoreError, StoreNotFoundError
from storage.tables import MANIFEST_SCHEMA, read_table, write_table


def _key(stage="dino_features", **params) -> StageKey:
    return StageKey(stage, params or {"crop": 336}, {}, "1", {"name": "dino:tiny8", "random": True, "seed": 0})


ARRAYS = {
    "qk": np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float16),
    "ids": np.arange(12, dtype=np.int32).reshape(3, 4),
    "n": np.arange(3, dtype=np.int64),
    "empty": np.zeros((0, 5), np.float32),
    "flags": np.array([True, False, True]),
    "big_endian": np.arange(4, dtype=">u2"),
}


def _files(root: Path, key: StageKey, folder: str) -> list[Path]:
    return sorted((root / "stages" / key.stage / key.key / folder).glob("*"))


def test_pack_roundtrip_and_zarr_reads_the_same_bytes(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    with s.open_pack(k, {"software": {"x": "1"}}) as pack:
        for i in range(3):
            pack.add(f"img-{i}", {name: a + i if a.dtype.kind in "iuf" else a for name, a in ARRAYS.items()},
                     {"seconds": 0.5, "i": i})
    assert s.complete_items(k.stage, k.key) == {"img-0", "img-1", "img-2"}
    out = s.read_item(k.stage, k.key, "img-2")
    for name, a in ARRAYS.items():
        expected = a + 2 if a.dtype.kind in "iuf" else a
        np.testing.assert_array_equal(out[name], expected)
        assert out[name].dtype == expected.dtype.newbyteorder("=") and out[name].flags.writeable
    assert set(s.read_item(k.stage, k.key, "img-0", ["ids"])) == {"ids"}
    assert s.item_attrs(k.stage, k.key, "img-1")["i"] == 1
    assert s.item_attrs(k.stage, k.key, "img-1")["record"]["software"] == {"x": "1"}
    # an independent decoder: zarr itself opens the pack as a Zarr v3 hierarchy
    (pack_file,) = _files(tmp_path / "st", k, "packs")
    g = zarr.open_group(zarr.storage.ZipStore(pack_file, mode="r"), mode="r")
    assert g.attrs["stage"] == "dino_features" and dict(g["img-1"].attrs)["i"] == 1
    for name, a in ARRAYS.items():
        np.testing.assert_array_equal(g[f"img-1/{name}"][...], a + 1 if a.dtype.kind in "iuf" else a)
    # one pack and one record for the whole batch: 2 files for 3 items
    assert len(_files(tmp_path / "st", k, "packs")) == len(_files(tmp_path / "st", k, "records")) == 1
    # a fresh Store object (another process) sees the same state
    assert Store(tmp_path / "st").complete_items(k.stage, k.key) == {"img-0", "img-1", "img-2"}


def test_bad_names_and_arrays_are_rejected(tmp_path: Path):
    s = Store(tmp_path / "st")
    with pytest.raises(ValueError, match="invalid item name"):
        s.write_item(_key(), "../evil", {"x": np.arange(1)})
    with pytest.raises(ValueError, match="0-dimensional"):
        s.write_item(_key(), "a", {"n": np.int64(3)})
    with pytest.raises(ValueError, match="dtype object"):
        s.write_item(_key(), "a", {"n": np.array([object()])})
    assert s.complete_items("dino_features", _key().key) == set()


def test_an_item_is_complete_only_with_its_record(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    s.write_item(k, "a", {"x": np.arange(4)})
    (rec,) = _files(tmp_path / "st", k, "records")
    rec.unlink()  # the writer died after moving the pack into place, before its record
    fresh = Store(tmp_path / "st")
    assert fresh.missing(k.stage, k.key, ["a"]) == ["a"]
    with pytest.raises(MissingOutputError, match="not complete"):
        fresh.read_item(k.stage, k.key, "a")
    assert s.complete_items(k.stage, k.key) == set()  # a long-lived store object notices the removal too
    s.write_item(k, "a", {"y": np.ones(2)})
    assert set(Store(tmp_path / "st").read_item(k.stage, k.key, "a")) == {"y"}


def _damage_cases():
    def delete(path: Path, member) -> None:
        path.unlink()

    def truncate(path: Path, member) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: member[1] + member[2] // 2])

    def flip(path: Path, member) -> None:
        data = bytearray(path.read_bytes())
        data[member[1] + 3] ^= 0x5A
        path.write_bytes(bytes(data))

    return [("deleted", delete, "missing"), ("truncated", truncate, "truncated"), ("altered", flip, "CRC-32")]


@pytest.mark.parametrize("name,damage,message", _damage_cases())
def test_damaged_data_is_never_returned_and_the_item_is_unmarked(tmp_path: Path, name, damage, message):
    s = Store(tmp_path / "st")
    k = _key()
    with s.open_pack(k) as pack:
        pack.add("a", {"qk": ARRAYS["qk"]}, {})
        pack.add("b", {"qk": ARRAYS["qk"] + 1}, {})
    (pack_file,) = _files(tmp_path / "st", k, "packs")
    (rec_file,) = _files(tmp_path / "st", k, "records")
    rec = json.loads(rec_file.read_text())
    chunk = next(m for m in rec["items"]["b"]["members"] if m[0] == "b/qk/c/0/0/0/0")
    damage(pack_file, chunk)
    reader = Store(tmp_path / "st")
    with pytest.raises(DamagedOutputError, match=message):
        reader.read_item(k.stage, k.key, "b")
    assert "b" not in reader.complete_items(k.stage, k.key)
    assert "b" not in Store(tmp_path / "st").complete_items(k.stage, k.key)  # recorded for every later run
    if name != "deleted":  # an intact item of a damaged pack stays readable unless its bytes are gone
        np.testing.assert_array_equal(reader.read_item(k.stage, k.key, "a")["qk"], ARRAYS["qk"])
    reader.write_item(k, "b", {"qk": ARRAYS["qk"] + 1})
    np.testing.assert_array_equal(Store(tmp_path / "st").read_item(k.stage, k.key, "b")["qk"], ARRAYS["qk"] + 1)


def test_unreadable_record_and_stage_metadata_do_not_stop_anything(tmp_path: Path, caplog):
    s = Store(tmp_path / "st")
    k1, k2 = _key(crop=1), _key(crop=2)
    s.write_item(k1, "a", {"x": np.arange(3)})
    s.write_item(k2, "a", {"x": np.arange(3)})
    (rec,) = _files(tmp_path / "st", k1, "records")
    rec.write_bytes(rec.read_bytes()[:25])  # truncated JSON
    stage_json = tmp_path / "st" / "stages" / k2.stage / k2.key / "stage.json"
    stage_json.write_text('{"stage_key": {"par')
    fresh = Store(tmp_path / "st")
    assert fresh.complete_items(k1.stage, k1.key) == set()  # that record's items are incomplete
    assert any(str(rec) in r.getMessage() for r in caplog.records)
    infos = {i.key: i for i in list_stages(fresh)}
    assert str(rec) in infos[k1.key].damaged_files[0]
    assert "stage.json is unreadable" in infos[k2.key].attrs["damaged"] and "rerun" in infos[k2.key].attrs["damaged"]
    assert fresh.read_item(k2.stage, k2.key, "a")["x"].tolist() == [0, 1, 2]  # the data itself is fine
    fresh.register_stage(k2)  # a run that knows the key rewrites it
    assert json.loads(stage_json.read_text())["stage_key"] == k2.payload()


def _register_many(root: str, worker: int, n: int) -> None:
    s = Store(root)
    for i in range(n):
        s.register_stage(StageKey(f"stage{i}", {"p": i}, {}, "1"))
        s.write_item(StageKey(f"stage{i}", {"p": i}, {}, "1"), f"w{worker}", {"x": np.full(2, worker)})


@pytest.mark.slow
def test_four_processes_register_the_same_twenty_stages(tmp_path: Path):
    root = str(tmp_path / "st")
    Store(root)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(root, w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    s = Store(root)
    assert len(s.stage_sets()) == 20
    for i in range(20):
        k = StageKey(f"stage{i}", {"p": i}, {}, "1")
        assert s.stage_attrs(k.stage, k.key)["stage_key"] == k.payload()
        assert s.complete_items(k.stage, k.key) == {f"w{w}" for w in range(4)}


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


def test_read_only_open_of_a_missing_store_creates_nothing(tmp_path: Path):
    with pytest.raises(StoreNotFoundError, match="no ovseg store"):
        Store(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


def test_a_store_of_the_earlier_format_is_named(tmp_path: Path):
    old = tmp_path / "old"
    (old / "stages" / "x").mkdir(parents=True)
    (old / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(StoreError, match="earlier ovseg"):
        Store(old)


def test_memory_url_store():
    s = Store("memory://ovseg-test-store")
    k = _key()
    s.write_item(k, "a", {"x": np.arange(3)})
    assert Store("memory://ovseg-test-store").complete_items("dino_features", k.key) == {"a"}
    np.testing.assert_array_equal(s.read_item("dino_features", k.key, "a")["x"], np.arange(3))


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


def test_an_altered_zarr_metadata_member_is_never_read_as_data(tmp_path):
    """A pack's ``zarr.json`` members are what Zarr readers of the pack see: a read checks them too."""
    s = Store(tmp_path / "s")
    sk = StageKey("dino_features", {"v": 1}, {}, "1")
    s.write_item(sk, "img1", {"qk": np.arange(12, dtype=np.float32).reshape(3, 4)}, {})
    st = s.state(sk.stage, sk.key)
    pack = st.pack_of("img1")
    (meta,) = [m for m in st.record(pack).items["img1"].members if m.name == "img1/qk/zarr.json"]
    path = tmp_path / "s" / "stages" / sk.stage / sk.key / "packs" / f"{pack}.zip"
    data = bytearray(path.read_bytes())
    data[meta.offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedOutputError, match="img1/qk/zarr.json fails its CRC-32 check"):
        s.read_item(sk.stage, sk.key, "img1")
    assert s.complete_items(sk.stage, sk.key) == set()  # un-marked: the next run recomputes it


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_a_pack_onto_a_full_disk_is_a_store_write_error_and_leaves_nothing_behind(small_disk: Path):
    s = Store(small_disk / "st")
    k = _key()
    s.register_stage(k)
    big = np.random.default_rng(1).standard_normal((300, 1024)).astype(np.float32)  # 1.2 MB, incompressible
    with pytest.raises(StoreWriteError, match=r"cannot write .*/packs/.*\.zip: No space left on device") as got:
        with s.open_pack(k) as pack:
            pack.add("a", {"x": big[:10]}, {})
            pack.add("b", {"x": big}, {})  # raw OSError(ENOSPC) before: the CLI's exit 2, a "bad input" error
    assert got.value.errno == errno.ENOSPC
    assert not list(small_disk.rglob(".tmp-*")) and not _files(small_disk / "st", k, "packs")
    assert s.complete_items(k.stage, k.key) == set()
    s.write_item(k, "a", {"x": big[:10]})  # the space is free again: the same store takes a pack
    np.testing.assert_array_equal(Store(small_disk / "st").read_item(k.stage, k.key, "a")["x"], big[:10])
