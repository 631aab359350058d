"""Completion index compaction, drops, ``cache verify`` and ``cache gc`` on real stores, and run journals."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from storage.journal import newest_per_experiment
from storage.keys import StageKey
from storage.maintenance import gc, verify
from storage.store import Store


def _key(n: int = 1) -> StageKey:
    return StageKey("clip_layers", {"crop": n}, {}, "1", None)


def _fill(s: Store, k: StageKey, items: list[str], per_pack: int = 1) -> None:
    for start in range(0, len(items), per_pack):
        with s.open_pack(k) as pack:
            for i in items[start : start + per_pack]:
                pack.add(i, {"x": np.full(4, int(i[1:]))}, {})


def test_compaction_keeps_the_state_and_drops(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    _fill(s, k, [f"i{n}" for n in range(40)])
    s.drop_items(k.stage, k.key, ["i3", "i7"], reason="test")
    base = tmp_path / "st" / "stages" / k.stage / k.key
    before = Store(tmp_path / "st").complete_items(k.stage, k.key)
    assert before == {f"i{n}" for n in range(40)} - {"i3", "i7"}
    assert s.state(k.stage, k.key).compact() is not None
    assert len(list((base / "index").iterdir())) == 1 and not list((base / "drops").iterdir())
    fresh = Store(tmp_path / "st")
    assert fresh.complete_items(k.stage, k.key) == before
    assert fresh.state(k.stage, k.key).uncovered_records() == 0  # the 40 records are not read again
    # a drop written after the compaction by another process, and a concurrent stale compactor, lose nothing
    stale = Store(tmp_path / "st")
    stale.complete_items(k.stage, k.key)
    fresh.drop_items(k.stage, k.key, ["i9"], reason="test")
    stale.state(k.stage, k.key).compact()
    fresh.state(k.stage, k.key).compact()
    assert Store(tmp_path / "st").complete_items(k.stage, k.key) == before - {"i9"}
    _fill(s, k, ["i9"])  # recomputed: a new pack, newer than the dropped copy
    assert Store(tmp_path / "st").complete_items(k.stage, k.key) == before


def test_verify_reports_and_repairs_exactly_the_damaged_items(tmp_path: Path):
    s = Store(tmp_path / "st")
    k = _key()
    _fill(s, k, ["i1", "i2", "i3"])
    packs = sorted((tmp_path / "st" / "stages" / k.stage / k.key / "packs").iterdir())
    packs[0].unlink()  # i1: a deleted pack
    packs[1].write_bytes(packs[1].read_bytes()[:40])  # i2: a truncated pack
    (rep,) = verify(Store(tmp_path / "st"))
    assert rep.checked == 3 and sorted(i for i, _ in rep.damaged) == ["i1", "i2"]
    assert "missing" in dict(rep.damaged)["i1"] and "truncated" in dict(rep.damaged)["i2"]
    assert Store(tmp_path / "st").complete_items(k.stage, k.key) == {"i1", "i2", "i3"}  # verify alone changes nothing
    (rep,) = verify(Store(tmp_path / "st"), repair=True)
    assert rep.repaired == 2
    assert Store(tmp_path / "st").complete_items(k.stage, k.key) == {"i3"}
    (rep,) = verify(Store(tmp_path / "st"))
    assert rep.ok and rep.checked == 1


def test_gc_removes_unreferenced_sets_superseded_packs_and_dead_writers_leftovers(tmp_path: Path):
    s = Store(tmp_path / "st")
    keep, drop = _key(1), _key(2)
    _fill(s, keep, ["i1", "i2"], per_pack=2)
    _fill(s, drop, ["i1"])
    s.drop_items(keep.stage, keep.key, ["i2"], reason="test")
    _fill(s, keep, ["i1", "i2"], per_pack=2)  # recomputed: the first pack is superseded
    base = tmp_path / "st" / "stages" / keep.stage / keep.key
    old_tmp = base / "packs" / ".tmp-host-1-abcd-x.zip"
    old_tmp.write_bytes(b"partial")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    young_tmp = base / "packs" / ".tmp-host-2-abcd-y.zip"  # a writer at work right now
    young_tmp.write_bytes(b"partial")
    orphan = base / "packs" / "00000000000000aa-deadbeef.zip"  # a pack whose writer died before its record
    orphan.write_bytes(b"PK")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    dry = gc(Store(tmp_path / "st"), keep=[(keep.stage, keep.key)], dry_run=True)
    assert [(st, k) for st, k, _, _ in dry.sets] == [(drop.stage, drop.key)] and dry.packs == 2
    assert (tmp_path / "st" / "stages" / drop.stage / drop.key).exists()  # a dry run removes nothing
    rep = gc(Store(tmp_path / "st"), keep=[(keep.stage, keep.key)])
    assert rep.packs == 2 and rep.temporaries == 1 and rep.nbytes > 0
    assert not (tmp_path / "st" / "stages" / drop.stage / drop.key).exists()
    assert not old_tmp.exists() and young_tmp.exists() and not orphan.exists()
    assert len([p for p in (base / "packs").glob("*.zip") if not p.name.startswith(".")]) == 1
    fresh = Store(tmp_path / "st")
    assert fresh.complete_items(keep.stage, keep.key) == {"i1", "i2"}
    assert fresh.read_item(keep.stage, keep.key, "i2")["x"].tolist() == [2, 2, 2, 2]


def test_journal_running_dead_and_finished(tmp_path: Path):
    s = Store(tmp_path / "st", lease_ttl=0.5)
    plan = [{"dataset": "d", "stage": "clip_layers", "key": "k1"}]
    j1 = s.journal("20260101T000000Z-aaaaaa", {"experiment": "e", "plan": plan}).start()
    runs, _ = s.runs()
    assert [r.status for r in runs] == ["running"] and runs[0].plan_keys() == {("clip_layers", "k1")}
    time.sleep(1.2)
    assert s.runs()[0][0].status == "running"  # the heartbeat keeps it live
    j1.finish("incomplete", 3)
    path = tmp_path / "st" / "journal" / "20260101T000001Z-bbbbbb.json"  # a run killed an hour ago elsewhere
    path.write_text(json.dumps({"run_id": "20260101T000001Z-bbbbbb", "experiment": "e", "status": "running",
                                "started": time.time() - 3600, "heartbeat": time.time() - 3500, "ttl": 120,
                                "plan": []}))
    (tmp_path / "st" / "journal" / "garbage.json").write_text("{")
    runs, damaged = s.runs()
    assert [r.status for r in runs] == ["incomplete", "dead"] and len(damaged) == 1
    assert newest_per_experiment(runs)["e"].run_id == "20260101T000000Z-aaaaaa"  # by start time


def test_storage_budget_evicts_least_recently_used_sets_never_protected_ones(tmp_path: Path):
    from storage.maintenance import evict, list_stages

    s = Store(tmp_path / "st")
    keys = [_key(n) for n in (1, 2, 3, 4)]
    for n, k in enumerate(keys):
        _fill(s, k, ["i1", "i2"])
        s.touch(k.stage, k.key, run_id=f"r{n}")
        last = tmp_path / "st" / "stages" / k.stage / k.key / "last-used.json"
        last.write_text(json.dumps({"time": 1000.0 * (n + 1), "run_id": f"r{n}"}))  # used in order 1, 2, 3, 4
    sizes = {i.key: i.nbytes for i in list_stages(s)}
    total = sum(sizes.values())
    protect = {(keys[0].stage, keys[0].key)}  # the oldest, but a live run needs it
    budget = total - sizes[keys[1].key] - 1  # one set too many
    dry = evict(s, protect, max_bytes=budget, dry_run=True)
    assert [k for _, k, _, _ in dry.sets] == [keys[1].key, keys[2].key] and len(s.stage_sets()) == 4
    rep = evict(s, protect, max_bytes=budget)
    assert rep.nbytes == sizes[keys[1].key] + sizes[keys[2].key] and rep.items == 4
    assert {k for _, k in s.stage_sets()} == {keys[0].key, keys[3].key}
    rep = evict(Store(tmp_path / "st"), protect, older_than=time.time() - 2500)  # not used since t = 2500 s
    assert [k for _, k, _, _ in rep.sets] == []  # key 4 was used at 4000 s; key 1 is protected
    rep = evict(Store(tmp_path / "st"), set(), older_than=time.time() - 3500)
    assert [k for _, k, _, _ in rep.sets] == [keys[0].key]
