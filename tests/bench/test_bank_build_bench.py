"""``bench/bank_build.py`` (issue 22, bank build wall / compute) end to end on three synthetic images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("order", [[], ["--bare-first"], ["--bare-around"]])
def test_bank_build_bench_reports_consistent_wall_compute_and_a_noop_rerun(tmp_path, order):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bank_build.py"), "--images", "3", "--no-prefect",
                           "--out", str(tmp_path / "out"), "--workdir", str(tmp_path), *order],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "bank-build.json").read_text())
    assert r["images"] == 3 and r["index"] == "ivfpq" and r["prefect"] is False
    stages = {s["stage"]: s for s in r["stages"]}
    # the bank's own stages ran, one item per image (the index: one item per bank); nothing else (no dataset)
    # (the bank's intermediates, vfm_features etc., are computed in memory and not stored: no stage of their own)
    assert set(stages) == {"sam_masks", "bank_values", "bank_keys", "bank_index"}
    assert all(stages[s]["items"] == 3 for s in ("sam_masks", "bank_values", "bank_keys"))
    assert stages["bank_index"]["items"] == 1
    # ratio recomputed here from the per-stage figures; the cold run's wall holds every stage's interval
    compute = sum(s["compute_seconds"] for s in r["stages"]) + sum(s["compute_seconds"] for s in r["in_memory"])
    assert {s["stage"]: s["items"] for s in r["in_memory"]} == {  # computed in memory once per image, not stored
        s: 3 for s in ("dino_features", "clip_layers", "vfm_features", "mask_clustering", "mask_class_tokens")}
    assert compute > 0 and abs(r["compute_seconds"] - compute) < 1e-9
    assert abs(r["wall_over_compute"] - r["cold_seconds"] / compute) < 1e-9
    assert all(0 <= s["compute_seconds"] <= s["wall_seconds"] + 1e-3 for s in r["stages"])
    assert r["cold_seconds"] >= max(s["wall_seconds"] for s in r["stages"])
    assert 0 < r["noop_rerun_seconds"] < r["cold_seconds"]
    assert len(r["load_start"]) == 3 and len(r["load_end"]) == 3
    assert f"wall / compute {r['wall_over_compute']:.3f}" in proc.stdout
    assert all(f"| {s} |" in proc.stdout for s in stages)
    # the bare build: every per-image stage and the index, over the same regions, before or after the cold build
    b = r["bare"]
    assert r["bare_first"] is (order == ["--bare-first"]) and r["bare_around"] is (order == ["--bare-around"])
    assert {s["stage"] for s in b["stages"]} == set(stages) | {"dino_features", "clip_layers", "vfm_features",
                                                               "mask_clustering", "mask_class_tokens"}
    assert all(f"| {s['stage']} (in memory, not stored) |" in proc.stdout for s in b["stages"] if s["stage"] not in stages)
    assert b["regions"] > 0 and b["index_bytes"] > 0
    own = b["after"]["wall_seconds"] if order == ["--bare-around"] else b["wall_seconds"]  # the rows: the last one's
    assert sum(s["wall_seconds"] for s in b["stages"]) <= own + 1e-3
    assert abs(r["wall_over_bare"] - r["cold_seconds"] / b["wall_seconds"]) < 1e-9
    if order == ["--bare-around"]:  # the reference is the mean of the bare builds before and after the cold one
        assert abs(b["wall_seconds"] - (b["before"]["wall_seconds"] + b["after"]["wall_seconds"]) / 2) < 1e-9
        assert abs(b["cpu_seconds"] - (b["before"]["cpu_seconds"] + b["after"]["cpu_seconds"]) / 2) < 1e-9
        assert "the mean of one before and one after the cold build" in proc.stdout
    else:
        assert ("before the cold build" if order else "after the cold build") in proc.stdout
