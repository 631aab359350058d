"""SAM 2 (random-init tiny) and pre-generated mask files as CorrCLIP's region source, end to end from the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from flows.graph import build_plan
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect
CORRCLIP = [{"name": "corrclip", "method": "corrclip"}]


def _yaml(exp, path):
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return path


def _sam_node(exp):
    return next(n for n in build_plan(exp)[0].nodes.values() if n.stage == "sam_masks")


def test_sam2_regions_from_the_cli(tmp_path, capsys):
    exp = tiny_experiment(tmp_path / "store", methods=CORRCLIP, regions={"source": "sam2", "params": {"points_per_side": 4}},
                          models={"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam2": "sam2:tiny@random:0"})
    assert main(["run", str(_yaml(exp, tmp_path / "exp.yaml")), "-q"]) == 0
    assert "random-weight" in capsys.readouterr().out
    node = _sam_node(exp)
    assert node.params.source == "sam2" and node.random_weights
    st = Store(tmp_path / "store")
    ids = sorted(st.complete_items(node.stage, node.key))
    rm = st.read_item(node.stage, node.key, ids[0])
    assert rm["ids"].shape == (513, 513) and rm["ids"].dtype == np.int32


def test_pregenerated_mask_files_from_the_cli(tmp_path, capsys):
    voc = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    masks = tmp_path / "masks"
    masks.mkdir()
    stems = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))[:2]
    for i, stem in enumerate(stems):  # the reference's format: instance_mask, smallest id = unsegmented
        gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{stem}.png")).astype(np.int64)
        np.savez(masks / f"{stem}.npz", instance_mask=np.where(gt == 255, 0, gt + 7))
    exp = tiny_experiment(tmp_path / "store", methods=CORRCLIP,
                          regions={"source": "files", "params": {"dir": str(masks), "pattern": "{stem}.npz"}})
    exp_file = _yaml(exp, tmp_path / "exp.yaml")
    assert main(["run", str(exp_file), "-q"]) == 0
    node = _sam_node(exp)
    st = Store(tmp_path / "store")
    rows = {r["rel_path"].split("/")[-1][:-4]: r["image_id"] for r in read_table(st, "manifests", ["voc"]).to_pylist()}
    ids = st.read_item(node.stage, node.key, rows[stems[0]])["ids"]
    gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{stems[0]}.png")).astype(np.int64)
    raw = np.where(gt == 255, 0, gt + 7)
    values = np.unique(raw)
    np.testing.assert_array_equal(ids, np.searchsorted(values, raw))  # monotone relabel: smallest -> 0
    # an edited mask changes the key: everything downstream of the regions is recomputed
    np.savez(masks / f"{stems[1]}.npz", instance_mask=np.zeros_like(raw))
    edited = tiny_experiment(tmp_path / "store", methods=CORRCLIP,
                             regions={"source": "files", "params": {"dir": str(masks), "pattern": "{stem}.npz"}})
    assert _sam_node(edited).key != node.key
    # a missing mask is that image's error, the other image goes on
    (masks / f"{stems[0]}.npz").unlink()
    capsys.readouterr()
    assert main(["run", str(_yaml(edited, tmp_path / "exp2.yaml")), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"no region mask for image {stems[0]!r}" in out and "regions.params.dir" in out
    assert len(Store(tmp_path / "store").complete_items("sam_masks", _sam_node(edited).key)) == 1


def test_mask_folder_is_relative_to_the_experiment_file(tmp_path):
    from flows.config import load_experiment

    (tmp_path / "cfg" / "masks").mkdir(parents=True)
    raw = tiny_experiment(tmp_path / "store", methods=CORRCLIP).model_dump(mode="json")
    raw["regions"] = {"source": "files", "params": {"dir": "masks"}}
    path = tmp_path / "cfg" / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    exp = load_experiment(path)
    assert exp.regions.params["dir"] == str(tmp_path / "cfg" / "masks")
    assert _sam_node(exp).inputs_dir == str(tmp_path / "cfg" / "masks")
    shutil.rmtree(tmp_path / "cfg" / "masks")
    with pytest.raises(FileNotFoundError, match="mask folder"):
        build_plan(exp)
