"""The benchmark (``bench/run.py``): helpers on synthetic inputs, and a tiny end-to-end smoke run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
MODEL_STAGES = ("sam_masks", "dino_features", "clip_layers", "mask_class_tokens", "reconstruction")


@pytest.fixture
def bench(monkeypatch):
    """The benchmark's modules, importable as the script sees them (its folder first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import measure
    import report
    import run

    return run, measure, report


def test_parse_args_rejects_non_positive_counts(bench):
    run, _, _ = bench
    with pytest.raises(SystemExit):
        run.parse_args(["--images", "0"])
    with pytest.raises(SystemExit):
        run.parse_args(["--repeats", "-1"])
    args = run.parse_args(["--tiny", "--images", "2"])
    assert run.models_for(args)["clip"] == "clip:tiny@random:0"
    assert run.models_for(run.parse_args(["--dino", "vits16"]))["dino"] == "dino:vits16@random:0"


def test_missing_camvid_is_skipped_with_a_message(bench, tmp_path, capsys):
    run, _, _ = bench
    entries = run.dataset_entries(run.parse_args(["--camvid-root", str(tmp_path / "nope"), "--images", "3"]))
    assert [e["name"] for e in entries] == ["voc21-sample"]
    assert entries[0]["limit"] == 3
    assert "CamVid sample not found" in capsys.readouterr().err


def test_rss_peak_and_cpu_are_attributed_to_the_interval(bench):
    _, measure, _ = bench
    s = measure.RssSampler()
    s.samples = [(0.0, 100, 5, 0.0), (1.0, 300, 7, 1.0), (2.0, 200, 9, 3.0), (3.0, 900, 1, 3.5)]
    assert s.peak(0.5, 2.5) == 300
    assert s.peak(2.5, 3.0) == 900
    assert s.peak(1.2, 1.4) == 300  # no sample inside: the larger of the samples around it
    assert s.peak(5.0, 6.0) == 900
    assert measure.RssSampler().peak(0.0, 1.0) == 0
    assert s.peak() == 900
    assert s.children_peak() == 9
    assert s.cpu_seconds(1.0, 2.0) == pytest.approx(2.0)


def test_median_ignores_missing_values(bench):
    _, measure, _ = bench
    assert measure.median([3.0, None, 1.0, 2.0]) == 2.0
    assert measure.median([4.0, 1.0]) == 2.5
    assert measure.median([None]) is None


def _stage(dataset, stage, wall, bare=None, windows=None, flops=None):
    row = {"dataset": dataset, "stage": stage, "key": f"{stage}-k", "items": 2, "wall_seconds": wall,
           "compute_seconds": wall, "items_per_second": 2 / wall, "bytes_per_item": 1024.0, "peak_rss_bytes": 2**20,
           "cpu_seconds": 2 * wall}
    if bare is not None:
        row.update({"bare_seconds": bare, "bare_cpu_seconds": 2 * bare, "windows": windows, "flops_per_window": flops,
                    "overhead_ratio": wall / bare, "cpu_overhead_ratio": wall / bare})
    return row


def _repeat(scale):
    return {
        "repeat": 0, "first_run_seconds": 100.0 * scale,
        "stages": [_stage("a", "sam_masks", 10.0 * scale, 8.0, 2, 1e9), _stage("b", "sam_masks", 10.0 * scale, 12.0, 2, 1e9),
                   _stage("a", "scoring", 1.0)],
        "incremental": {"rerun_seconds": 4.0, "ratio": 4.0 / (100.0 * scale), "recomputed": ["reconstruction", "scoring"]},
        "cache_hit": {"warm_seconds": 5.0, "cold_seconds": 50.0, "ratio": 0.1, "recomputed": ["reconstruction"]},
    }


