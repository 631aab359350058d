"""The graph is wired from the stage table: for every registered method, each node's upstream is what its
stage declares, and the stages a method uses are those its description says."""

from __future__ import annotations

import pytest

from flows.config import parse_experiment
from flows.graph import build_plan, wire
from ovseg_core.methods import METHODS
from tasks.stages import STAGES
from tests.flows.conftest import SAMPLE

# Hand-written from the method descriptions (README "Methods", docs/design.md): the stages whose
# output each method's prediction is computed from, and the stage that holds its final labels.
FEATURES = {"text_embeddings", "clip_layers", "reconstruction", "scoring"}
CORRCLIP = FEATURES | {"sam_masks", "dino_features", "mask_clustering", "mask_class_tokens", "map_correction"}
# CorrCLIPv2: a VFM map instead of DINO q+k, no mask clustering stage; its mask class tokens pool over sam_masks
CORRCLIPV2 = FEATURES | {"sam_masks", "vfm_features", "mask_class_tokens", "map_correction"}
EXPECTED = {"corrclip": (CORRCLIP, "map_correction"), "corrclip+scclip": (CORRCLIP, "map_correction"),
            "scclip": (FEATURES, "reconstruction"), "clip": (FEATURES, "reconstruction"),
            "maskclip": (FEATURES, "reconstruction"), "clearclip": (FEATURES, "reconstruction"),
            "corrclipv2": (CORRCLIPV2, "map_correction")}


def _experiment(methods: list[dict]):
    return parse_experiment({
        "name": "graph", "store": "unused",
        "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample")}],
        "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0",
                   "vfm": "vfm:tiny_radiov3@random:0"},
        "regions": {"source": "slic"}, "methods": methods})


def _method_nodes(mp) -> dict[str, object]:
    """The nodes a method's scores depend on, by stage (one per stage within one method)."""
    out, stack = {}, [mp.scoring]
    while stack:
        n = stack.pop()
        assert out.setdefault(n.stage, n) is n
        stack.extend(n.upstream.values())
    return out


def test_every_registered_method_has_an_expectation():
    assert set(EXPECTED) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_table_and_graph_agree_for_every_method(method):
    (plan,) = build_plan(_experiment([{"name": method, "method": method}]))
    (mp,) = plan.methods
    nodes = _method_nodes(mp)
    stages, final = EXPECTED[method]
    assert set(nodes) == stages
    assert mp.prediction.stage == final and mp.scoring.upstream["prediction"] is mp.prediction
    for node in nodes.values():
        stage = STAGES[node.stage]
        declared = {i.role: i for i in stage.inputs}
        assert set(node.upstream) <= set(declared), node.stage
        for role, inp in declared.items():
            held = [s for s in inp.sources if s in nodes]
            if inp.explicit:  # set by the graph builder (DMCE's second vocabulary), never from the chain
                assert role not in node.upstream or node.upstream[role] is not nodes.get(held[0] if held else ""), role
            elif held:  # wired to the first source the method's graph holds
                assert node.upstream[role] is nodes[held[0]], (node.stage, role)
            else:
                assert not inp.required and role not in node.upstream, (node.stage, role)


def test_optional_inputs_follow_the_method_config():
    exp = _experiment([{"name": "no-sem", "method": "corrclip", "params": {"semantic_branch": False,
                                                                           "map_correction": False}}])
    (mp,) = build_plan(exp)[0].methods
    rec = mp.prediction
    assert rec.stage == "reconstruction"
    assert set(rec.upstream) == {"text_embeddings", "clip_layers", "dino_features", "sam_masks", "mask_clustering"}


def test_wire_fails_when_a_required_input_has_no_source():
    (plan,) = build_plan(_experiment([{"name": "scclip", "method": "scclip"}]))
    rec = plan.methods[0].prediction
    with pytest.raises(ValueError, match=r"stage 'map_correction' needs its input 'sam_masks' from sam_masks, which "
                                         r"this method's graph does not hold"):
        wire(STAGES["map_correction"], {"reconstruction": rec})
