"""The store on a live S3 endpoint (moto's server on localhost): every guarantee the local store tests
show, over the S3 protocol, plus what is particular to it (conditional writes, listings, request counts)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.fsio import Backend
from storage.keys import StageKey
from storage.leases import LeaseManager
from storage.maintenance import gc, list_stages, verify
from storage.store import DamagedOutputError, MissingOutputError, Store, StoreError, StoreNotFoundError
from tests.s3server import S3Server, shared_server
from tests.storage.lease_race import assert_racing_claims_cover_every_item

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3() -> S3Server:
    return shared_server()


@pytest.fixture
def url(s3: S3Server) -> str:
    """A new store location in a new bucket."""
    return f"s3://{s3.create_bucket()}/st"


def _key(stage: str = "dino_features", **params) -> StageKey:
    return StageKey(stage, params or {"crop": 336}, {}, "1", {"name": "dino:tiny8", "random": True, "seed": 0})


def _objects(s3: S3Server, url: str, key: StageKey, folder: str) -> list[str]:
    """Object keys of one folder of a stage output set, listed by an independent client."""
    bucket, prefix = url[len("s3://"):].split("/", 1)
    resp = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/stages/{key.stage}/{key.key}/{folder}/")
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _bucket(url: str) -> str:
    return url[len("s3://"):].split("/", 1)[0]


def _get(s3: S3Server, url: str, obj: str) -> bytes:
    return s3.client().get_object(Bucket=_bucket(url), Key=obj)["Body"].read()


def _put(s3: S3Server, url: str, obj: str, data: bytes) -> None:
    s3.client().put_object(Bucket=_bucket(url), Key=obj, Body=data)


def _delete(s3: S3Server, url: str, obj: str) -> None:
    s3.client().delete_object(Bucket=_bucket(url), Key=obj)


ARRAYS = {
    "qk": np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float16),
    "ids": np.arange(12, dtype=np.int32).reshape(3, 4),
    "empty": np.zeros((0, 5), np.float32),
    "flags": np.array([True, False, True]),
}


def test_pack_roundtrip_and_zarr_reads_the_same_bytes(s3, url, tmp_path):
    s = Store(url)
    k = _key()
    with s.open_pack(k, {"software": {"x": "1"}}) as pack:
        for i in range(3):
            pack.add(f"img-{i}", {n: a + i if a.dtype.kind in "iuf" else a for n, a in ARRAYS.items()}, {"i": i})
    fresh = Store(url)  # another process's view: nothing cached
    assert fresh.complete_items(k.stage, k.key) == {"img-0", "img-1", "img-2"}
    out = fresh.read_item(k.stage, k.key, "img-2")
    for name, a in ARRAYS.items():
        np.testing.assert_array_equal(out[name], a + 2 if a.dtype.kind in "iuf" else a)
        assert out[name].dtype == a.dtype
    assert fresh.item_attrs(k.stage, k.key, "img-1")["i"] == 1
    (pack_key,) = _objects(s3, url, k, "packs")
    assert len(_objects(s3, url, k, "records")) == 1  # one pack and one record for the whole batch
    local = tmp_path / "pack.zip"  # an independent decoder: zarr opens the downloaded object
    local.write_bytes(_get(s3, url, pack_key))
    assert zipfile.is_zipfile(local)
    g = zarr.open_group(zarr.storage.ZipStore(local, mode="r"), mode="r")
    np.testing.assert_array_equal(g["img-1/qk"][...], ARRAYS["qk"] + 1)


def test_an_item_is_complete_only_with_its_record(s3, url):
    s = Store(url)
    k = _key()
    s.write_item(k, "a", {"x": np.arange(4)})
    (rec,) = _objects(s3, url, k, "records")
    _delete(s3, url, rec)  # the writer died after uploading the pack, before its record
    fresh = Store(url)
    assert fresh.missing(k.stage, k.key, ["a"]) == ["a"]
    with pytest.raises(MissingOutputError, match="not complete"):
        fresh.read_item(k.stage, k.key, "a")
    assert s.complete_items(k.stage, k.key) == set()  # a long-lived store object notices the removal too


def test_records_written_by_another_process_are_listed(s3, url):
    """No listing cache hides what another process wrote (records, and damage to packs)."""
    reader = Store(url)
    k = _key()
    assert reader.complete_items(k.stage, k.key) == set()
    writer = Store(url, storage_options=s3.storage_options())  # another client: a separate s3fs instance
    writer.write_item(k, "a", {"x": np.arange(4)})
    assert reader.complete_items(k.stage, k.key) == {"a"}
    assert list_stages(reader)[0].nbytes > 0  # a full listing, then the pack shrinks behind its back
    (pack,) = _objects(s3, url, k, "packs")
    _put(s3, url, pack, _get(s3, url, pack)[:40])
    (rep,) = verify(reader)
    assert [i for i, _ in rep.damaged] == ["a"] and "truncated" in rep.damaged[0][1]


def _damage_cases():
    def delete(s3, url, obj, member) -> None:
        _delete(s3, url, obj)

    def truncate(s3, url, obj, member) -> None:
        _put(s3, url, obj, _get(s3, url, obj)[: member[1] + member[2] // 2])

    def truncate_before_item(s3, url, obj, member) -> None:  # the ranged GET starts past the end
        _put(s3, url, obj, _get(s3, url, obj)[:10])

    def flip(s3, url, obj, member) -> None:
        data = bytearray(_get(s3, url, obj))
        data[member[1] + 3] ^= 0x5A
        _put(s3, url, obj, bytes(data))

    return [("deleted", delete, "missing"), ("truncated", truncate, "truncated"),
            ("truncated-before", truncate_before_item, "truncated"), ("altered", flip, "CRC-32")]


@pytest.mark.parametrize("name,damage,message", _damage_cases())
def test_damaged_object_is_never_returned_and_the_item_is_unmarked(s3, url, name, damage, message):
    s = Store(url)
    k = _key()
    with s.open_pack(k) as pack:
        pack.add("a", {"qk": ARRAYS["qk"]}, {})
        pack.add("b", {"qk": ARRAYS["qk"] + 1}, {})
    (pack_obj,) = _objects(s3, url, k, "packs")
    (rec_obj,) = _objects(s3, url, k, "records")
    rec = json.loads(_get(s3, url, rec_obj))
    damage(s3, url, pack_obj, next(m for m in rec["items"]["b"]["members"] if m[0] == "b/qk/c/0/0/0/0"))
    reader = Store(url)
    with pytest.raises(DamagedOutputError, match=message):
        reader.read_item(k.stage, k.key, "b")
    assert "b" not in reader.complete_items(k.stage, k.key)
    assert "b" not in Store(url).complete_items(k.stage, k.key)  # recorded in the store for every later run
    assert len(_objects(s3, url, k, "drops")) == 1
    if name in ("truncated", "altered"):  # an intact item of a damaged pack stays readable
        np.testing.assert_array_equal(reader.read_item(k.stage, k.key, "a")["qk"], ARRAYS["qk"])
    reader.write_item(k, "b", {"qk": ARRAYS["qk"] + 1})
    np.testing.assert_array_equal(Store(url).read_item(k.stage, k.key, "b")["qk"], ARRAYS["qk"] + 1)


def test_unreadable_record_and_stage_metadata_do_not_stop_anything(s3, url):
    s = Store(url)
    k1, k2 = _key(crop=1), _key(crop=2)
    s.write_item(k1, "a", {"x": np.arange(3)})
    s.write_item(k2, "a", {"x": np.arange(3)})
    (rec,) = _objects(s3, url, k1, "records")
    _put(s3, url, rec, _get(s3, url, rec)[:25])
    stage_json = f"st/stages/{k2.stage}/{k2.key}/stage.json"
    _put(s3, url, stage_json, b'{"stage_key": {"par')
    fresh = Store(url)
    assert fresh.complete_items(k1.stage, k1.key) == set()
    infos = {i.key: i for i in list_stages(fresh)}
    assert rec in infos[k1.key].damaged_files[0]
    assert "stage.json is unreadable" in infos[k2.key].attrs["damaged"]
    assert fresh.read_item(k2.stage, k2.key, "a")["x"].tolist() == [0, 1, 2]
    fresh.register_stage(k2)  # a run that knows the key rewrites it
    assert json.loads(_get(s3, url, stage_json))["stage_key"] == k2.payload()


def _fill(s: Store, k: StageKey, items: list[str], per_pack: int = 1) -> None:
    for start in range(0, len(items), per_pack):
        with s.open_pack(k) as pack:
            for i in items[start : start + per_pack]:
                pack.add(i, {"x": np.full(4, int(i[1:]))}, {})


def test_compaction_keeps_the_state_and_drops(s3, url):
    s = Store(url)
    k = _key("clip_layers")
    _fill(s, k, [f"i{n}" for n in range(12)])
    s.drop_items(k.stage, k.key, ["i3", "i7"], reason="test")
    before = Store(url).complete_items(k.stage, k.key)
    assert before == {f"i{n}" for n in range(12)} - {"i3", "i7"}
    assert s.state(k.stage, k.key).compact() is not None
    assert len(_objects(s3, url, k, "index")) == 1 and not _objects(s3, url, k, "drops")
    fresh = Store(url)
    assert fresh.complete_items(k.stage, k.key) == before
    assert fresh.state(k.stage, k.key).uncovered_records() == 0


def test_verify_reports_and_repairs_exactly_the_damaged_items(s3, url):
    s = Store(url)
    k = _key("clip_layers")
    _fill(s, k, ["i1", "i2", "i3"])
    packs = _objects(s3, url, k, "packs")
    _delete(s3, url, packs[0])
    _put(s3, url, packs[1], _get(s3, url, packs[1])[:40])
    (rep,) = verify(Store(url))
    assert rep.checked == 3 and sorted(i for i, _ in rep.damaged) == ["i1", "i2"]
    assert "missing" in dict(rep.damaged)["i1"] and "truncated" in dict(rep.damaged)["i2"]
    assert Store(url).complete_items(k.stage, k.key) == {"i1", "i2", "i3"}  # verify alone changes nothing
    (rep,) = verify(Store(url), repair=True)
    assert rep.repaired == 2 and Store(url).complete_items(k.stage, k.key) == {"i3"}
    assert verify(Store(url))[0].ok


def test_gc_removes_unreferenced_sets_superseded_packs_and_dead_writers_leftovers(s3, url):
    s = Store(url)
    keep, drop = _key("clip_layers", crop=1), _key("clip_layers", crop=2)
    _fill(s, keep, ["i1", "i2"], per_pack=2)
    _fill(s, drop, ["i1"])
    s.drop_items(keep.stage, keep.key, ["i2"], reason="test")
    _fill(s, keep, ["i1", "i2"], per_pack=2)  # recomputed: the first pack is superseded
    orphan = f"st/stages/{keep.stage}/{keep.key}/packs/00000000000000aa-deadbeef.zip"  # its writer died before
    _put(s3, url, orphan, b"PK")  # the record (S3 cannot backdate it: gc is told what "old" is)
    s.leases.claim(keep.stage, keep.key, ["i9"])
    _put(s3, url, f"st/leases/{keep.stage}/{keep.key}/0000000000000001-dead.json",
         json.dumps({"owner": {}, "items": ["i8"], "heartbeat": time.time() - 500, "ttl": 120}).encode())
    dry = gc(Store(url), keep=[(keep.stage, keep.key)], dry_run=True, stale_after=0)
    assert [(st, kk) for st, kk, _, _ in dry.sets] == [(drop.stage, drop.key)] and dry.packs == 2
    assert _objects(s3, url, drop, "packs")  # a dry run removes nothing
    rep = gc(Store(url), keep=[(keep.stage, keep.key)], stale_after=0)
    assert rep.packs == 2 and rep.leases == 1 and rep.nbytes > 0
    assert not _objects(s3, url, drop, "packs") and not _objects(s3, url, drop, "records")
    assert len(_objects(s3, url, keep, "packs")) == 1
    fresh = Store(url)
    assert fresh.complete_items(keep.stage, keep.key) == {"i1", "i2"}
    assert fresh.read_item(keep.stage, keep.key, "i2")["x"].tolist() == [2, 2, 2, 2]
    assert set(fresh.leases.busy_items(keep.stage, keep.key)) == {"i9"}  # the live lease is kept


def test_conditional_create_is_atomic_between_racing_writers(s3, url):
    Store(url)
    path = f"{url[len('s3://'):]}/race.json"
    backends = [Backend(url) for _ in range(8)]
    won: list[int] = []
    barrier = threading.Barrier(len(backends))

    def create(i: int) -> None:
        barrier.wait()
        if backends[i].put_if_absent(path, json.dumps({"writer": i}).encode()):
            won.append(i)

    before = s3.snapshot()
    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and json.loads(_get(s3, url, "st/race.json")) == {"writer": won[0]}
    sent = s3.snapshot() - before
    assert sent[("PUT", "store")] == 8 and sent[("HEAD", "store")] == 0  # conditional PUTs, no check-then-put


def test_a_conflicting_conditional_put_is_retried():
    """S3 answers 409 ConditionalRequestConflict to a conditional PUT racing another: it is tried again."""
    server = S3Server(conflicts=2)
    try:
        b = Backend(f"s3://{server.create_bucket()}/st", server.storage_options())
        assert b.put_if_absent(f"{b.root}/x.json", b"1") is True and b.conditional_writes
        assert server.snapshot()[("PUT", "store")] == 3 and b.get(f"{b.root}/x.json") == b"1"
        server.conflicts = 9
        with pytest.raises(OSError):  # a conflict that does not end is an I/O error, not a fallback
            b.put_if_absent(f"{b.root}/y.json", b"1")
        assert b.conditional_writes and b.size(f"{b.root}/y.json") is None
    finally:
        server.stop()


def test_an_endpoint_without_conditional_writes_gets_check_then_put(caplog, tmp_path):
    """Fallback: files are still created whole and once per sequential writer; racing writers may both
    write a stage.json (same payload), never a partial one."""
    server = S3Server(conditional_writes=False)
    try:
        url = f"s3://{server.create_bucket()}/st"
        with caplog.at_level(logging.WARNING, logger="ovseg.storage"):
            s = Store(url, storage_options=server.storage_options())
        assert any("rejects conditional writes" in r.getMessage() for r in caplog.records)
        assert s.backend.conditional_writes is False
        assert s.backend.put_if_absent(f"{s.root}/x.json", b"1") is True
        assert s.backend.put_if_absent(f"{s.root}/x.json", b"2") is False and s.backend.get(f"{s.root}/x.json") == b"1"
        k = _key()
        s.write_item(k, "a", {"x": np.arange(3)})
        fresh = Store(url, storage_options=server.storage_options())
        assert fresh.read_item(k.stage, k.key, "a")["x"].tolist() == [0, 1, 2]
        claim = fresh.leases.claim(k.stage, k.key, ["b"])
        assert claim.mine == ["b"]
        fresh.leases.release(claim)
    finally:
        server.stop()


def _fake_lease(s3: S3Server, url: str, stage: str, key: str, lease_id: str, items: list[str], heartbeat: float) -> str:
    obj = f"st/leases/{stage}/{key}/{lease_id}.json"
    _put(s3, url, obj, json.dumps({"owner": {"host": "other-container", "pid": 1, "run_id": "r-dead"}, "items": items,
                                   "created": heartbeat, "heartbeat": heartbeat, "ttl": 120}).encode())
    return obj


def test_leases_exclude_take_over_and_beat(s3, url):
    a, b = Store(url), Store(url)
    ca = a.leases.claim("s", "k", ["x", "y"], run_id="A")
    cb = b.leases.claim("s", "k", ["y", "z"], run_id="B")
    assert ca.mine == ["x", "y"] and cb.mine == ["z"] and "run A" in cb.busy["y"].describe()
    a.leases.release(ca)
    b.leases.release(cb)
    _fake_lease(s3, url, "s", "k2", "0000000000000001-dead", ["x"], time.time() - 121)
    _fake_lease(s3, url, "s", "k2", "0000000000000002-live", ["y"], time.time())
    claim = a.leases.claim("s", "k2", ["x", "y"])
    assert claim.mine == ["x"] and set(claim.busy) == {"y"}
    bucket = _bucket(url)
    names = [o["Key"].rsplit("/", 1)[-1] for o in
             s3.client().list_objects_v2(Bucket=bucket, Prefix="st/leases/s/k2/").get("Contents", [])]
    assert "0000000000000001-dead.json" not in names and "0000000000000002-live.json" in names
    owner, other = LeaseManager(Backend(url), ttl=0.8), LeaseManager(Backend(url), ttl=0.8)
    held = owner.claim("s", "k3", ["x"])
    time.sleep(2.0)  # > 2 TTLs: only the heartbeat (PUT every TTL/4) keeps it alive
    assert set(other.busy_items("s", "k3")) == {"x"}
    owner.close()  # the owner stops beating: the lease dies within one TTL
    time.sleep(1.2)
    assert other.claim("s", "k3", ["x"]).mine == ["x"]
    owner.release(held)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional-writes", "no-conditional-writes"])
def test_racing_claims_leave_no_item_unclaimed(s3, conditional):
    """Leases need no conditional writes: every claim is a new object, exclusion comes from listing after writing."""
    server = s3 if conditional else S3Server(conditional_writes=False)
    url = f"s3://{server.create_bucket()}/st"
    managers = [LeaseManager(Backend(url, server.storage_options())) for _ in range(4)]
    items = [f"i{n}" for n in range(30)]
    assert_racing_claims_cover_every_item(managers, items, rounds=5)
    if not conditional:
        server.stop()


def test_duplicate_work_is_harmless_the_newest_copy_is_read(url):
    """Two runs that both computed an item (a lost lease race) leave two whole packs; the newest is read."""
    a, b = Store(url), Store(url)
    k = _key()
    a.write_item(k, "a", {"x": np.zeros(4)})
    b.write_item(k, "a", {"x": np.ones(4)})
    fresh = Store(url)
    assert fresh.read_item(k.stage, k.key, "a")["x"].tolist() == [1, 1, 1, 1]
    (rep,) = verify(fresh)
    assert rep.ok and rep.checked == 1
    assert gc(fresh, keep=[(k.stage, k.key)]).packs == 1  # the superseded copy is collected
    assert Store(url).read_item(k.stage, k.key, "a")["x"].tolist() == [1, 1, 1, 1]


def _register_many(url: str, worker: int, n: int) -> None:
    s = Store(url)
    for i in range(n):
        k = StageKey(f"stage{i}", {"p": i}, {}, "1")
        s.register_stage(k)
        s.write_item(k, f"w{worker}", {"x": np.full(2, worker)})


@pytest.mark.slow
def test_four_processes_register_the_same_stages(url):
    Store(url)
    ctx = mp.get_context("spawn")  # children inherit the AWS variables naming the endpoint
    procs = [ctx.Process(target=_register_many, args=(url, w, 8)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    s = Store(url)
    assert len(s.stage_sets()) == 8
    for i in range(8):
        k = StageKey(f"stage{i}", {"p": i}, {}, "1")
        assert s.stage_attrs(k.stage, k.key)["stage_key"] == k.payload()
        assert s.complete_items(k.stage, k.key) == {f"w{w}" for w in range(4)}
        assert s.read_item(k.stage, k.key, "w3")["x"].tolist() == [3, 3]


def test_journal_running_dead_and_finished(s3, url):
    s = Store(url, lease_ttl=0.6)
    j = s.journal("20260101T000000Z-aaaaaa", {"experiment": "e", "plan": [{"dataset": "d", "stage": "x", "key": "k"}]})
    j.start()
    time.sleep(1.5)
    assert [r.status for r in Store(url).runs()[0]] == ["running"]  # kept live by its heartbeat
    j.finish("incomplete", 3)
    _put(s3, url, "st/journal/20260101T000001Z-bbbbbb.json",
         json.dumps({"run_id": "20260101T000001Z-bbbbbb", "experiment": "e", "status": "running",
                     "started": time.time() - 3600, "heartbeat": time.time() - 3500, "ttl": 120}).encode())
    runs, damaged = Store(url).runs()
    assert [r.status for r in runs] == ["incomplete", "dead"] and not damaged


def test_missing_bucket_and_unreachable_endpoint_are_named(s3):
    with pytest.raises(StoreNotFoundError, match="bucket does not exist"):
        Store("s3://no-such-bucket-ovseg/st", create=False)
    with pytest.raises(StoreError, match="bucket does not exist; create the bucket first"):
        Store("s3://no-such-bucket-ovseg/st")
    closed = S3Server()
    closed.stop()  # a port nothing listens on any more
    opts = dict(closed.storage_options(), config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    with pytest.raises(StoreError, match="EndpointConnectionError.*check the endpoint and credentials .*AWS_ENDPOINT_URL_S3"):
        Store("s3://b/st", storage_options=opts)


@pytest.mark.slow
def test_a_lost_endpoint_is_an_io_error_and_a_heartbeat_survives_it(caplog):
    """Connection failures are ``OSError`` like local ones, so heartbeats and journals log them and go on."""
    server = S3Server()
    url = f"s3://{server.create_bucket()}/st"
    opts = dict(server.storage_options(), config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    s = Store(url, storage_options=opts)
    leases = LeaseManager(Backend(url, opts), ttl=60)
    claim = leases.claim("s", "k", ["x"])
    server.stop()
    for call in (lambda: s.backend.listdir(s.root), lambda: s.backend.get(f"{s.root}/ovseg-store.json"),
                 lambda: s.backend.put_atomic(f"{s.root}/x", b"1")):
        with pytest.raises(OSError, match="EndpointConnectionError"):
            call()
    with caplog.at_level(logging.WARNING, logger="ovseg.storage"):
        leases.heartbeat()  # the heartbeat thread calls this: it must not die
    assert any("cannot refresh lease" in r.getMessage() for r in caplog.records)
    leases.close()
    assert claim.mine == ["x"]


def test_each_primitive_is_one_request(s3, url):
    """The request figures of docs/object-stores.md rest on these."""
    s = Store(url)
    k = _key()
    s.write_item(k, "a", {"x": np.arange(3)})
    b = s.backend
    base = s.stage_dir(k.stage, k.key)
    (rec,) = b.listdir(f"{base}/records")
    cases = {
        "listdir": (lambda: b.listdir(f"{base}/records"), {("LIST", k.stage): 1}),
        "listdir of a missing folder": (lambda: b.listdir(f"{base}/drops"), {("LIST", k.stage): 1}),
        "get": (lambda: b.get(f"{base}/records/{rec}"), {("GET", k.stage): 1}),
        "size": (lambda: b.size(f"{base}/records/{rec}"), {("HEAD", k.stage): 1}),
        "size of a missing file": (lambda: b.size(f"{base}/records/x.json"), {("HEAD", k.stage): 1}),
        "put_if_absent": (lambda: b.put_if_absent(f"{base}/x.json", b"1"), {("PUT", k.stage): 1}),
        "put_if_absent of an existing file": (lambda: b.put_if_absent(f"{base}/x.json", b"1"), {("PUT", k.stage): 1}),
        "delete": (lambda: b.delete(f"{base}/x.json"), {("DELETE", k.stage): 1}),
        "read_item": (lambda: Store(url).read_item(k.stage, k.key, "a"),
                      {("GET", "store"): 1, ("LIST", k.stage): 3, ("GET", k.stage): 2}),
    }
    for name, (call, expected) in cases.items():
        before = s3.snapshot()
        call()
        assert dict(s3.snapshot() - before) == expected, name


_CHILD = """
import sys
from storage.store import Store
s = Store(sys.argv[1], create=False)
print(s.read_item("dino_features", sys.argv[2], "a")["x"].tolist())
"""


@pytest.mark.parametrize("how", ["aws-variables", "fsspec-variable"])
def test_a_new_process_finds_the_endpoint_in_its_environment(s3, url, how):
    """Workers get the endpoint and credentials from their environment, never from flow parameters."""
    k = _key()
    Store(url).write_item(k, "a", {"x": np.arange(3)})
    env = {n: v for n, v in os.environ.items() if not n.startswith(("AWS_", "FSSPEC_"))}
    env["PYTHONPATH"] = str(REPO)
    if how == "aws-variables":
        env.update(s3.environment())
    else:
        env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_ENDPOINT_URL_S3="http://127.0.0.1:9",  # wrong on purpose: FSSPEC_S3 takes precedence
                   FSSPEC_S3=json.dumps(s3.storage_options()))
    out = subprocess.run([sys.executable, "-c", _CHILD, url, k.key], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0, 1, 2]"
