"""The stage table: declared inputs, findable steps, declared arrays, and what a step may read."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storage.store import Store
from tasks.executor import run_batch
from tasks.runtime import RunSettings, StageContext, StageNode
from tasks.stages import STAGE_ORDER, STAGES, Input, InputError, Stage, Step, get_stage

REPO = Path(__file__).resolve().parents[2]


def _reads(fn) -> tuple[set[str], set[str]]:
    """Roles a step function reads: the first argument of its ``ctx.read_upstream`` / ``ctx.read_shared`` calls,
    the third of its ``row_region_windows(ctx, row, role, plan)`` calls (``tasks.common``: reads ``role``'s ids);
    and, apart, those of another stage's loader it calls by name (``tasks.bank.values_load`` returns
    ``tasks.reconstruction.reconstruction_load``'s inputs)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    roles, delegated = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("read_upstream", "read_shared"):
            arg = node.args[0]
        elif isinstance(node.func, ast.Name) and node.func.id == "row_region_windows":
            arg = node.args[2]
        else:
            if isinstance(node.func, ast.Name) and node.func.id.endswith("_load") and node.func.id != fn.__name__:
                callee = fn.__globals__.get(node.func.id)
                if callable(callee) and callee.__module__.startswith("tasks."):
                    delegated |= set.union(*_reads(callee))
            continue
        assert isinstance(arg, ast.Constant), f"{fn.__qualname__} reads a role that is not a literal"
        roles.add(arg.value)
    return roles, delegated


def test_each_steps_reads_are_exactly_its_declared_inputs():
    """Exactly, for a step's own reads; a step that delegates to another stage's loader reads its declared inputs
    there (that loader's other branches read inputs it does not declare: ``StageContext`` refuses those at run
    time, ``test_a_step_may_read_only_declared_and_wired_inputs``)."""
    for stage in STAGES.values():
        read, delegated = set(), set()
        for step in (stage.models, stage.load, stage.compute):
            own, other = _reads(step.resolve() if isinstance(step, Step) else step)
            read |= own
            delegated |= other
        if delegated:
            assert read <= set(stage.roles) <= read | delegated, stage.name
        else:
            assert read == set(stage.roles), stage.name


def test_declared_inputs_as_the_methods_need_them():
    # written out by hand from the method descriptions (docs/design.md), not read from the table
    expected = {
        "text_embeddings": {}, "sam_masks": {}, "dino_features": {}, "vfm_features": {}, "clip_layers": {},
        "mask_clustering": {"dino_features": (("dino_features",), True), "sam_masks": (("sam_masks",), True)},
        # v1 pools the tokens over the clustered map, CorrCLIPv2 (no clustering stage) over sam_masks
        "mask_class_tokens": {"mask_clustering": (("mask_clustering", "sam_masks"), True)},
        "reconstruction": {"text_embeddings": (("text_embeddings",), True), "clip_layers": (("clip_layers",), True),
                           "dino_features": (("dino_features",), False), "sam_masks": (("sam_masks",), False),
                           "vfm_features": (("vfm_features",), False),
                           "mask_clustering": (("mask_clustering",), False),
                           "mask_class_tokens": (("mask_class_tokens",), False),
                           # CorrCLIPv2's memory bank, and DMCE's auxiliary vocabulary (set by the graph builder)
                           "bank_index": (("bank_index",), False),
                           "aux_text_embeddings": (("text_embeddings",), False)},
        # a bank (docs/banks.md): the authors' builder's CorrCLIP v1 inputs per CLIP, the VFM map, the regions
        "bank_values": {"clip_layers": (("clip_layers",), True), "dino_features": (("dino_features",), True),
                        "sam_masks": (("sam_masks",), True), "mask_clustering": (("mask_clustering",), True),
                        "mask_class_tokens": (("mask_class_tokens",), False)},
        "bank_keys": {"vfm_features": (("vfm_features",), True), "sam_masks": (("sam_masks",), True)},
        "bank_index": {"bank_keys": (("bank_keys",), True), "bank_values": (("bank_values",), True),
                       "bank_aux_values": (("bank_values",), False)},
        "map_correction": {"reconstruction": (("reconstruction",), True), "sam_masks": (("sam_masks",), True)},
        "scoring": {"prediction": (("map_correction", "reconstruction"), True)},
    }
    got = {name: {i.role: (i.sources, i.required) for i in s.inputs} for name, s in STAGES.items()}
    assert got == expected


def test_steps_are_named_in_full_and_resolve_to_those_functions():
    for stage in STAGES.values():
        for step in (stage.models, stage.load, stage.compute, stage.windows):
            if isinstance(step, Step):
                fn = step.resolve()
                assert f"{fn.__module__}:{fn.__name__}" == step.ref, step
    assert Step("tasks.features:sam_load").resolve().__name__ == "sam_load"
    with pytest.raises(ValueError, match="package.module:function"):
        Step("features:")
    with pytest.raises(ValueError, match="package.module:function"):
        Step("tasks.features.sam_load")


def test_reading_the_table_imports_no_torch():
    code = "import sys, tasks.stages; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)}).returncode == 0


def test_unknown_stage_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown stage 'clip_layer' \(did you mean 'clip_layers'\?\); stages are: "
                                         r"text_embeddings, "):
        get_stage("clip_layer")


