"""A fused chain computes an input that is not persisted once per image, in memory, under its first reader's
lease (``tasks.chain.compute_in_memory``), on a real store with three synthetic stages:

- ``syn_a`` (not persisted): ``x = image number``; counted;
- ``syn_b`` (stored): ``y = 2 x``, reads ``syn_a``;
- ``syn_c`` (stored): ``z = x + y``, reads ``syn_a`` and ``syn_b``.

Expected values are written from the definitions above, not from the code under test."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from storage.store import Store
from tasks.chain import run_chain
from tasks.memory import ChainMemory
from tasks.runtime import RunSettings, StageContext, StageNode
from tasks.stages import STAGES, Input, Stage


@dataclasses.dataclass(frozen=True)
class Params:
    tag: str = "t"


def _stages(monkeypatch, fail: str | None = None) -> Counter:
    seen: Counter = Counter()

    def a(ctx, models, inputs):
        out = []
        for v in inputs:
            seen[f"i{v}"] += 1
            if f"i{v}" == fail:
                raise ValueError(f"syn_a cannot compute i{v} (test)")
            out.append(({"x": np.full(3, v, dtype=np.int64)}, {}))
        return out

    def b(ctx, models, inputs):
        return [({"y": 2 * x}, {}) for x in inputs]

    def c(ctx, models, inputs):
        return [({"z": x + y}, {}) for x, y in inputs]

    def load_c(ctx, row):
        return ctx.read_upstream("syn_a", row)["x"], ctx.read_upstream("syn_b", row)["y"]

    table = {
        "syn_a": Stage("syn_a", "test", "image", inputs=(), params=Params, code_version="1", models=lambda ctx: None,
                       load=lambda ctx, row: int(row["image_id"][1:]), compute=a, arrays=("x",)),
        "syn_b": Stage("syn_b", "test", "image", inputs=(Input("syn_a"),), params=Params, code_version="1",
                       models=lambda ctx: None, load=lambda ctx, row: ctx.read_upstream("syn_a", row)["x"],
                       compute=b, arrays=("y",)),
        "syn_c": Stage("syn_c", "test", "image", inputs=(Input("syn_a"), Input("syn_b")), params=Params,
                       code_version="1", models=lambda ctx: None, load=load_c, compute=c, arrays=("z",)),
    }
    for name, stage in table.items():
        monkeypatch.setitem(STAGES, name, stage)
    return seen


def _contexts(store, run_id: str = "run-1") -> tuple[StageNode, list[StageContext]]:
    a = StageNode("syn_a", Params(), "1", persist=False)
    b = StageNode("syn_b", Params(), "1", upstream={"syn_a": a})
    c = StageNode("syn_c", Params(), "1", upstream={"syn_a": a, "syn_b": b})
    settings = RunSettings(str(store), run_id=run_id)
    return a, [StageContext(b, settings, "ds"), StageContext(c, settings, "ds")]


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"i{k}"} for k in range(n)]


def test_an_input_not_stored_is_computed_once_per_image_and_forgotten(tmp_path, monkeypatch):
    seen = _stages(monkeypatch)
    a, ctxs = _contexts(tmp_path / "store")
    memory = ChainMemory()
    results = run_chain(ctxs, [_rows(4), _rows(4)], memory)
    assert [[r.status for r in res.items] for res in results] == [["done"] * 4] * 2
    assert seen == {f"i{k}": 1 for k in range(4)}  # read by syn_b and syn_c: computed once all the same
    store = Store(tmp_path / "store")
    for k in range(4):
        np.testing.assert_array_equal(store.read_item("syn_b", ctxs[0].key, f"i{k}")["y"], np.full(3, 2 * k))
        np.testing.assert_array_equal(store.read_item("syn_c", ctxs[1].key, f"i{k}")["z"], np.full(3, 3 * k))
        assert not memory.has(a.ident, f"i{k}")  # forgotten after its last reader
    assert {s for s, _ in store.stage_sets()} == {"syn_b", "syn_c"}  # never stored


def test_items_another_run_holds_cost_nothing_and_a_failed_item_fails_alone(tmp_path, monkeypatch):
    seen = _stages(monkeypatch, fail="i3")
    a, ctxs = _contexts(tmp_path / "store")
    other = Store(tmp_path / "store", lease_ttl=60)
    held = other.leases.claim("syn_b", ctxs[0].key, ["i0", "i1"], "run-other")
    try:
        results = run_chain(ctxs, [_rows(4), _rows(4)])
    finally:
        other.leases.release(held)
    status = [{r.item: r.status for r in res.items} for res in results]
    assert status[0] == {"i0": "busy", "i1": "busy", "i2": "done", "i3": "failed"}
    assert status[1]["i2"] == "done" and status[1]["i0"] == status[1]["i1"] == "busy" and status[1]["i3"] == "failed"
    failed = next(r for r in results[0].items if r.item == "i3")
    assert "syn_a cannot compute i3" in failed.error  # its reader computed it on demand: the item's own error
    # the held items' input was never computed; i3: once in memory, once on demand in syn_b's load (then syn_c
    # is not attempted: its syn_b input failed)
    assert seen == {"i2": 1, "i3": 2}
