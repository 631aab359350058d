"""Ingestion of every sample layout, bad images, stable ids."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_core.datasets import class_lines, get_dataset
from ovseg_core.metrics import convert_labels
from storage.images import load_label
from storage.ingest import LAYOUTS, ManifestRow, image_id_for, ingest


def _check_pairs(rows: list[ManifestRow], n: int, dataset: str) -> None:
    """All rows ok, sorted, ids unique, GT values valid for the dataset after conversion."""
    assert len(rows) == n
    assert all(r.status == "ok" and r.error == "" for r in rows), [r.error for r in rows]
    assert [r.rel_path for r in rows] == sorted(r.rel_path for r in rows)
    assert len({r.image_id for r in rows}) == n
    spec = get_dataset(dataset)
    for r in rows:
        assert r.dataset == dataset
        assert Path(r.abs_path).is_file() and Path(r.gt_path).is_file()
        assert r.width > 0 and r.height > 0 and len(r.content_sha256) == 64
        gt = convert_labels(load_label(r.gt_path), spec.label_conversion, spec.ignore_index)
        assert gt.shape == (r.height, r.width)
        values = set(np.unique(gt).tolist()) - {spec.ignore_index}
        assert values and max(values) < spec.num_classes
    assert len(class_lines(dataset, "corrclip")) == spec.num_classes


def test_voc(sample_dir: Path) -> None:
    rows = ingest(sample_dir / "voc2012-sample", "voc")
    _check_pairs(rows, 14, "VOC21")
    r = rows[0]
    assert r.rel_path == "JPEGImages/val_crop_0000.jpg"
    assert r.gt_path.endswith("SegmentationClass/val_crop_0000.png")
    assert (r.width, r.height) == (513, 513)
    assert r.image_id.startswith("val_crop_0000-") and len(r.image_id) == len("val_crop_0000-") + 12
    _check_pairs(ingest(sample_dir / "voc2012-sample", "voc", dataset="VOC20"), 14, "VOC20")


def test_ade20k(sample_dir: Path) -> None:
    rows = ingest(sample_dir / "ade20k-sample", "ade20k")
    _check_pairs(rows, 3, "ADE20K")
    assert rows[0].rel_path == "images/validation/ADE_val_00000001.jpg"


def test_cityscapes(sample_dir: Path) -> None:
    rows = ingest(sample_dir / "cityscapes-sample", "cityscapes")
    _check_pairs(rows, 1, "Cityscapes")
    assert rows[0].gt_path.endswith("frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png")
    assert (rows[0].width, rows[0].height) == (256, 128)


def test_camvid(sample_dir: Path) -> None:
    rows = ingest(sample_dir / "camvid-sample", "camvid")
    _check_pairs(rows, 2, "CamVid")
    assert (rows[0].width, rows[0].height) == (480, 360)


@pytest.mark.shared_data
def test_camvid_shared(shared_data_dir: Path) -> None:
    rows = ingest(shared_data_dir / "camvid-sample", "camvid")
    _check_pairs(rows, 101, "CamVid")


def test_folder_with_gt(sample_dir: Path, tmp_path: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "gts" / "sub").mkdir(parents=True)
    shutil.copy(voc / "JPEGImages" / "val_crop_0001.jpg", tmp_path / "imgs" / "a.jpg")
    shutil.copy(voc / "JPEGImages" / "val_crop_0008.jpg", tmp_path / "imgs" / "sub" / "b.JPG")
    shutil.copy(voc / "SegmentationClass" / "val_crop_0001.png", tmp_path / "gts" / "a.png")
    shutil.copy(voc / "SegmentationClass" / "val_crop_0008.png", tmp_path / "gts" / "sub" / "b.png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    (tmp_path / "imgs" / ".hidden").mkdir()
    shutil.copy(voc / "JPEGImages" / "val_crop_0020.jpg", tmp_path / "imgs" / ".hidden" / "c.jpg")
    rows = ingest(tmp_path / "imgs", "folder", gt_dir=tmp_path / "gts")
    assert [r.rel_path for r in rows] == ["a.jpg", "sub/b.JPG"]
    assert all(r.status == "ok" for r in rows) and rows[0].dataset == "custom"
    assert rows[1].gt_path == str((tmp_path / "gts" / "sub" / "b.png").resolve())
    # without gt_dir: no ground truth; a gt_dir inside the root is not listed as images
    shutil.move(tmp_path / "gts", tmp_path / "imgs" / "gts")
    rows2 = ingest(tmp_path / "imgs", "folder", dataset="mine", gt_dir=tmp_path / "imgs" / "gts")
    assert [r.rel_path for r in rows2] == ["a.jpg", "sub/b.JPG"] and rows2[0].dataset == "mine"
    rows3 = ingest(tmp_path / "imgs", "folder")
    assert len(rows3) == 4 and all(r.gt_path == "" for r in rows3)


def test_pascal_context_layout(sample_dir: Path, tmp_path: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    base = tmp_path / "VOCdevkit" / "VOC2010"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "SegmentationClassContext").mkdir()
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    ids = ["val_crop_0000", "val_crop_0001", "val_crop_0008"]
    for i in ids:
        shutil.copy(voc / "JPEGImages" / f"{i}.jpg", base / "JPEGImages")
        gt = load_label(voc / "SegmentationClass" / f"{i}.png")
        Image.fromarray(np.where(gt == 255, 0, gt).astype(np.uint8), mode="L").save(
            base / "SegmentationClassContext" / f"{i}.png"
        )
    shutil.copy(voc / "JPEGImages" / "val_crop_0020.jpg", base / "JPEGImages")  # not in the split list
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(ids) + "\n")
    _check_pairs(ingest(tmp_path, "pascal_context"), 3, "PC60")
    _check_pairs(ingest(base, "pascal_context", dataset="pc59"), 3, "PC59")


@pytest.mark.parametrize("layout, dataset", [("coco_stuff", "COCO-Stuff"), ("coco_object", "COCO-Object")])
def test_coco_layout(sample_dir: Path, tmp_path: Path, layout: str, dataset: str) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    base = tmp_path / "coco_stuff164k"
    (base / "images" / "val2017").mkdir(parents=True)
    (base / "annotations" / "val2017").mkdir(parents=True)
    for k, i in enumerate(["val_crop_0000", "val_crop_0001"]):
        stem = f"0000000{k:05d}"
        shutil.copy(voc / "JPEGImages" / f"{i}.jpg", base / "images" / "val2017" / f"{stem}.jpg")
        gt = base / "annotations" / "val2017" / f"{stem}_labelTrainIds.png"
        shutil.copy(voc / "SegmentationClass" / f"{i}.png", gt)
    rows = ingest(tmp_path, layout)
    _check_pairs(rows, 2, dataset)
    assert rows[0].gt_path.endswith("annotations/val2017/000000000000_labelTrainIds.png")


def test_bad_images_reported_and_others_ingested(sample_dir: Path, tmp_path: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(voc / "JPEGImages" / "val_crop_0000.jpg", d / "good.jpg")
    (d / "zero.jpg").write_bytes(b"")
    data = (voc / "JPEGImages" / "val_crop_0001.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "text.jpg").write_text("hello, I am not a JPEG\n")
    rgb = np.asarray(Image.open(voc / "JPEGImages" / "val_crop_0008.jpg"))
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "sixteen.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(rgb).convert("L").save(d / "grey.png")
    rows = {Path(r.rel_path).stem: r for r in ingest(d, "folder")}
    assert set(rows) == {"good", "zero", "truncated", "text", "cmyk", "sixteen", "palette", "grey"}
    for name in ("good", "cmyk", "sixteen", "palette", "grey"):
        assert rows[name].status == "ok", rows[name].error
        assert (rows[name].width, rows[name].height) == (513, 513)
    assert "zero-byte" in rows["zero"].error
    assert "truncated or corrupt" in rows["truncated"].error
    assert "not a recognised image format" in rows["text"].error
    for name in ("zero", "truncated", "text"):
        r = rows[name]
        assert r.status == "error" and (r.width, r.height) == (0, 0) and r.image_id.startswith(name + "-")


def test_missing_gt_and_size_mismatch(sample_dir: Path, tmp_path: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    (tmp_path / "i").mkdir()
    (tmp_path / "g").mkdir()
    shutil.copy(voc / "JPEGImages" / "val_crop_0000.jpg", tmp_path / "i" / "a.jpg")
    shutil.copy(voc / "JPEGImages" / "val_crop_0001.jpg", tmp_path / "i" / "b.jpg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "g" / "b.png")
    rows = ingest(tmp_path / "i", "folder", gt_dir=tmp_path / "g")
    assert rows[0].status == "error" and "ground truth missing" in rows[0].error
    assert rows[1].status == "error" and "same size" in rows[1].error


def test_stable_ids_across_runs_and_roots(sample_dir: Path, tmp_path: Path) -> None:
    a = ingest(sample_dir / "voc2012-sample", "voc")
    shutil.copytree(sample_dir / "voc2012-sample", tmp_path / "copy")
    b = ingest(tmp_path / "copy" / "VOCdevkit", "voc")  # root one level deeper, another location
    c = ingest(tmp_path / "copy" / "VOCdevkit" / "VOC2012", "voc")
    assert [r.image_id for r in a] == [r.image_id for r in b] == [r.image_id for r in c]
    assert [r.abs_path for r in a] != [r.abs_path for r in b]
    assert a == ingest(sample_dir / "voc2012-sample", "voc")
    # the id depends on content and relative path
    assert image_id_for("0" * 64, "x/a b.jpg") == image_id_for("0" * 64, "x/a b.jpg")
    assert image_id_for("0" * 64, "x/a b.jpg") != image_id_for("1" * 64, "x/a b.jpg")
    assert image_id_for("0" * 64, "x/a b.jpg").startswith("a_b-")


def test_manifest_row_matches_table_schema() -> None:
    from storage.tables import MANIFEST_SCHEMA

    assert [f.name for f in dataclasses.fields(ManifestRow)] == MANIFEST_SCHEMA.names


def test_bad_arguments(sample_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid layouts: folder, voc"):
        ingest(sample_dir, "pascal")
    with pytest.raises(ValueError, match="feeds datasets"):
        ingest(sample_dir / "voc2012-sample", "voc", dataset="ADE20K")
    with pytest.raises(ValueError, match="gt_dir only applies"):
        ingest(sample_dir / "voc2012-sample", "voc", gt_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        ingest(tmp_path, "voc")
    with pytest.raises(FileNotFoundError, match="split list .*test.txt"):
        ingest(sample_dir / "voc2012-sample", "voc", split="test")
    with pytest.raises(FileNotFoundError, match="training"):
        ingest(sample_dir / "ade20k-sample", "ade20k", split="train")
    with pytest.raises(FileNotFoundError, match="expected the directory"):
        ingest(tmp_path / "nope", "folder")
    assert "camvid" in LAYOUTS and len(LAYOUTS) == 8


def test_progress_bar(sample_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ingest(sample_dir / "camvid-sample", "camvid", progress=True)
    assert "ingest CamVid" in capsys.readouterr().err


def test_ingest_files_single_image(sample_dir):
    from storage.ingest import ingest_files

    img = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "val_crop_0000.jpg"
    (row,) = ingest_files([img], dataset="segment")
    assert row.status == "ok" and row.gt_path == "" and row.rel_path == "val_crop_0000.jpg"
    assert row.width == 513 and row.height == 513
    with pytest.raises(FileNotFoundError, match="not found"):
        ingest_files([img.with_name("nope.jpg")])


def test_reingest_reuses_unchanged_rows_without_reading(tmp_path, sample_dir, monkeypatch):
    import os

    import storage.ingest as ingest_mod

    root = tmp_path / "camvid"
    shutil.copytree(sample_dir / "camvid-sample", root)
    first = ingest(root, "camvid")
    assert all(r.file_stat for r in first)

    def no_reading(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(ingest_mod, "load_rgb", no_reading)
    assert ingest(root, "camvid", previous=first) == first
    changed = root / "val" / first[0].rel_path.split("/")[-1]
    os.utime(changed, ns=(1, 1))  # a changed file is read again
    with pytest.raises(AssertionError, match="decoded again"):
        ingest(root, "camvid", previous=first)
