"""bench/scclip_options.py: its helpers, and a tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def scclip_options(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import scclip_options

    return scclip_options


def test_agreement_pools_pixels_over_images(scclip_options) -> None:
    ref = [np.zeros((2, 2), dtype=np.int64), np.ones((1, 4), dtype=np.int64)]
    other = [np.array([[0, 1], [0, 0]]), np.array([[1, 1, 2, 2]])]
    assert scclip_options.agreement(ref, ref) == 1.0
    assert scclip_options.agreement(other, ref) == pytest.approx(5 / 8)  # 3 of 4 and 2 of 4 pixels


def test_record_summary_and_arguments(scclip_options) -> None:
    text = scclip_options.summarise_record({"path:full": 3, "anomalies": 45, "kept:self_adjusting": 1}, 4)
    assert text == "anomalies 11.2/window, kept:self_adjusting 1/4, path:full 3/4"
    assert scclip_options.summarise_record({}, 4) == "-"
    args = scclip_options.parse_args(["--images", "1", "--only", "dynamic_detection"])
    assert (args.images, args.repeats, args.backbone, args.only) == (1, 3, "clip:ViT-B-16@random:0", ["dynamic_detection"])
    with pytest.raises(SystemExit):
        scclip_options.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        scclip_options.parse_args(["--only", "no-such-option"])


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path, scclip_options) -> None:
    out = tmp_path / "options.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scclip_options.py"), "--backbone", "clip:tiny@random:0", "--images", "1",
         "--repeats", "1", "--threads", "1", "--out", str(out)],
        cwd=BENCH.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["option"]: r for r in res["rows"]}
    assert list(rows) == list(scclip_options.OPTIONS)
    assert res["random_weights"] is True and res["images"] == 1 and res["windows"] >= 1
    paper = rows["paper (default)"]
    assert paper["pixel_agreement"] == 1.0 and paper["total_ratio_to_paper"] == 1.0 and paper["record"] == {}
    # forcing the full path is the paper's computation: the same labels, every window on the full path
    full = rows["selective, force full"]
    assert full["pixel_agreement"] == full["argmax_agreement"] == 1.0 and full["record"]["path:full"] == res["windows"]
    for r in rows.values():
        assert r["total_seconds_per_image"] > 0 and r["features_seconds_per_image"] > 0
        assert 0.0 <= r["pixel_agreement"] <= 1.0 and 0.0 <= r["argmax_agreement"] <= 1.0
    assert set(rows["progressive_calibration"]["record"]) == {
        "kept:anomaly_repair", "kept:self_adjusting", "kept:attention_enhancement", "kept:multi_level_fusion"}
    assert "| option | window features s / image |" in proc.stdout

