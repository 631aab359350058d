"""A fused chain writes a node's pack while the next node computes (``tasks.executor.start_batch``), on a real
store with two real (synthetic) stages: the overlap happens, the outputs are those of a chain that waits for each
pack, and a pack that fails to be stored after its reader computed still leaves the reader's items unstored and
reported ``SkippedUpstream``, with no lease and no pack without its record left behind."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage.paths import is_remote, resolve_location
from storage.store import Store
from storage.writing import PackSession
from tasks.chain import run_chain
from tasks.streams import io_threads
from tasks.runtime import RunSettings, StageContext, StageNode, open_store
from tasks.stages import STAGES, Input, Stage


@dataclasses.dataclass(frozen=True)
class Params:
    tag: str = "t"


class Chain:
    """Two stages, ``syn_up`` (x = id number) and ``syn_down`` (y = 2 x, read from ``syn_up``); ``down_started`` is
    set when ``syn_down`` first computes."""

    def __init__(self, monkeypatch):
        self.down_started = threading.Event()
        up = Stage("syn_up", "test", "image", inputs=(), params=Params, code_version="1", models=lambda ctx: None,
                   load=lambda ctx, row: int(row["image_id"][1:]), compute=self.up, arrays=("x",))
        down = Stage("syn_down", "test", "image", inputs=(Input("syn_up"),), params=Params, code_version="1",
                     models=lambda ctx: None, load=lambda ctx, row: ctx.read_upstream("syn_up", row)["x"],
                     compute=self.down, arrays=("y",))
        monkeypatch.setitem(STAGES, "syn_up", up)
        monkeypatch.setitem(STAGES, "syn_down", down)

    @staticmethod
    def up(ctx, models, inputs):
        return [({"x": np.full(4, v, dtype=np.int64)}, {}) for v in inputs]

    def down(self, ctx, models, inputs):
        self.down_started.set()
        return [({"y": 2 * x}, {}) for x in inputs]

    @staticmethod
    def contexts(store: Path, io_threads: str = "on") -> list[StageContext]:
        """``io_threads`` on (the default here): loader and writer threads, so a node's loads all precede the
        previous node's commit in these tests; off: loads and adds in the compute thread (a CPU's default)."""
        up = StageNode("syn_up", Params(), "1")
        down = StageNode("syn_down", Params(), "1", upstream={"syn_up": up})
        settings = RunSettings(str(store), io_threads=io_threads)
        return [StageContext(up, settings, "ds"), StageContext(down, settings, "ds")]


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"i{k}"} for k in range(n)]


def _slow_up_commit(monkeypatch, chain: Chain, fail: bool) -> dict[str, bool]:
    """``syn_up``'s pack waits (up to 10 s) for ``syn_down`` to start computing before it is stored (or fails)."""
    seen = {"down computed before up's pack": False}
    real = PackSession.commit

    def commit(self):
        if self.stage_key.stage == "syn_up":
            seen["down computed before up's pack"] = chain.down_started.wait(10)
            if fail:
                raise OSError(28, "No space left on device (test)")
        return real(self)

    monkeypatch.setattr(PackSession, "commit", commit)
    return seen


@pytest.mark.parametrize("io_threads", ["on", "off"])
def test_the_next_node_computes_while_a_pack_is_written_and_the_outputs_are_stored(tmp_path, monkeypatch, io_threads):
    chain = Chain(monkeypatch)
    seen = _slow_up_commit(monkeypatch, chain, fail=False)
    ctxs = chain.contexts(tmp_path / "st", io_threads)
    results = run_chain(ctxs, [_rows(5), _rows(5)])
    assert seen["down computed before up's pack"]  # on a chain that waits for each pack this waits 10 s, then fails
    assert [[r.status for r in res.items] for res in results] == [["done"] * 5, ["done"] * 5]
    st = Store(tmp_path / "st")
    for ctx in ctxs:
        assert st.complete_items(ctx.stage, ctx.key) == {f"i{k}" for k in range(5)}
    assert st.read_item("syn_down", ctxs[1].key, "i3")["y"].tolist() == [6] * 4
    assert not list((tmp_path / "st" / "leases").rglob("*.json"))  # every lease released when the chain returns


def test_a_node_releases_its_lease_once_its_pack_is_stored_while_later_nodes_still_compute(tmp_path, monkeypatch):
    """Another run waiting for ``syn_up``'s items must not wait for the whole chain: by the time ``syn_down``
    computes (after ``syn_up``'s pack and record are stored), ``syn_up``'s lease is gone and ``syn_down``'s held."""
    chain = Chain(monkeypatch)
    ctxs = chain.contexts(tmp_path / "st")
    seen = {}
    real_down = chain.down

    def down(ctx, models, inputs):
        st = Store(tmp_path / "st")
        deadline = time.monotonic() + 10  # syn_up's writer may still be committing when syn_down starts
        while time.monotonic() < deadline and st.complete_items("syn_up", ctxs[0].key) != {"i0", "i1", "i2"}:
            time.sleep(0.01)
        time.sleep(0.2)  # the release follows the record at once
        seen["up complete"] = st.complete_items("syn_up", ctxs[0].key)
        seen["leases"] = sorted(p.parent.parent.name for p in (tmp_path / "st" / "leases").rglob("*.json"))
        return real_down(ctx, models, inputs)

    monkeypatch.setitem(STAGES, "syn_down", dataclasses.replace(STAGES["syn_down"], compute=down))
    results = run_chain(ctxs, [_rows(3), _rows(3)])
    assert [[r.status for r in res.items] for res in results] == [["done"] * 3, ["done"] * 3]
    assert seen == {"up complete": {"i0", "i1", "i2"}, "leases": ["syn_down"]}
    assert not list((tmp_path / "st" / "leases").rglob("*.json"))


