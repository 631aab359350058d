"""Stored outputs stay valid across releases: the stage keys of every shipped config include the keys the
previous release (commit e338164) computed for it, so options and methods added since move no existing key.

``stage_keys_e338164.json`` was written by that release's own ``flows.graph.build_plan`` (dry-run plan of
each file in ``configs/``); it is the independent expectation here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flows.config import load_experiment
from flows.graph import build_plan
from ovseg_core.options import KEY_OMIT_DEFAULT, later_option
from ovseg_core.scclip.config import SCCLIPConfig
from storage.keys import StageKey, to_jsonable

REPO = Path(__file__).resolve().parents[2]
RECORDED = json.loads((Path(__file__).parent / "stage_keys_e338164.json").read_text())


@pytest.mark.parametrize("config", sorted(RECORDED))
def test_previous_release_keys_are_kept(config):
    exp = load_experiment(str(REPO / "configs" / config))
    now = {(p.dataset.name, n.stage, n.key) for p in build_plan(exp, []) for n in p.ordered()}
    missing = [tuple(k) for k in RECORDED[config] if tuple(k) not in now]
    assert not missing, f"{config}: keys of the previous release no longer planned: {missing[:5]}"


def test_a_later_option_is_hashed_only_away_from_its_default():
    @dataclasses.dataclass(frozen=True)
    class Old:
        a: int = 1

    @dataclasses.dataclass(frozen=True)
    class New:
        a: int = 1
        b: bool = later_option(False)

    assert to_jsonable(New()) == to_jsonable(Old()) == {"a": 1}
    assert to_jsonable(New(b=True)) == {"a": 1, "b": True}
    assert StageKey("s", New()).key == StageKey("s", Old()).key != StageKey("s", New(b=True)).key


def test_every_scclip_extension_field_is_a_later_option():
    fields = {f.name: f for f in dataclasses.fields(SCCLIPConfig)}
    ext = [n for n in fields if n.startswith(("dynamic_", "boundary_", "gate_", "selective_", "progressive_",
                                              "complexity_"))]
    assert ext and all(fields[n].metadata.get(KEY_OMIT_DEFAULT) for n in ext)
    assert set(to_jsonable(SCCLIPConfig())) == set(fields) - set(ext)