def test_an_unknown_role_names_the_stage_and_its_inputs():
    with pytest.raises(InputError, match=r"stage 'map_correction' reads input 'labels', which it does not declare "
                                         r"\(its inputs: reconstruction, sam_masks\)"):
        STAGES["map_correction"].input("labels")


def test_array_names_of_a_stage_come_from_the_table_or_its_params():
    from tasks.params import ClipParams, WindowParams

    clip = ClipParams("clip:tiny", WindowParams(112, 56, 56, 16), ("block:1", "mean:1-2"), "float16", "float32")
    assert STAGES["clip_layers"].array_names(clip) == ("block_1", "mean_1-2")
    assert STAGES["map_correction"].array_names(None) == ("labels", "prob")


def test_items_of_a_stage():
    rows = [{"image_id": "a", "gt_path": "a.png"}, {"image_id": "b", "gt_path": ""}]
    assert STAGES["text_embeddings"].items(rows) == [{"image_id": "vocab"}]
    assert [r["image_id"] for r in STAGES["scoring"].items(rows)] == ["a"]
    assert [r["image_id"] for r in STAGES["sam_masks"].items(rows)] == ["a", "b"]
    assert STAGES["text_embeddings"].item_of(rows[0]) == "vocab" and STAGES["clip_layers"].item_of(rows[1]) == "b"


def test_table_order_is_topological_and_checked():
    from tasks.stages import _check_table

    for i, name in enumerate(STAGE_ORDER):
        for inp in STAGES[name].inputs:
            assert all(STAGE_ORDER.index(s) < i for s in inp.sources)
    bad = {"a": dataclasses.replace(STAGES["mask_class_tokens"], name="a")}
    with pytest.raises(ValueError, match="input 'mask_clustering': source"):
        _check_table(bad)


# --------------------------------------------------------------------------- reads refused at run time
@dataclasses.dataclass(frozen=True)
class _Params:
    tag: str = "t"


def _node(stage: str, upstream: dict) -> StageNode:
    return StageNode(stage, _Params(), "1", upstream)


def test_a_step_may_read_only_declared_and_wired_inputs(tmp_path):
    store = Store(tmp_path / "st")
    rec = _node("reconstruction", {})
    store.write_item(rec.stage_key, "i0", {"labels": np.zeros((2, 2), np.uint16), "prob": np.zeros((2, 2), np.float16)})
    node = _node("map_correction", {"reconstruction": rec})  # sam_masks (required) left out on purpose
    ctx = StageContext(node, RunSettings(str(tmp_path / "st")))
    row = {"image_id": "i0"}
    assert ctx.read_upstream("reconstruction", row, ["labels"])["labels"].shape == (2, 2)
    with pytest.raises(InputError, match=r"stage 'map_correction' reads input 'clip_layers', which it does not "
                                         r"declare \(its inputs: reconstruction, sam_masks\)"):
        ctx.read_upstream("clip_layers", row)
    with pytest.raises(InputError, match=r"stage 'map_correction' \(key \w+\): its input 'sam_masks' \(sam_masks\) is "
                                         r"not wired for this node"):
        ctx.read_upstream("sam_masks", row)
    scclip_rec = StageContext(_node("reconstruction", {}), RunSettings(str(tmp_path / "st")))
    with pytest.raises(InputError, match=r"its optional input 'mask_class_tokens' \(mask_class_tokens\) is not wired"):
        scclip_rec.read_upstream("mask_class_tokens", row)
    with pytest.raises(InputError, match="reads input 'vocab'"):
        scclip_rec.read_shared("vocab")


def test_an_item_with_other_arrays_than_declared_fails_and_is_not_stored(tmp_path):
    def compute(ctx, models, inputs):
        return [({"x": np.ones(2), **({"extra": np.ones(1)} if i["id"] == "i1" else {})}, {}) for i in inputs]

    stage = Stage("synthetic", "test", "image", inputs=(), params=_Params, code_version="1",
                  models=lambda ctx: None, load=lambda ctx, row: {"id": row["image_id"]}, compute=compute,
                  arrays=("x",))
    ctx = StageContext(_node("synthetic", {}), RunSettings(str(tmp_path / "st")))
    result = run_batch(ctx, [{"image_id": "i0"}, {"image_id": "i1"}], stage)
    status = {r.item: (r.status, r.error) for r in result.items}
    assert status["i0"] == ("done", "")
    assert status["i1"][0] == "failed"
    assert "computed the arrays ['extra', 'x'] for i1 but declares ['x']" in status["i1"][1]
    assert Store(tmp_path / "st").complete_items("synthetic", ctx.key) == {"i0"}


def test_input_defaults_to_the_stage_named_like_its_role():
    assert Input("sam_masks").sources == ("sam_masks",)
    assert Input("prediction", ("map_correction", "reconstruction"), required=False).sources[0] == "map_correction"


def test_design_doc_lists_every_stage_with_its_description():
    doc = (REPO / "docs" / "design.md").read_text()
    for stage in STAGES.values():
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{stage.name}` |")), None)
        assert row is not None, stage.name
        assert row.rstrip().endswith(f"| {stage.description} |"), row
        for inp in stage.inputs:
            assert inp.role in row, (stage.name, inp.role)
