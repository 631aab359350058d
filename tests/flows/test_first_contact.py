"""What a new user meets in the first hour (issue 21): messages, the dry run, logs, ``cache ls`` / ``gc`` output, tags.

One tiny experiment (one VOC sample image, tiny random CorrCLIP at tau 3 and 2.5) is run once through the CLI
with stderr redirected, as an overnight job's log would be.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.config import load_experiment
from flows.logs import PlainProgress, configure_logging, progress_bar
from flows.orchestration import run_tags
from tests.flows.conftest import SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0"}


def _experiment(base: Path, **changes) -> Path:
    data = {"name": "first-contact", "store": str(base / "store"),
            "datasets": [{"name": "photos", "layout": "folder", "root": "photos", "classes": "sky; tree; road"}],
            "models": TINY, "regions": {"source": "slic", "params": {"n_segments": 40}},
            "methods": [{"name": "corrclip-tau3", "method": "corrclip", "params": {"tau": 3.0}},
                        {"name": "corrclip-tau25", "method": "corrclip", "params": {"tau": 2.5}}],
            "text_templates": "single", "runner": {"kind": "local", "workers": 1, "batch_size": 8}, **changes}
    path = base / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The experiment run by ``ovseg run --no-prefect`` with stderr redirected to a file-like log."""
    base = tmp_path_factory.mktemp("first-contact")
    (base / "photos").mkdir()
    shutil.copy(SAMPLE / "camvid-sample" / "val" / "0016E5_07959.png", base / "photos" / "street.png")
    exp = _experiment(base)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--no-prefect"]) == 0
    return base, exp, err.getvalue()


def test_a_redirected_log_gets_no_progress_bar_lines(ran):
    _, _, log = ran
    assert "\r" not in log and "it/s" not in log and "img/s]" not in log
    assert "INFO ovseg.flows: photos:reconstruction" in log  # the per-stage lines are still there


def test_plain_progress_lines_say_how_far_and_how_long(caplog):
    caplog.set_level(logging.INFO, logger="ovseg.progress")
    bar = PlainProgress(4, "photos:reconstruction (7/9)", interval=0.0)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ovseg.progress"]
    assert [ln.split(" img")[0] for ln in lines] == [f"photos:reconstruction (7/9): {i}/4" for i in (1, 2, 3)]
    assert "(25%)" in lines[0] and "left" in lines[0]  # the last update is the stage's own summary line
    with contextlib.redirect_stderr(io.StringIO()):  # not a terminal
        assert isinstance(progress_bar(3, "x"), PlainProgress)
        assert not isinstance(progress_bar(3, "x", enabled=False), PlainProgress)


def test_prefect_drain_warnings_are_not_printed(capsys):
    configure_logging(0)
    logging.getLogger("EventsWorker").warning("Still processing items: 3 items remaining...")
    logging.getLogger("APILogWorker").warning("Still processing items: 1 items remaining...")
    logging.getLogger("prefect.something").warning("a real warning")
    err = capsys.readouterr().err
    assert "Still processing items" not in err and "a real warning" in err


def test_cache_ls_shows_only_what_each_key_reads(ran, capsys):
    base, _, _ = ran
    assert main(["cache", "ls", "--store", str(base / "store")]) == 0
    rows = [(ln.split()[0], json.loads(ln[ln.index("{"):])) for ln in capsys.readouterr().out.splitlines()
            if ln.startswith(("mask_clustering", "reconstruction"))]
    clustering = [params for stage, params in rows if stage == "mask_clustering"]
    assert len(clustering) == 1  # tau 3 and tau 2.5 share it
    assert "tau" not in clustering[0]["config"] and clustering[0]["config"]["dbscan_eps"] == 0.2
    assert sorted(params["config"]["tau"] for stage, params in rows if stage == "reconstruction") == [2.5, 3.0]
    assert all("map_correction" not in params["config"] for stage, params in rows if stage == "reconstruction")


