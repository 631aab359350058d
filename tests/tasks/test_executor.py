"""The streaming executor on a real store: one lease per batch, bounded read-ahead, per-item failure paths of
loading, computing and writing, and batching windows across images equal to per-image computation."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.store import Store
from tasks.common import run_windows
from tasks.executor import run_batch
from tasks.params import WindowParams
from tasks.runtime import RunSettings, StageContext, StageNode
from tasks.stages import STAGES, Stage


@dataclasses.dataclass(frozen=True)
class Params:
    tag: str = "t"


def _ctx(store: Path, **settings) -> StageContext:
    node = StageNode("synthetic", Params(), "1")
    return StageContext(node, RunSettings(str(store), **settings), "ds")


class Probe:
    """A real stage whose steps record what the executor does (how far loading runs ahead, leases)."""

    def __init__(self, store: Path, bad_load=(), bad_compute=(), bad_output=()):
        self.store = store
        self.bad_load, self.bad_compute, self.bad_output = set(bad_load), set(bad_compute), set(bad_output)
        self.loaded = 0
        self.computed = 0
        self.ahead = 0
        self.leases_seen: set[int] = set()
        self.lock = threading.Lock()
        self.groups: list[int] = []

    def stage(self, windows: bool = False) -> Stage:
        return Stage("synthetic", "test", "image", inputs=(), params=Params, code_version="1",
                     models=lambda ctx: "model", load=self.load, compute=self.compute, arrays=("x",),
                     windows=(lambda inp: 1) if windows else None)

    def load(self, ctx, row):
        if row["image_id"] in self.bad_load:
            raise OSError(f"cannot read {row['image_id']}")
        with self.lock:
            self.loaded += 1
            self.ahead = max(self.ahead, self.loaded - self.computed)
        return {"id": row["image_id"], "value": int(row["image_id"][1:])}

    def compute(self, ctx, model, inputs):
        assert model == "model"
        self.groups.append(len(inputs))
        self.leases_seen.add(len(list((self.store / "leases").rglob("*.json"))))
        if any(i["id"] in self.bad_compute for i in inputs):
            raise ValueError("bad input in this group")
        with self.lock:
            self.computed += len(inputs)
        out = []
        for i in inputs:
            x = np.full(3, i["value"]) if i["id"] not in self.bad_output else np.array([object()])
            out.append(({"x": x}, {"v": i["value"]}))
        return out


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"i{k}"} for k in range(n)]


def test_one_lease_per_batch_bounded_read_ahead_and_one_pack(tmp_path):
    probe = Probe(tmp_path / "st")
    result = run_batch(_ctx(tmp_path / "st", prefetch=2, write_queue=2), _rows(20), probe.stage())
    assert [r.status for r in result.items] == ["done"] * 20 and not result.fatal
    assert probe.leases_seen == {1}  # one lease for the whole batch, released at the end
    assert not list((tmp_path / "st" / "leases").rglob("*.json"))
    assert probe.ahead <= 2 + 2  # prefetch queue + the item being put + the group being computed
    st = Store(tmp_path / "st")
    key = _ctx(tmp_path / "st").key
    assert st.complete_items("synthetic", key) == {f"i{k}" for k in range(20)}
    assert len(list((tmp_path / "st" / "stages" / "synthetic" / key / "packs").glob("*.zip"))) == 1
    assert st.read_item("synthetic", key, "i7")["x"].tolist() == [7, 7, 7]
    Store(tmp_path / "st").leases.claim("synthetic", key, ["i3"])  # another process holds i3
    again = run_batch(_ctx(tmp_path / "st"), _rows(5), Probe(tmp_path / "st").stage())
    assert {r.item: r.status for r in again.items}["i3"] == "busy"  # the claim, not a listing, decides


def test_load_compute_and_write_failures_fail_only_their_items(tmp_path):
    probe = Probe(tmp_path / "st", bad_load={"i1"}, bad_compute={"i4"}, bad_output={"i6"})
    result = run_batch(_ctx(tmp_path / "st", window_batch=3), _rows(9), probe.stage(windows=True))
    status = {r.item: (r.status, r.error_type) for r in result.items}
    assert status["i1"] == ("failed", "OSError")
    assert status["i4"] == ("failed", "ValueError")  # its group was retried item by item: only i4 fails
    assert status["i6"][0] == "failed" and "dtype object" in next(r.error for r in result.items if r.item == "i6")
    assert all(status[f"i{k}"] == ("done", "") for k in (0, 2, 3, 5, 7, 8))
    assert max(probe.groups) == 3  # windows of several images go through one compute call
    done = Store(tmp_path / "st").complete_items("synthetic", _ctx(tmp_path / "st").key)
    assert done == {f"i{k}" for k in (0, 2, 3, 5, 7, 8)}


def test_a_pack_that_cannot_be_stored_fails_its_items_not_the_run(tmp_path):
    store = tmp_path / "st"
    key = _ctx(store).key
    Store(store).register_stage(_ctx(store).node.stage_key)
    (store / "stages" / "synthetic" / key / "packs").write_text("a file where the packs folder must be")
    result = run_batch(_ctx(store), _rows(3), Probe(store).stage())
    assert {r.status for r in result.items} == {"failed"}
    assert all("packs" in r.error or "Directory" in r.error for r in result.items)
    assert Store(store).complete_items("synthetic", key) == set()


def test_run_windows_returns_each_image_its_windows_in_order():
    inputs = [{"x": torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * i} for i, n in enumerate((3, 1, 2))]
    inputs.append({"x": torch.zeros(2, 5)})  # another window shape: never in the same call
    calls: list[int] = []
    got: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def fn(b):
        calls.append(b["x"].shape[0])
        return b["x"] * 2

    run_windows(inputs, fn, 4, lambda i, start, part: got.setdefault(i, []).append((start, part)))
    assert calls == [3, 1, 2, 2]  # one image per call (tests/tasks/test_group_independence.py)
    for i, inp in enumerate(inputs):
        parts = sorted(got[i], key=lambda p: p[0])
        torch.testing.assert_close(torch.cat([p for _, p in parts]), inp["x"] * 2, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["dino_features", "clip_layers"])
def test_batching_windows_across_images_equals_per_image_computation(sample_dir, tmp_path, stage):
    from tasks.params import ClipParams, DinoParams

    from ovseg_core.backbones import patch_size

    rows = []
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    from PIL import Image

    for p in sorted(voc.glob("*.jpg"))[:3]:
        w, h = Image.open(p).size
        rows.append({"image_id": p.stem, "abs_path": str(p), "width": w, "height": h})
    if stage == "dino_features":
        params = DinoParams("dino:tiny8@random:0", WindowParams(112, 56, 56, 56), "float32", "float32")
    else:
        params = ClipParams("clip:tiny@random:0", WindowParams(112, 56, 56, patch_size("clip:tiny@random:0")),
                            ("block:1", "mean:1-2"), "float32", "float32")
    node = StageNode(stage, params, "1")
    spec = STAGES[stage]
    outs = {}
    for wb in (1, 16):
        ctx = StageContext(node, RunSettings(str(tmp_path / f"st{wb}"), window_batch=wb))
        models = spec.models(ctx)
        inputs = [spec.load(ctx, r) for r in rows]
        assert sum(spec.windows(i) for i in inputs) > 3  # several windows per image: batches span images
        outs[wb] = spec.compute(ctx, models, inputs)
    for (a, _), (b, _) in zip(outs[1], outs[16]):
        assert a.keys() == b.keys()
        for k in a:  # equal up to BLAS summation order, which depends on the batch size
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
