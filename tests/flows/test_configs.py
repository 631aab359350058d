"""Every experiment file in configs/ validates and resolves into a stage graph; the reference covers every key."""

from __future__ import annotations

from pathlib import Path

from typing import get_args

import pytest
from pydantic import BaseModel

from flows.bank_graph import BANK_DATASET_PREFIX
from flows.config import DatasetEntry, Experiment, load_experiment
from flows.graph import build_plan
from ovseg_core.features.text import TEMPLATE_SETS

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
OFFICIAL = ["b16_fullcc2.5b.pt", "ViT-B-16.pt", "dino_vitbase8_pretrain.pth", "sam_vit_b_01ec64.pth",
            "l14_fullcc2.5b.pt", "c-radio-v3_l_half.pth.tar"]
BENCHMARKS = ("voc21", "voc20", "pc60", "pc59", "coco-object", "coco-stuff", "ade20k", "cityscapes")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OFFICIAL:  # placeholder files: identities are computed from the files, nothing is loaded
        (tmp_path / name).write_bytes(name.encode())
    monkeypatch.setenv("OVSEG_WEIGHTS", str(tmp_path))
    exp = load_experiment(path)
    missing: list[str] = []
    plans = build_plan(exp, missing)
    # nothing but the pre-generated mask folders (the CorrCLIPv2 configs' EntitySeg masks) may be absent here
    assert all(m.startswith("regions: regions.params.dir: mask folder") for m in missing), missing
    evaluated = [p for p in plans if not p.dataset.name.startswith(BANK_DATASET_PREFIX)]  # a bank's plan has no method
    assert evaluated and all(p.methods for p in evaluated)
    stages = {n.stage for p in plans for n in p.nodes.values()}
    assert {"text_embeddings", "clip_layers", "reconstruction", "scoring"} <= stages


def test_every_benchmark_has_both_methods() -> None:
    names = {p.stem for p in CONFIGS}
    for ds in (*BENCHMARKS, "camvid"):
        assert {f"{ds}-corrclip", f"{ds}-scclip"} <= names


def test_every_corrclipv2_benchmark_has_its_config_at_the_authors_settings(tmp_path, monkeypatch) -> None:
    """The ten benchmarks of CorrCLIPv2's README, each at the settings of ``CorrCLIPv2/configs/cfg_*.py``
    (corrclipv2.md section 1 table, written out here), with the authors' backbones and their EntitySeg masks."""
    expected = {  # spec, short side, crop, stride, prob_thd, mask folder
        "voc21": ("VOC21", 336, 336, 112, 0.2, "voc"), "voc20": ("VOC20", 336, 336, 112, None, "voc"),
        "pc60": ("PC60", 336, 336, 112, 0.15, "context"), "pc59": ("PC59", 336, 336, 112, None, "context"),
        "coco-object": ("COCO-Object", 336, 336, 112, 0.25, "coco"),
        "coco-stuff": ("COCO-Stuff", 336, 336, 112, None, "coco"), "ade20k": ("ADE20K", 448, 336, 112, None, "ade"),
        "cityscapes": ("Cityscapes", 784, 224, 112, None, "city"), "ade847": ("ADE847", 448, 336, 112, None, "ade847"),
        "pc459": ("PC459", 336, 336, 112, None, "context")}
    for name in OFFICIAL:
        (tmp_path / name).write_bytes(name.encode())
    monkeypatch.setenv("OVSEG_WEIGHTS", str(tmp_path))
    for stem, (spec, short, crop, stride, thd, masks) in expected.items():
        exp = load_experiment(CONFIGS_DIR / f"{stem}-corrclipv2.yaml")
        assert [d.spec for d in exp.datasets] == [spec] and [m.method for m in exp.methods] == ["corrclipv2"]
        assert (exp.regions.source, Path(exp.regions.params["dir"]).name) == ("files", masks)
        (plan,) = build_plan(exp, [])
        rec = plan.methods[0].prediction.upstream["reconstruction"].params
        assert (rec.window.short_side, rec.window.crop, rec.window.stride, rec.window.pad_multiple) == (
            short, crop, stride, 56), stem
        assert (rec.prob_thd, rec.logit_scale, rec.backbone) == (thd, 40.0, "clip:ViT-L-14-quickgelu@metaclip_fullcc")
        vfm = next(n for n in plan.nodes.values() if n.stage == "vfm_features")
        assert (vfm.params.backbone, vfm.params.max_side) == ("vfm:radiov3_l", None)


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """``model`` and every pydantic model nested in its fields."""
    found = [model]
    for field in model.model_fields.values():
        for t in (field.annotation, *get_args(field.annotation)):
            if isinstance(t, type) and issubclass(t, BaseModel) and t not in found:
                found += [m for m in _models(t) if m not in found]
    return found


def test_reference_documents_every_key() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "experiment-files.md").read_text()
    for model in _models(Experiment):
        for key in model.model_fields:
            assert f"`{key}`" in doc, f"{model.__name__}.{key} is missing from docs/experiment-files.md"
    for key in ("extends", "_delete_", "short_side", "crop", "stride"):
        assert f"`{key}`" in doc


def test_choices_match_the_registries() -> None:
    def choices(model: type[BaseModel], key: str) -> tuple:
        return get_args(model.model_fields[key].annotation)

    from storage.layouts import LAYOUT_NAMES

    assert choices(DatasetEntry, "layout") == LAYOUT_NAMES  # the experiment file offers exactly what ingest reads
    assert set(choices(Experiment, "text_templates")) == set(TEMPLATE_SETS)


def test_extending_a_shipped_config(tmp_path: Path) -> None:
    base = CONFIGS_DIR / "voc21-corrclip.yaml"
    child = tmp_path / "my-tau3.yaml"
    child.write_text(f"extends: {base}\nname: voc21-tau3\nmethods:\n  - {{name: tau3, method: corrclip, params: {{tau: 3.0}}}}\n")
    parent, exp = load_experiment(base), load_experiment(child, overrides=["datasets.0.limit=2"])
    assert exp.name == "voc21-tau3" and [m.name for m in exp.methods] == ["tau3"]
    assert exp.models == parent.models
    assert exp.datasets[0].root == parent.datasets[0].root  # written in the base: resolved against configs/
    assert exp.datasets[0].limit == 2
    assert exp.provenance.files == (str(child.resolve()), str(base.resolve()))
