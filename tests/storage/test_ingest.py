"""Ingestion of every sample layout, bad images, stable ids."""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ovseg_core.datasets import class_lines, get_dataset
from ovseg_core.metrics import convert_labels
from storage.images import load_label, load_rgb
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
    assert "camvid" in LAYOUTS and len(LAYOUTS) == 10  # folder, 7 MMSegmentation layouts, ade847, pc459


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(sample_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    ingest(sample_dir / "camvid-sample", "camvid", progress=True)
    assert "ingest CamVid" in terminal.getvalue()
    monkeypatch.undo()
    ingest(sample_dir / "camvid-sample", "camvid", progress=True)  # a redirected log: no carriage-return bar lines
    assert "\r" not in capsys.readouterr().err


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

    def no_reading(path, *args, **kwargs):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(ingest_mod, "load_rgb", no_reading)
    assert ingest(root, "camvid", previous=first) == first
    changed = root / "val" / first[0].rel_path.split("/")[-1]
    os.utime(changed, ns=(1, 1))  # a changed file is read again
    with pytest.raises(AssertionError, match="decoded again"):
        ingest(root, "camvid", previous=first)


def _blank_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit grey PNG of zeros, compressed 1000 rows at a time (no full array in memory)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    rows = (b"\0" * (1 + (width + 7) // 8)) * 1000  # filter byte + packed bits per row
    idat = b"".join(comp.compress(rows) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _voc_jpg(sample_dir: Path, i: int = 0) -> Path:
    return sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"val_crop_{i:04d}.jpg"


def test_image_over_the_pixel_limit_is_one_error_row(sample_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(_voc_jpg(sample_dir), d / "good.jpg")
    _blank_png(d / "huge.png", 30000, 30000)
    assert (d / "huge.png").stat().st_size < 200_000  # the issue's ~109 KB decompression bomb
    with pytest.raises(Image.DecompressionBombError):  # Pillow alone refuses it by raising
        Image.open(d / "huge.png")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    rows = {r.rel_path: r for r in ingest(d, "folder")}
    assert Image.MAX_IMAGE_PIXELS == pillow_limit == 1024**3 // 4 // 3  # Pillow's own default, untouched
    assert rows["good.jpg"].status == "ok" and (rows["good.jpg"].width, rows["good.jpg"].height) == (513, 513)
    bad = rows["huge.png"]
    assert bad.status == "error" and (bad.width, bad.height) == (0, 0)
    for part in (str(d / "huge.png"), "30000x30000", "900,000,000 pixels", "max_pixels=67,108,864",
                 "raise max_pixels in the dataset entry to at least 900000000", "downscale the image"):
        assert part in bad.error, (part, bad.error)
    # a limit below the good image's 513 x 513 = 263,169 pixels refuses it too
    small = {r.rel_path: r for r in ingest(d, "folder", max_pixels=263_168)}
    assert small["good.jpg"].status == "error" and "263,169 pixels" in small["good.jpg"].error
    assert ingest(d, "folder", max_pixels=263_169)[0].status == "ok"
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        ingest(d, "folder", max_pixels=0)


def test_raised_limit_decodes_images_over_pillows_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2000 pixels
    a = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    (tmp_path / "d").mkdir()
    Image.fromarray(a).save(tmp_path / "d" / "x.png")
    (row,) = ingest(tmp_path / "d", "folder", max_pixels=6000)
    assert row.status == "ok" and (row.width, row.height) == (100, 60)
    (row,) = ingest(tmp_path / "d", "folder", max_pixels=5999)
    assert row.status == "error" and "100x60 = 6,000 pixels" in row.error
    assert Image.MAX_IMAGE_PIXELS == 1000


def _bmp_header_only(path: Path, width: int, height: int) -> None:
    """A 24-bit BMP whose header claims width x height, followed by 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16)


def test_any_decoder_error_is_that_files_error_row(sample_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(_voc_jpg(sample_dir), d / "good.jpg")
    _bmp_header_only(d / "vast.bmp", 1 << 30, 1 << 30)  # Pillow cannot even allocate it: MemoryError
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (1 << 21), zip=True)  # inflates past Pillow's text-chunk limit: ValueError
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "text_bomb.png", pnginfo=info)
    rows = {r.rel_path: r for r in ingest(d, "folder", max_pixels=None)}
    assert rows["good.jpg"].status == "ok"
    assert rows["vast.bmp"].status == "error" and "out of memory decoding a 1073741824x1073741824 image" in \
        rows["vast.bmp"].error and str(d / "vast.bmp") in rows["vast.bmp"].error
    assert rows["text_bomb.png"].status == "error" and "cannot decode (ValueError: Decompressed data too large" in \
        rows["text_bomb.png"].error
    assert Image.MAX_IMAGE_PIXELS == 1024**3 // 4 // 3


def test_unusable_files_get_error_rows(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8), mode="L").convert("P") for v in (0, 255)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    rgb[0].save(d / "anim.png", save_all=True, append_images=rgb[1:])  # APNG
    still = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    still.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    still.save(d / "still.gif")
    rgb[0].save(d / "pages.tif", save_all=True, append_images=rgb[1:])  # multi-page TIFF: first page
    (d / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    (d / "photo.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    (d / "notes.txt").write_text("not an image")
    rows = {r.rel_path: r for r in ingest(d, "folder")}
    assert set(rows) == {"anim.gif", "anim.png", "still.gif", "pages.tif", "logo.svg", "photo.HEIC"}
    assert rows["anim.gif"].status == "error" and "animated GIF" in rows["anim.gif"].error
    assert "save the frame you want as PNG" in rows["anim.gif"].error
    assert rows["anim.png"].status == "error" and "animated PNG" in rows["anim.png"].error
    assert rows["still.gif"].status == "ok" and (rows["still.gif"].width, rows["still.gif"].height) == (2, 2)
    np.testing.assert_array_equal(load_rgb(d / "still.gif")[0], [[255, 0, 0], [0, 0, 255]])
    assert rows["pages.tif"].status == "ok"
    assert load_rgb(d / "pages.tif")[0, 0].tolist() == [10, 10, 10]
    assert rows["logo.svg"].status == "error" and "rasterise it to PNG" in rows["logo.svg"].error
    assert rows["photo.HEIC"].status == "error" and "HEIC" in rows["photo.HEIC"].error
    for r in rows.values():
        assert r.error.startswith(r.abs_path) or r.status == "ok"


def test_links_leaving_the_root_are_refused_unless_followed(sample_dir: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(_voc_jpg(sample_dir, 0), root / "inner.jpg")
    shutil.copy(_voc_jpg(sample_dir, 1), root / "sub" / "b.jpg")
    shutil.copy(_voc_jpg(sample_dir, 8), outside / "x.jpg")
    (root / "alias.jpg").symlink_to(root / "inner.jpg")  # link inside the root: fine
    (root / "subalias").symlink_to(root / "sub")  # linked folder inside the root: files listed once, at sub/
    (root / "link.jpg").symlink_to(outside / "x.jpg")
    (root / "linkdir").symlink_to(outside)
    (outside / "loop").symlink_to(outside)  # a cycle once followed
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    rows = {r.rel_path: r for r in ingest(root, "folder")}
    assert set(rows) == {"alias.jpg", "inner.jpg", "sub/b.jpg", "link.jpg", "linkdir", "broken.jpg"}
    assert all(rows[k].status == "ok" for k in ("alias.jpg", "inner.jpg", "sub/b.jpg"))
    for k in ("link.jpg", "linkdir"):
        r = rows[k]
        assert r.status == "error" and r.content_sha256 == "" and "outside the dataset root" in r.error, r.error
        assert str(outside.resolve()) in r.error and "follow_symlinks: true" in r.error
    assert rows["broken.jpg"].status == "error" and "broken symbolic link" in rows["broken.jpg"].error
    assert "2 files or folders lie outside the dataset root" in caplog.text and "follow_symlinks: true" in caplog.text
    followed = {r.rel_path: r for r in ingest(root, "folder", follow_symlinks=True)}
    assert set(followed) == {"alias.jpg", "inner.jpg", "sub/b.jpg", "link.jpg", "linkdir/x.jpg", "broken.jpg"}
    assert followed["link.jpg"].status == followed["linkdir/x.jpg"].status == "ok"
    assert followed["link.jpg"].abs_path == str((outside / "x.jpg").resolve())
    for k in ("alias.jpg", "inner.jpg", "sub/b.jpg"):  # ids do not depend on the option
        assert followed[k].image_id == rows[k].image_id


def test_split_entries_leaving_the_root_are_refused_unless_followed(sample_dir: Path, tmp_path: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    root = tmp_path / "root"
    base = root / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc, base)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("evil", "abs"):
        shutil.copy(voc / "JPEGImages" / "val_crop_0000.jpg", outside / f"{name}.jpg")
        shutil.copy(voc / "SegmentationClass" / "val_crop_0000.png", outside / f"{name}.png")
    split = base / "ImageSets" / "Segmentation" / "val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join([*ids, "../../../../outside/evil", str(outside / "abs")]) + "\n")
    reference = {r.rel_path: r.image_id for r in ingest(sample_dir / "voc2012-sample", "voc")}
    rows = {r.rel_path: r for r in ingest(root, "voc")}
    assert len(rows) == len(ids) + 2
    dotdot, absolute = rows["JPEGImages/../../../../outside/evil.jpg"], rows[f"{outside}/abs.jpg"]
    for r in (dotdot, absolute):
        assert r.status == "error" and "outside the dataset root" in r.error and "follow_symlinks" in r.error
    assert {k: r.image_id for k, r in rows.items() if r.status == "ok"} == reference  # ids unchanged
    followed = {r.rel_path: r for r in ingest(root, "voc", follow_symlinks=True)}
    assert all(r.status == "ok" for r in followed.values()), [r.error for r in followed.values()]
    assert followed[f"{outside}/abs.jpg"].gt_path == str((outside / "abs.png").resolve())


def test_reingest_checks_reused_rows_against_the_limit(sample_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    shutil.copy(_voc_jpg(sample_dir), tmp_path / "d" / "a.jpg")
    first = ingest(tmp_path / "d", "folder")
    again = ingest(tmp_path / "d", "folder", previous=first, max_pixels=1000)
    assert first[0].status == "ok" and again[0].status == "error" and "max_pixels=1,000" in again[0].error



def test_a_folder_turned_into_an_outside_link_between_ingests_is_refused(sample_dir: Path, tmp_path: Path) -> None:
    """Folders' real paths are cached within one ingest only: the next ingest in the same process sees a new link."""
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    root, outside = tmp_path / "root", tmp_path / "outside"
    base = root / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc, base)
    first = ingest(root, "voc")
    assert first and all(r.status == "ok" for r in first)
    outside.mkdir()
    (base / "JPEGImages").rename(outside / "JPEGImages")
    (base / "JPEGImages").symlink_to(outside / "JPEGImages")
    again = ingest(root, "voc", previous=first)
    assert len(again) == len(first)
    assert all(r.status == "error" and "outside the dataset root" in r.error for r in again), again[0]


def test_a_symlink_loop_is_that_entrys_error_row(sample_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(_voc_jpg(sample_dir, 0), root / "good.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")  # ELOOP on every stat that follows links
    (root / "a.png").symlink_to(root / "b.png")
    (root / "b.png").symlink_to(root / "a.png")
    (root / "loopdir").symlink_to(root / "loopdir")
    (root / "notes.txt").symlink_to(root / "notes.txt")  # not image-like: not listed
    rows = {r.rel_path: r for r in ingest(root, "folder")}
    assert set(rows) == {"good.jpg", "self.jpg", "a.png", "b.png", "loopdir"}
    assert rows["good.jpg"].status == "ok"
    for k in ("self.jpg", "a.png", "b.png", "loopdir"):
        assert rows[k].status == "error" and "symbolic links" in rows[k].error, rows[k].error
        assert rows[k].error.startswith(str(root / k)) and "fix or remove this link" in rows[k].error
