"""Progress and ETA while a memory bank builds (issue 22), in a log that is not a terminal: plain lines with done /
total, rate, elapsed, time left and the expected end, never a carriage return. Tiny random models."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import pytest
import yaml

from flows.cli import main
from tests.flows.conftest import SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOC = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
IMAGES = ["val_crop_0000.jpg", "val_crop_0001.jpg", "val_crop_0008.jpg"]
# "<what>: <done>/<total> img (<pct>%), <rate> img/s, elapsed <t>, about <t> left (ETA HH:MM UTC)"
LINE = re.compile(r"INFO ovseg\.progress: (?P<what>.+?): (?P<done>\d+)/(?P<total>\d+) img \(\d+%\), [\d.]+ img/s, "
                  r"elapsed \d+m\d\ds, about \d+m\d\ds left \(ETA \d\d:\d\d UTC\)$")


@pytest.mark.slow
def test_a_bank_build_logs_progress_lines_with_an_eta_and_no_carriage_return(tmp_path):
    folder = tmp_path / "bank-images"
    folder.mkdir()
    for n in IMAGES:
        shutil.copy(VOC / n, folder / n)
    data = {"name": "bank", "store": str(tmp_path / "store"),
            "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"},
            "regions": {"source": "slic"}, "text_templates": "single", "feature_dtype": "float32",
            "runner": {"batch_size": 1, "progress_seconds": 0},  # a line after every batch but the last
            "banks": [{"name": "sample", "root": str(folder), "window": {"short_side": 224, "crop": 112, "stride": 112},
                       "index": {"kind": "flat"}, "batch_size": 1}]}
    exp = tmp_path / "bank.yaml"
    exp.write_text(yaml.safe_dump(data))
    err = io.StringIO()  # not a terminal
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--no-prefect"]) == 0
    log = err.getvalue()
    assert "\r" not in log and "it/s" not in log
    lines = [m for m in map(LINE.match, log.splitlines()) if m]
    build = [m for m in lines if m["what"].startswith("bank-sample:") and "bank_values" in m["what"]]
    assert [(int(m["done"]), int(m["total"])) for m in build] == [(1, 3), (2, 3)], log
    keys = [m for m in lines if m["what"] == "bank sample: bank_index reading keys"]
    assert [(int(m["done"]), int(m["total"])) for m in keys] == [(1, 3), (2, 3)], log
    assert re.search(r"bank sample: indexing \d+ regions of 3 images \(flat\)", log)
