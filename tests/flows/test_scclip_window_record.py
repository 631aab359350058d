"""SC-CLIP's per-window choices (design-document options) are stored per image as reconstruction item attrs."""

from __future__ import annotations

import pytest

from flows.graph import build_plan
from flows.pipeline import run_experiment
from flows.report import write_report
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GATED = {"progressive_calibration": True, "selective_calibration": True, "selective_fast_below": 0.0,
         "selective_full_from": 0.0}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One run of the paper path and a gated one (a whole flow: slow)."""
    tmp_path = tmp_path_factory.mktemp("record")
    exp = tiny_experiment(tmp_path / "store", regions={"source": "slic", "params": {"n_segments": 40}}, methods=[
        {"name": "scclip", "method": "scclip"},
        {"name": "gated", "method": "scclip", "params": GATED},
    ])
    assert run_experiment(exp, progress=False).failed == 0
    return tmp_path, exp


@pytest.mark.slow
def test_kept_steps_and_paths_are_counted_per_image(ran) -> None:
    tmp_path, exp = ran
    st = Store(tmp_path / "store")
    (plan,) = build_plan(exp)
    ids = sorted(r["image_id"] for r in read_table(st, "manifests", ["voc"]).to_pylist())
    recon = {m.entry.name: m.prediction for m in plan.methods}  # SC-CLIP's prediction is its reconstruction
    assert {n.stage for n in recon.values()} == {"reconstruction"}
    for image in ids:
        paper = st.item_attrs("reconstruction", recon["scclip"].key, image)
        assert "window_record" not in paper
        attrs = st.item_attrs("reconstruction", recon["gated"].key, image)
        record, windows = attrs["window_record"], attrs["windows"]
        assert windows > 1
        # every window forced onto the full path; the gate decides each step per window
        assert (record["path:fast"], record["path:balanced"], record["path:full"]) == (0, 0, windows)
        steps = ("anomaly_repair", "self_adjusting", "attention_enhancement", "multi_level_fusion")
        assert sorted(record) == sorted([f"path:{p}" for p in ("fast", "balanced", "full")] + [f"kept:{s}" for s in steps])
        assert all(0 <= record[f"kept:{s}"] <= windows for s in steps)



@pytest.mark.slow
def test_the_report_shows_the_steps_kept_per_image(ran) -> None:
    tmp_path, exp = ran
    page = write_report(str(tmp_path / "store"), tmp_path / "report", samples=2).read_text()
    st = Store(tmp_path / "store")
    (plan,) = build_plan(exp)
    key = {m.entry.name: m.prediction.key for m in plan.methods}["gated"]
    ids = sorted(r["image_id"] for r in read_table(st, "manifests", ["voc"]).to_pylist())[:2]
    lines = [ln for ln in page.splitlines() if 'class="meta record"' in ln]
    assert len(lines) == len(ids)  # one line per sample image, for the gated method only (the paper path records none)
    for image, line in zip(ids, lines):
        attrs = st.item_attrs("reconstruction", key, image)
        rec, windows = attrs["window_record"], attrs["windows"]
        assert line.startswith('<p class="meta record">gated: steps kept in windows: ')
        for step in ("anomaly_repair", "attention_enhancement", "multi_level_fusion", "self_adjusting"):
            assert f"{step} {rec['kept:' + step]}/{windows}" in line
        assert f"paths: full {windows}" in line
