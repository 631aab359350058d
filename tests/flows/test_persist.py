"""The storage budget's per-stage ``persist: false``: computed on demand inside consumers, never written, same outputs."""

from __future__ import annotations

import numpy as np
import pytest

from flows.config import ExperimentError
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.conftest import computed, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore")
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
