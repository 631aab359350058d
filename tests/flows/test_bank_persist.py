"""What a bank stores (issue 22): its regions, values, keys and index; its intermediates (DINO, CLIP blocks, VFM
maps, clustering, class tokens) are computed in memory, once per image, unless ``persist`` keeps them.

Independent expectation: the same bank built with every intermediate stored (the stage-by-stage path every
earlier test checks) and built stage by stage without fusion (each intermediate computed on demand inside its
reader) stores the same regions, values, keys and index, bit for bit. Random weights: every number here checks
the machinery, none is a method result."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from flows.config import ExperimentError, parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from flows.summary import print_summary
from storage.store import Store
from tasks.stages import BANK_STORED, STAGES
from tests.flows.conftest import assert_same_outputs, computed, store_snapshot
from tests.flows.test_banks import BANK_IMAGES, _experiment, _folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

INTERMEDIATES = ("dino_features", "clip_layers", "vfm_features", "mask_clustering", "mask_class_tokens")


def _count_computes(monkeypatch, stages) -> Counter:
    """Items each stage's ``compute`` is called with (the stage table's steps, wrapped)."""
    seen: Counter = Counter()
    for name in stages:
        step = STAGES[name].compute
        fn = step.resolve()

        def counted(ctx, models, inputs, _fn=fn, _name=name):
            seen[_name] += len(inputs)
            return _fn(ctx, models, inputs)

        monkeypatch.setattr(step, "_fn", counted)
    return seen


def _build(tmp, folder, **bank):
    exp = parse_experiment(_experiment(tmp, folder, index={"kind": "flat"}, **bank), source="test")
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert summary.failed == 0 and summary.status == "complete"
    return exp, summary


def test_a_bank_stores_its_outputs_and_computes_each_intermediate_once_per_image(tmp_path, monkeypatch, capsys):
    folder = _folder(tmp_path, BANK_IMAGES)
    seen = _count_computes(monkeypatch, INTERMEDIATES)
    exp, summary = _build(tmp_path / "default", folder)
    nodes = {n.stage: n for p in build_plan(exp) for n in p.nodes.values()}
    assert {s for s in INTERMEDIATES if nodes[s].persist} == set()
    assert all(nodes[s].persist for s in (*BANK_STORED, "bank_index"))
    # dino_features is read by mask_clustering and bank_values, clip_layers by mask_class_tokens and bank_values:
    # computed once per image all the same (on demand, each reader would compute its own copy)
    assert seen == {s: len(BANK_IMAGES) for s in INTERMEDIATES}
    assert computed(summary) == {"sam_masks": 3, "bank_values": 3, "bank_keys": 3, "bank_index": 1}
    # the run's summary says what was computed in memory and not stored: each intermediate once per image
    assert {r.stage: (r.done, r.failed) for r in summary.in_memory} == {s: (3, 0) for s in INTERMEDIATES}
    assert all(r.seconds > 0 for r in summary.in_memory), [(r.stage, r.seconds) for r in summary.in_memory]
    bank_nodes = {(n.stage, n.key) for p in build_plan(exp) if p.dataset.name.startswith("bank-")
                  for n in p.nodes.values()}
    assert {(r.stage, r.key) for r in summary.in_memory} <= bank_nodes
    print_summary(summary)
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    memory_rows = {r[1]: r for r in table if r[2:5] == ["(in", "memory,", "not"]}
    assert set(memory_rows) == set(INTERMEDIATES)
    assert all(r[7:10] == ["3", "3", "-"] for r in memory_rows.values())  # images, computed, cached
    stored = {s for s, _ in Store(tmp_path / "default" / "store").stage_sets()}
    assert stored == {"sam_masks", "bank_values", "bank_keys", "bank_index"}

    # the same bank, every intermediate kept (banks[].persist), and stage by stage without fusion (on demand)
    seen.clear()
    _, kept = _build(tmp_path / "kept", folder, persist=dict.fromkeys(INTERMEDIATES, True))
    assert {s for s, _ in Store(tmp_path / "kept" / "store").stage_sets()} >= set(INTERMEDIATES)
    assert all(computed(kept)[s] == 3 for s in INTERMEDIATES) and kept.in_memory == []
    plain = _experiment(tmp_path / "plain", folder, index={"kind": "flat"})
    plain["runner"] = {"fuse": False}
    assert run_experiment(parse_experiment(plain, source="test"), progress=False, orchestrate=False).failed == 0
    default = store_snapshot(tmp_path / "default" / "store")
    assert len(default) == 3 * 3 + 1
    assert_same_outputs(default, {k: v for k, v in store_snapshot(tmp_path / "kept" / "store").items()
                                  if k[0] not in INTERMEDIATES})
    assert_same_outputs(default, store_snapshot(tmp_path / "plain" / "store"))

    # a rerun computes nothing (and needs no intermediate)
    seen.clear()
    assert computed(run_experiment(exp, progress=False, orchestrate=False)) == {}
    assert not seen


def test_the_experiment_persist_keeps_a_bank_intermediate_and_bank_outputs_cannot_be_dropped(tmp_path):
    data = _experiment(tmp_path, tmp_path)
    exp = parse_experiment({**data, "persist": {"vfm_features": True}}, source="test")
    nodes = {n.stage: n for p in build_plan(exp) for n in p.nodes.values()}
    assert nodes["vfm_features"].persist and not nodes["dino_features"].persist
    both = parse_experiment({**data, "persist": {"vfm_features": True},
                             "banks": [{**data["banks"][0], "persist": {"vfm_features": False}}]}, source="test")
    assert not {n.stage: n for p in build_plan(both) for n in p.nodes.values()}["vfm_features"].persist  # the bank's wins
    # the experiment's sam_masks: false is for its datasets; its bank still stores its regions
    exp = parse_experiment({**data, "persist": {"sam_masks": False}}, source="test")
    assert {n.stage: n for p in build_plan(exp) for n in p.nodes.values()}["sam_masks"].persist
    for stage in ("bank_values", "bank_keys"):
        with pytest.raises(ExperimentError, match=rf"persist: {stage} must be persisted: scores, per-vocabulary"):
            parse_experiment({**data, "persist": {stage: False}}, source="test")
    for stage in ("bank_values", "bank_keys", "sam_masks", "bank_index"):
        with pytest.raises(ExperimentError, match=rf"banks\.0\.persist: {stage} must be persisted: a bank's regions"):
            parse_experiment({**data, "banks": [{**data["banks"][0], "persist": {stage: False}}]}, source="test")
    with pytest.raises(ExperimentError, match=r"unknown stage 'dino_feature' \(did you mean 'dino_features'\?\)"):
        parse_experiment({**data, "banks": [{**data["banks"][0], "persist": {"dino_feature": True}}]}, source="test")


@pytest.mark.slow  # Prefect and a temporary Dask cluster
def test_a_bank_built_on_a_dask_worker_stores_what_a_one_thread_local_build_stores(tmp_path):
    """The chain batches, and the intermediates they compute in memory, on a temporary Dask cluster's worker process
    (one torch thread, docs/scaling-out.md): the regions, values, keys and index of a local build at one torch
    thread, bit for bit, and no intermediate stored."""
    folder = _folder(tmp_path, BANK_IMAGES[:2])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a local one-worker run computes in this thread
    try:
        _build(tmp_path / "local", folder)
    finally:
        torch.set_num_threads(threads)
    data = _experiment(tmp_path / "dask", folder, index={"kind": "flat"})
    data["runner"] = {"kind": "dask", "workers": 1}
    summary = run_experiment(parse_experiment(data, source="test"), progress=False)  # Dask runs under Prefect
    assert summary.failed == 0 and summary.status == "complete"
    assert {s for s, _ in Store(tmp_path / "dask" / "store").stage_sets()} == {"sam_masks", "bank_values", "bank_keys",
                                                                                "bank_index"}
    assert_same_outputs(store_snapshot(tmp_path / "local" / "store"), store_snapshot(tmp_path / "dask" / "store"))