def test_summary_ratios_are_per_repeat_medians(bench):
    run, _, report = bench
    reps = [_repeat(1.0), _repeat(1.2), _repeat(2.0)]
    res = report.summarise(
        reps, machine={"matmul_gflops": 10.0, "cpu_model": "x", "usable_cores": 2, "logical_cores": 2, "torch": "t",
                       "torch_threads": 2, "load_average_1min_at_start": 0.0},
        models={"clip": "clip:tiny@random:0"}, datasets=[{"name": "a", "spec": "VOC21"}, {"name": "b", "spec": "CamVid"}],
        args={}, command="python bench/run.py", prefect_startup_seconds=1.0, model_load_seconds={"clip": 0.5},
        text_embeddings_seconds={"a": 2.0},
        process_peak_rss_bytes=2**30, children_peak_rss_bytes=2**20, total_seconds=10.0, overhead_target=1.10,
        incremental_target=0.05, incremental_stages=run.INCREMENTAL_STAGES)
    sam = res["model_stages"][0]
    assert sam["stage"] == "sam_masks"
    # per repeat: (10 s + 10 s) * scale / (8 s + 12 s) bare -> median over scales 1.0, 1.2, 2.0 is 1.2
    assert sam["overhead_ratio"] == pytest.approx(1.2)
    assert sam["overhead_target_met"] is False
    assert res["overhead"]["target_met"] is False
    # 4 windows x 1 GFLOP over 20 s * 1.2 of pipeline wall time; matmul 10 GFLOP/s
    assert sam["achieved_gflops"] == pytest.approx(4.0 / 24.0)
    assert sam["fraction_of_matmul"] == pytest.approx(4.0 / 24.0 / 10.0)
    assert res["incremental"]["ratio"] == pytest.approx(4.0 / 120.0)
    assert res["incremental"]["target_met"] is True
    assert res["incremental"]["recomputed_only_expected"] is True
    assert res["cache_hit"]["ratio"] == pytest.approx(0.1)
    assert res["first_run_images_per_second"] == pytest.approx(4 / 120.0)
    md = report.markdown(res)
    assert "| sam_masks | 4 |" in md and "NOT met" in md


@pytest.mark.slow
def test_tiny_benchmark_writes_every_field(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--tiny", "--images", "2", "--repeats", "1", "--out", str(out),
         "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["text_embeddings_seconds"]) == {d["name"] for d in res["datasets"]}
    for key in ("command", "machine", "models", "datasets", "repeats", "prefect_startup_seconds", "model_load_seconds",
                "process_peak_rss_bytes", "first_run_seconds", "stages", "model_stages", "incremental", "cache_hit",
                "overhead", "per_repeat"):
        assert key in res, key
    assert res["repeats"] == 1
    for key in ("cpu_model", "logical_cores", "torch_threads", "matmul_gflops"):
        assert res["machine"][key], key
    assert res["datasets"][0]["name"] == "voc21-sample" and res["datasets"][0]["images"] == 2
    assert res["prefect_startup_seconds"] > 0
    assert res["process_peak_rss_bytes"] > 0
    for s in res["stages"]:
        for key in ("items_per_second", "bytes_per_item", "peak_rss_bytes", "wall_seconds"):
            assert s[key] is not None and s[key] > 0, (s["dataset"], s["stage"], key)
    assert [m["stage"] for m in res["model_stages"]] == list(MODEL_STAGES)
    for m in res["model_stages"]:
        for key in ("overhead_ratio", "cpu_overhead_ratio", "achieved_gflops", "bare_gflops", "fraction_of_matmul", "flops"):
            assert m[key] is not None and m[key] > 0, (m["stage"], key)
    inc = res["incremental"]
    assert inc["recomputed"] == ["reconstruction", "map_correction", "scoring"]
    assert inc["recomputed_only_expected"] is True
    assert 0 < inc["ratio"] < 1
    ch = res["cache_hit"]
    assert 0 < ch["ratio"] < 1
    assert ch["recomputed"] == ["reconstruction", "map_correction", "scoring"]
    md = (out / "results.md").read_text()
    assert "| dataset | stage |" in md and "incremental ratio" in md


@pytest.mark.slow
def test_scale_benchmark_small_sizes(tmp_path):
    """``bench/scale.py`` end to end at toy sizes: a real run, a no-op rerun and the bookkeeping simulation."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--sizes", "6", "--simulate", "40",
                           "--out", str(tmp_path / "out"), "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "scale.json").read_text())
    fused, staged = results["real"]  # both modes by default, fused first
    assert (fused["mode"], staged["mode"]) == ("fused", "staged")
    for real in (fused, staged):
        assert real["images"] == 6 and real["files_per_image"] <= 12
        assert {s["stage"] for s in real["stages"]} >= {"sam_masks", "reconstruction", "scoring"}
        assert all(s["fixed_ms_per_image"] >= 0 for s in real["stages"])
    # counted in the real decode functions: fused, each image once in the stages (SLIC, DINO, 2 CLIPs, tokens staged)
    assert fused["decodes_per_image"]["stage_image"] == 1 and staged["decodes_per_image"]["stage_image"] == 5
    assert fused["decodes_per_image"]["stage_gt"] == 1 and fused["decodes_per_image"]["ingest_image"] == 1
    assert results["ratios"][0]["pairs"] == 1
    sim = results["simulation"]
    assert sim["images"] == 40 and sim["noop_rerun_seconds"] > 0 and sim["files_per_image"] <= 12
    assert "Bookkeeping simulation, 40 images" in (tmp_path / "out" / "scale.md").read_text()