def test_shown_reconstruction_fields_follow_the_correlation_source():
    from flows.key_view import shown_params

    v1 = {"tau": 3.0, "dbscan_eps": 0.2, "m0_quirk": True, "map_correction": True, "similarity": "dino_qk"}
    v2 = dict(v1, similarity="vfm")  # CorrCLIPv2 reads the clustering fields and m0_quirk in reconstruction
    assert shown_params("reconstruction", {"config": v1})["config"] == {"tau": 3.0, "similarity": "dino_qk"}
    assert shown_params("reconstruction", {"config": v2})["config"] == {"tau": 3.0, "dbscan_eps": 0.2,
                                                                         "m0_quirk": True, "similarity": "vfm"}


def test_gc_budget_dry_run_prints_one_consistent_summary(ran, capsys):
    base, _, _ = ran
    assert main(["cache", "gc", "--store", str(base / "store"), "--max-bytes", "1", "--dry-run", "--only-experiments"]) == 0
    out = capsys.readouterr().out.splitlines()
    totals = [ln for ln in out if ln.startswith("would remove") and "output set" in ln and "/" not in ln.split(":")[0]]
    assert len(totals) == 1 and "freed by the storage budget" in totals[0]
    assert out[-1].startswith("also would remove 0 superseded or unrecorded packs, 0 temporary files of dead writers, "
                              "0 dead leases")
    assert not any(" 1 items" in ln for ln in out) and any(": 1 item, " in ln for ln in out)


def test_dry_run_of_an_empty_folder_fails_like_the_run(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    exp = _experiment(tmp_path)
    assert main(["run", str(exp), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "dataset 'photos': no images found under" in err and "is empty" in err
    assert not (tmp_path / "store").exists()


def test_a_wrong_root_names_the_dataset_the_key_and_what_exists(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    exp = _experiment(tmp_path, datasets=[{"name": "photos", "layout": "folder", "root": "photoz", "classes": "a; b"}])
    assert main(["run", str(exp), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"dataset 'photos' (datasets[0].root = {tmp_path / 'photoz'})" in err
    assert "does not exist (did you mean 'photos'?)" in err and f"{tmp_path} holds: exp.yaml, photos/" in err
    assert "--set datasets.0.root=PATH" in err


def test_a_parameter_typo_given_by_set_names_the_override(ran, capsys):
    _, exp, _ = ran
    assert main(["run", str(exp), "--dry-run", "--set", "methods.1.params.tua=2.0"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'tua' (did you mean 'tau'?)" in err and "[set by override 'methods.1.params.tua=2.0']" in err
    (tmp := exp.parent / "typo.yaml").write_text(exp.read_text().replace("tau: 2.5", "tua: 2.5"))
    assert main(["run", str(tmp), "--dry-run"]) == 2
    assert "set by override" not in capsys.readouterr().err  # a typo in the file is not blamed on an override


def test_prefect_runs_with_overrides_carry_a_tag(ran):
    _, exp, _ = ran
    tags = run_tags(load_experiment(exp, overrides=["methods.0.params.tau=2.0", "runner.workers=2"]))
    assert tags[-2:] == ["set:methods.0.params.tau=2.0", "set:runner.workers=2"]
    assert not [t for t in run_tags(load_experiment(exp)) if t.startswith("set:")]


def test_segment_without_weights_names_its_own_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OVSEG_WEIGHTS", raising=False)
    img = str(SAMPLE / "camvid-sample" / "val" / "0016E5_07959.png")
    assert main(["segment", img, "--classes", "sky; road", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "weights_dir=" not in err and "--weights-dir DIR" in err and "OVSEG_WEIGHTS" in err
    for file in ("b16_fullcc2.5b.pt", "dino_vitbase8_pretrain.pth", "sam_vit_b_01ec64.pth"):
        assert file in err
    assert "--clip clip:tiny@random:0 --dino dino:tiny8@random:0 --sam sam:tiny@random:0" in err
    (tmp_path / "w").mkdir()
    assert main(["segment", img, "--classes", "sky; road", "--weights-dir", str(tmp_path / "w"),
                 "--store", str(tmp_path / "s")]) == 2
    assert f"pretrained weights missing in {tmp_path / 'w'}" in capsys.readouterr().err
