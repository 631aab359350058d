"""The storage budget's per-stage ``persist: false``: computed on demand inside consumers, never written, same outputs."""

from __future__ import annotations

import numpy as np
import pytest

from flows.config import ExperimentError
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.maintenance import list_stages
from storage.store import Store
from tests.flows.conftest import computed, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect
ON_DEMAND = {"dino_features": False, "clip_layers": False, "mask_clustering": False}


def test_stages_not_persisted_are_computed_on_demand_with_the_same_outputs(tmp_path):
    ref = tiny_experiment(tmp_path / "ref")
    run_experiment(ref, progress=False)
    exp = tiny_experiment(tmp_path / "st", persist=ON_DEMAND)
    summary = run_experiment(exp, progress=False)
    assert summary.status == "complete"
    assert set(computed(summary)) == {"text_embeddings", "sam_masks", "mask_class_tokens", "reconstruction",
                                      "map_correction", "scoring"}
    stored = {s for s, _ in Store(tmp_path / "st").stage_sets()}
    assert not stored & set(ON_DEMAND)  # never written
    a, b = Store(tmp_path / "ref"), Store(tmp_path / "st")
    (plan,) = build_plan(exp)
    compared = 0
    for node in plan.nodes.values():
        if not node.persist:
            continue
        for item in a.complete_items(node.stage, node.key):
            x, y = a.read_item(node.stage, node.key, item), b.read_item(node.stage, node.key, item)
            for name in x:
                np.testing.assert_array_equal(x[name], y[name], err_msg=f"{node.stage} {name}")
                compared += 1
    assert compared > 20
    again = run_experiment(exp, progress=False)
    assert computed(again) == {}  # keys did not change: persisting is not part of them


@pytest.mark.parametrize("persist,message", [({"scoring": False}, "scoring must be persisted"),
                                             ({"dino_feature": False}, "did you mean 'dino_features'")])
def test_persist_names_are_checked(tmp_path, persist, message):
    with pytest.raises(ExperimentError, match=message):
        tiny_experiment(tmp_path, persist=persist)


def test_gc_storage_budget_evicts_least_recently_used_sets(tmp_path, capsys):
    import yaml

    from flows.cli import main

    store = tmp_path / "store"
    files = []
    for i, stride in enumerate((112, 56)):
        exp = tiny_experiment(store, name=f"e{i}", methods=[{"name": "clip", "method": "clip", "window": {"stride": stride}}])
        files.append(tmp_path / f"e{i}.yaml")
        files[-1].write_text(yaml.safe_dump(exp.model_dump(mode="json")))
        assert main(["run", str(files[-1]), "-q"]) == 0
    st = Store(store)
    sizes = {(i.stage, i.key): i.nbytes for i in list_stages(st)}
    first = {(n.stage, n.key) for n in build_plan(tiny_experiment(store, name="e0", methods=[
        {"name": "clip", "method": "clip", "window": {"stride": 112}}]))[0].nodes.values()}
    only_first = {k for k in first if k in sizes} - {(n.stage, n.key) for n in build_plan(tiny_experiment(
        store, name="e1", methods=[{"name": "clip", "method": "clip", "window": {"stride": 56}}]))[0].nodes.values()}
    assert only_first  # e0's clip dump, reconstruction and scores are used by e0 only, and longer ago
    budget = sum(sizes.values()) - 1
    capsys.readouterr()
    assert main(["cache", "gc", "--store", str(store), "--max-bytes", str(budget), "--dry-run", "--only-experiments"]) == 0
    assert "least recently used" in capsys.readouterr().out and set(Store(store).stage_sets()) == set(sizes)
    assert main(["cache", "gc", "--store", str(store), "--older-than", "30d"]) == 0
    assert set(Store(store).stage_sets()) == set(sizes)  # everything was used today
    assert main(["cache", "gc", "--store", str(store), "--max-bytes", str(budget)]) == 0
    assert set(Store(store).stage_sets()) == set(sizes)  # the newest run of each experiment is kept
    assert "pass --only-experiments to evict the newest runs' outputs too" in capsys.readouterr().out
    assert main(["cache", "gc", "--store", str(store), "--max-bytes", str(budget), "--only-experiments"]) == 0
    left = set(Store(store).stage_sets())
    evicted = set(sizes) - left
    assert evicted and evicted <= only_first  # the least recently used sets went first
    assert main(["cache", "gc", "--store", str(store), "--max-bytes", "1G", "--only-experiments"]) == 0
    assert set(Store(store).stage_sets()) == left
