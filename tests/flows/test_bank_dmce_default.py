"""A bank's default CLIPs (issue 22): without ``clips`` and ``models.clip``, the authors' pair (MetaCLIP ViT-L/14
main, DFN2B-CLIP ViT-B/16 for DMCE); a missing DFN2B file stops the plan before the store, naming the file."""

from __future__ import annotations

import shutil

import yaml

from flows.bank_graph import bank_models
from flows.cli import main
from flows.config import parse_experiment
from ovseg_core.backbones import WEIGHTS_ENV, official_weight_file
from tests.flows.conftest import SAMPLE

VOC = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
AUTHORS = ["clip:ViT-L-14-quickgelu@metaclip_fullcc", "clip:ViT-B-16@dfn2b"]


def _data(tmp_path, **models):
    folder = tmp_path / "bank-images"
    folder.mkdir(exist_ok=True)
    shutil.copy(VOC / "val_crop_0000.jpg", folder / "a.jpg")
    return {"name": "bank", "store": str(tmp_path / "store"), "regions": {"source": "slic"},
            "models": {"weights_dir": str(tmp_path / "weights"), **models},
            "banks": [{"name": "coco", "root": str(folder)}]}


def test_a_bank_without_clips_gets_the_authors_pair_unless_the_experiment_names_a_clip(tmp_path):
    exp = parse_experiment(_data(tmp_path), source="test")
    assert bank_models(exp, exp.banks[0])[0] == AUTHORS
    exp = parse_experiment(_data(tmp_path, clip="clip:tiny@random:0"), source="test")
    assert bank_models(exp, exp.banks[0])[0] == ["clip:tiny@random:0"]  # the tiny test configurations: one store
    data = _data(tmp_path)
    data["banks"][0] = {"name": "coco", "imported": {"values": ["coco_metaclip_l.pt"], "index": "coco_radiov3.faiss"}}
    exp = parse_experiment(data, source="test")
    assert bank_models(exp, exp.banks[0])[0] == AUTHORS[:1]  # one imported store: the main CLIP's


def test_a_missing_dfn2b_file_stops_the_bank_plan_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in (AUTHORS[0], "dino:vitb8", "vfm:radiov3_l"):  # every other file of the plan (identities read bytes)
        (weights / official_weight_file(name)[0]).write_bytes(b"stand-in")
    exp_file = tmp_path / "bank.yaml"
    exp_file.write_text(yaml.safe_dump(_data(tmp_path)))
    assert main(["run", str(exp_file), "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert f"'DFN2B-CLIP-ViT-B-16/open_clip_pytorch_model.bin' not found in weights directory '{weights}'" in err
    assert "https://huggingface.co/apple/DFN2B-CLIP-ViT-B-16/" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


def test_ovseg_backbones_lists_dfn2b_with_its_file(capsys):
    assert main(["backbones"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("clip:ViT-B-16@dfn2b ")]
    assert "DFN2B-CLIP-ViT-B-16/open_clip_pytorch_model.bin" in line and "huggingface.co/apple/DFN2B-CLIP-ViT-B-16" in line