def test_a_pack_that_fails_after_its_reader_computed_leaves_the_reader_unstored(tmp_path, monkeypatch):
    chain = Chain(monkeypatch)
    seen = _slow_up_commit(monkeypatch, chain, fail=True)
    ctxs = chain.contexts(tmp_path / "st")
    up, down = run_chain(ctxs, [_rows(3), _rows(3)])
    assert seen["down computed before up's pack"]
    assert {(r.status, r.error_type) for r in up.items} == {("failed", "OSError")}
    assert {(r.status, r.error_type) for r in down.items} == {("failed", "SkippedUpstream")}
    assert all("its syn_up output failed in this run" in r.error for r in down.items)
    st = Store(tmp_path / "st")
    assert st.complete_items("syn_up", ctxs[0].key) == set() and st.complete_items("syn_down", ctxs[1].key) == set()
    assert not list((tmp_path / "st").rglob("*.zip"))  # no pack without its record, no temporary left
    assert not list((tmp_path / "st").rglob(".tmp-*"))
    assert not list((tmp_path / "st" / "leases").rglob("*.json"))


def test_without_io_threads_a_pack_that_fails_after_its_reader_computed_leaves_the_reader_unstored(
        tmp_path, monkeypatch):
    """io_threads off: ``syn_down`` loads i1 and i2 after ``syn_up``'s pack failed (their input is then neither in
    the chain's memory nor stored): they fail ``SkippedUpstream`` at load, i0 with its pack; nothing is stored."""
    chain = Chain(monkeypatch)
    seen = _slow_up_commit(monkeypatch, chain, fail=True)
    ctxs = chain.contexts(tmp_path / "st", "off")
    up, down = run_chain(ctxs, [_rows(3), _rows(3)])
    assert seen["down computed before up's pack"]
    assert {(r.status, r.error_type) for r in up.items} == {("failed", "OSError")}
    assert {(r.status, r.error_type) for r in down.items} == {("failed", "SkippedUpstream")}
    st = Store(tmp_path / "st")
    assert st.complete_items("syn_up", ctxs[0].key) == set() and st.complete_items("syn_down", ctxs[1].key) == set()
    assert not list((tmp_path / "st").rglob("*.zip")) and not list((tmp_path / "st").rglob(".tmp-*"))
    assert not list((tmp_path / "st" / "leases").rglob("*.json"))


def test_an_item_whose_input_was_stored_before_fails_with_its_pack_when_another_input_is_not_stored(
        tmp_path, monkeypatch):
    """``syn_down``'s pack holds i0 (input stored by an earlier run) and i1 (input computed now, then not stored):
    nothing of the pack is stored; i1 is skipped for its input, i0 fails naming why and is recomputed later."""
    chain = Chain(monkeypatch)
    ctxs = chain.contexts(tmp_path / "st")
    run_chain(ctxs[:1], [_rows(1)])  # i0 of syn_up stored before
    _slow_up_commit(monkeypatch, chain, fail=True)
    up, down = run_chain(ctxs, [[{"image_id": "i1"}], _rows(2)])
    assert [(r.item, r.status) for r in up.items] == [("i1", "failed")]
    got = {r.item: (r.status, r.error_type) for r in down.items}
    assert got == {"i0": ("failed", "SkippedUpstream"), "i1": ("failed", "SkippedUpstream")}
    assert "lost an input" in next(r.error for r in down.items if r.item == "i0")
    assert Store(tmp_path / "st").complete_items("syn_down", ctxs[1].key) == set()


@pytest.fixture(autouse=True)
def _fresh_store_objects():
    """``tasks.runtime.open_store`` caches a Store per location: each test's store is new."""
    open_store.cache_clear()
    yield
    open_store.cache_clear()


def test_io_threads_on_and_off_store_the_same_items(tmp_path, monkeypatch):
    """The same chain with and without the loader and writer threads: the same items complete, equal arrays."""
    chain = Chain(monkeypatch)
    stored = {}
    for mode in ("on", "off"):
        ctxs = chain.contexts(tmp_path / mode, mode)
        results = run_chain(ctxs, [_rows(6), _rows(6)])
        assert [[r.status for r in res.items] for res in results] == [["done"] * 6, ["done"] * 6]
        st = Store(tmp_path / mode)
        stored[mode] = {(c.stage, i): {k: v.tolist() for k, v in st.read_item(c.stage, c.key, i).items()}
                        for c in ctxs for i in sorted(st.complete_items(c.stage, c.key))}
    assert len(stored["on"]) == 12 and stored["on"] == stored["off"]
    assert stored["off"][("syn_down", "i5")] == {"y": [10] * 4}  # y = 2 x, x = the id's number


def test_io_threads_auto_keeps_the_threads_for_cuda_and_object_stores_only():
    """``auto``: threads where loads wait (a GPU computing, network reads of an object store), none on a CPU with a
    local store; ``on`` / ``off`` force either; a resolved local path is not remote, an s3:// URL is."""
    local, s3 = resolve_location("file:///tmp/st"), resolve_location("s3://bucket/store")
    assert (is_remote(local), is_remote(s3)) == (False, True)
    assert [io_threads("auto", dev, is_remote(loc)) for dev, loc in
            [("cpu", local), ("cuda:0", local), ("cpu", s3), ("cuda", s3)]] == [False, True, True, True]
    assert [io_threads(s, "cpu", False) for s in ("on", "off")] == [True, False]
    assert io_threads("off", "cuda:0", True) is False
    with pytest.raises(ValueError, match="auto, on or off"):
        io_threads("yes", "cpu")
