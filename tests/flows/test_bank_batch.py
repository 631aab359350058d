"""A bank's own batch size (``banks[].batch_size``, default the larger of 32 and ``runner.batch_size``): fewer,
larger batches of its cheap per-image stages, with outputs equal bit for bit to those of batches of one image."""

from __future__ import annotations

import pytest

from flows.bank_graph import BANK_BATCH_SIZE
from flows.config import BankEntry, parse_experiment
from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.conftest import assert_same_outputs, computed, store_snapshot
from tests.flows.test_banks import BANK_IMAGES, _experiment, _folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bank_plan(data: dict):
    return next(p for p in build_plan(parse_experiment(data, source="test")) if p.dataset.name.startswith("bank-"))


@pytest.mark.parametrize(("runner", "bank", "expected"), [
    (None, None, BANK_BATCH_SIZE),  # the default runner (8): the bank's default
    (4, None, BANK_BATCH_SIZE),
    (64, None, 64),  # a larger runner batch is kept
    (4, 2, 2),  # an explicit bank batch wins, smaller or larger
    (8, 100, 100),
])
def test_the_bank_batch_size_is_its_own_or_the_larger_of_32_and_the_runners(tmp_path, runner, bank, expected):
    data = _experiment(tmp_path, tmp_path, **({} if bank is None else {"batch_size": bank}))
    if runner is not None:
        data["runner"] = {"batch_size": runner}
    assert _bank_plan(data).batch_size == expected


def test_the_documented_default_is_the_constant():
    assert f"the larger of {BANK_BATCH_SIZE} " in BankEntry.model_fields["batch_size"].description


def test_a_dataset_keeps_the_runner_batch_size(tmp_path):
    data = {"name": "x", "store": str(tmp_path / "s"), "datasets": [{"name": "d", "layout": "folder", "root": str(tmp_path),
            "classes": ["a", "b"]}], "methods": [{"name": "m", "method": "corrclip"}], "runner": {"batch_size": 4},
            "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0"}, "regions": {"source": "slic"}}
    assert [p.batch_size for p in build_plan(parse_experiment(data, source="test"))] == [None]


def _packs(store, stage: str) -> int:
    st = Store(store)
    (key,) = [k for s, k in st.stage_sets() if s == stage]
    state = st.state(stage, key)
    return len({state.pack_of(i) for i in st.complete_items(stage, key)})


@pytest.mark.slow
def test_one_batch_of_the_bank_default_stores_what_batches_of_one_image_store(tmp_path):
    folder = _folder(tmp_path, BANK_IMAGES)
    data = _experiment(tmp_path, folder, index={"kind": "flat"})
    data["runner"] = {"kind": "local", "workers": 1, "batch_size": 1}
    one = {**data, "store": str(tmp_path / "one"), "banks": [{**data["banks"][0], "batch_size": 1}]}
    for d in (data, one):
        summary = run_experiment(parse_experiment(d, source="test"), progress=False, orchestrate=False)
        assert summary.failed == 0 and computed(summary)["bank_keys"] == len(BANK_IMAGES)
    # runner.batch_size 1 alone would give one pack per image: the bank's default batch holds all three
    assert [_packs(tmp_path / "store", s) for s in ("sam_masks", "bank_values", "bank_keys")] == [1, 1, 1]
    assert [_packs(tmp_path / "one", s) for s in ("sam_masks", "bank_values", "bank_keys")] == [3, 3, 3]
    assert_same_outputs(store_snapshot(tmp_path / "store"), store_snapshot(tmp_path / "one"))
