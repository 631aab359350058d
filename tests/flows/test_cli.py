"""The ``ovseg`` command line, called in-process on real stores and the embedded sample."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from storage.maintenance import list_stages
from storage.store import Store
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore")

LAYOUTS = [
    ("voc2012-sample", "voc", "VOC21", 14, "val_crop_0000.jpg", "SegmentationClass/val_crop_0000.png"),
    ("ade20k-sample", "ade20k", "ADE20K", 3, "ADE_val_00000001.jpg", "annotations/validation/ADE_val_00000001.png"),
    ("cityscapes-sample", "cityscapes", "Cityscapes", 1, "frankfurt_000000_000294_leftImg8bit.png",
     "frankfurt_000000_000294_gtFine_labelTrainIds.png"),
    ("camvid-sample", "camvid", "CamVid", 2, "0016E5_07959.png", "valannot/0016E5_07959.png"),
]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "stage", "ingest", "cache", "runs", "report", "segment", "demo"):
        assert cmd in out


@pytest.mark.parametrize("folder,layout,spec,count,image,gt", LAYOUTS)
def test_ingest_every_sample_layout(tmp_path, capsys, folder, layout, spec, count, image, gt):
    rc = main(["ingest", str(SAMPLE / folder), "--layout", layout, "--store", str(tmp_path / "s"), "--list", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{count} images ({count} ok, 0 unreadable), {count} with ground truth" in out
    line = next(ln for ln in out.splitlines() if image in ln)
    assert gt in line
    assert f"dataset {spec}:" in out


def test_ingest_class_names_and_bad_layout(tmp_path, capsys):
    main(["ingest", str(SAMPLE / "voc2012-sample"), "--layout", "voc", "--classes", "scclip", "--store", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert "21 classes (scclip class file)" in out and "person in shirt" in out
    rc = main(["ingest", str(tmp_path / "nowhere"), "--layout", "voc", "--store", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "nowhere" in err


@pytest.mark.slow  # whole flows through the pipeline and Prefect
def test_run_stage_cache_ls_gc_and_runs(tmp_path, capsys):
    store = tmp_path / "store"
    exp = tiny_experiment(store, methods=[{"name": "scclip", "method": "scclip"}])
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    # one stage alone
    assert main(["stage", "clip_layers", str(exp_file), "-q"]) == 0
    st = Store(store)
    assert [i.stage for i in list_stages(st)] == ["clip_layers"]
    # dry run shows what is left
    assert main(["run", str(exp_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to compute" in out and "used by" in out and "scclip" in out
    assert main(["run", str(exp_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "random-weight" in out
    assert main(["cache", "ls", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "clip_layers" in out and "reconstruction" in out
    header, *rows = [ln for ln in out.splitlines() if ln.startswith(("stage", "clip_layers", "reconstruction"))]
    col = header.index("random weights")
    assert rows and all(r[col:col + 3] == "yes" for r in rows)
    assert main(["runs", "--store", str(store)]) == 0
    assert "tiny" in capsys.readouterr().out
    # an unreferenced stage key is collected, referenced ones stay
    other = tiny_experiment(store, methods=[{"name": "scclip", "method": "scclip", "window": {"stride": 56}}])
    other_file = tmp_path / "other.yaml"
    other_file.write_text(yaml.safe_dump(other.model_dump(mode="json")))
    assert main(["stage", "clip_layers", str(other_file), "-q"]) == 0
    before = {(i.stage, i.key) for i in list_stages(st)}
    assert main(["cache", "gc", str(exp_file), "--only-experiments", "--store", str(store)]) == 0
    after = {(i.stage, i.key) for i in list_stages(st)}
    assert len(before - after) == 1 and next(iter(before - after))[0] == "clip_layers"


def test_unknown_stage_and_bad_experiment(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets: []\nmethods: []\nfoo: 1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "foo: unknown key" in err and "datasets" in err
    assert main(["stage", "nope", str(bad)]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


@pytest.mark.slow  # whole flows through the pipeline and Prefect
def test_segment_an_image_outside_any_dataset(tmp_path, capsys):
    img = tmp_path / "photo.jpg"
    shutil.copy(SAMPLE / "ade20k-sample" / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg", img)
    out = tmp_path / "out" / "overlay.png"
    rc = main(["segment", str(img), "--classes", "sky; building, house; tree; road", "--method", "corrclip",
               "--clip", "clip:tiny@random:0", "--dino", "dino:tiny8@random:0", "--regions", "slic",
               "--store", str(tmp_path / "store"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "meaningless" in text
    labels = np.asarray(Image.open(out.with_name("overlay_labels.png")))
    w, h = Image.open(img).size
    assert labels.shape == (h, w) and labels.max() < 4
    assert Image.open(out).size[0] > 0
    # a second vocabulary reuses the cached image features
    rc = main(["segment", str(img), "--classes", "sky; ground", "--method", "corrclip", "--clip", "clip:tiny@random:0",
               "--dino", "dino:tiny8@random:0", "--regions", "slic", "--store", str(tmp_path / "store"), "--out", str(out)])
    assert rc == 0
    assert np.asarray(Image.open(out.with_name("overlay_labels.png"))).max() < 2
    by_stage: dict[str, int] = {}
    for info in list_stages(Store(tmp_path / "store")):
        by_stage[info.stage] = by_stage.get(info.stage, 0) + 1
    # the image features are shared by both vocabularies; only text and what depends on it is new
    assert by_stage["sam_masks"] == by_stage["dino_features"] == by_stage["clip_layers"] == 1
    assert by_stage["mask_class_tokens"] == 1 and by_stage["text_embeddings"] == by_stage["reconstruction"] == 2


@pytest.mark.slow  # whole flows through the pipeline and Prefect
def test_gc_keeps_the_newest_run_of_each_experiment(tmp_path, capsys):
    store = tmp_path / "store"
    files = []
    for i, stride in enumerate((112, 56)):
        exp = tiny_experiment(store, methods=[{"name": "clip", "method": "clip", "window": {"stride": stride}}])
        files.append(tmp_path / f"exp{i}.yaml")
        files[-1].write_text(yaml.safe_dump(exp.model_dump(mode="json")))
        assert main(["run", str(files[-1]), "-q"]) == 0
    st = Store(store)
    clip_keys = {i.key for i in list_stages(st) if i.stage == "clip_layers"}
    assert len(clip_keys) == 2
    assert main(["cache", "gc", "--all-runs", "--store", str(store)]) == 0
    assert {i.key for i in list_stages(st) if i.stage == "clip_layers"} == clip_keys
    assert main(["cache", "gc", "--store", str(store)]) == 0  # the first parameter set is no longer referenced
    left = {i.key for i in list_stages(st) if i.stage == "clip_layers"}
    assert len(left) == 1 and left < clip_keys
    capsys.readouterr()
    assert main(["run", str(files[1]), "--dry-run"]) == 0
    plan = [ln.split() for ln in capsys.readouterr().out.splitlines()[2:] if ln.strip()]
    assert plan and all(cols[3] == "0" for cols in plan)  # the newest experiment lost nothing


def test_missing_official_weights_name_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OVSEG_WEIGHTS", raising=False)
    img = SAMPLE / "camvid-sample" / "val" / "0016E5_07959.png"
    rc = main(["segment", str(img), "--classes", "sky; road", "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "b16_fullcc2.5b.pt" in err and "OVSEG_WEIGHTS" in err
    assert "No pretrained weights loaded" not in err
