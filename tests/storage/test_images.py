"""Image decoding: every mode normalised to (H, W, 3) uint8; bad files raise ImageError."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTooLargeError,
    check_max_pixels,
    content_hash,
    load_label,
    load_rgb,
)


def _rgb(h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_rgb(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


def test_palette_expanded_to_colours(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[1, 0], [70, 80, 90])
    np.testing.assert_array_equal(out[0, 1], [40, 50, 60])
    # as a label the same file gives the indices, not colours
    np.testing.assert_array_equal(load_label(tmp_path / "p.png"), idx)


def test_grey_alpha_cmyk(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    out = load_rgb(tmp_path / "l.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 2], grey)

    rgba = np.concatenate([_rgb(3, 4), np.zeros((3, 4, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), rgba[..., :3])  # alpha dropped, not composited

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_rgb(tmp_path / "c.jpg")
    assert out.shape == (8, 8, 3) and np.abs(out.astype(int) - 200).max() <= 3


def test_sixteen_bit_scaled(tmp_path: Path) -> None:
    a = np.array([[0, 257, 65535], [32896, 128, 65280]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").mode.startswith("I")
    out = load_rgb(tmp_path / "s.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255], [128, 0, 254]])
    # a 16-bit label keeps its values
    lab = load_label(tmp_path / "s.png")
    assert lab.dtype in (np.uint16, np.int32) and lab[0, 2] == 65535
    np.testing.assert_array_equal(lab, a)


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate"])
@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])
def test_sixteen_bit_tif_labels_are_exact(tmp_path: Path, compression: str | None, byte_order: str) -> None:
    # CAT-Seg's ADE-847 / PC-459 labels: uint16 TIFF, classes 0..846 / 0..458, unlabelled 65535
    a = np.array([[0, 255, 846, 65535], [458, 256, 65534, 1]], dtype=np.uint16)
    kwargs = {"compression": compression} if compression else {}
    Image.fromarray(a.astype(byte_order)).save(tmp_path / "l.tif", "TIFF", **kwargs)
    assert Image.open(tmp_path / "l.tif").mode.startswith("I;16")
    lab = load_label(tmp_path / "l.tif")
    assert lab.dtype == np.uint16 and lab.dtype.isnative
    np.testing.assert_array_equal(lab, a)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="zero-byte"):
        load_rgb(tmp_path / "zero.jpg")
    (tmp_path / "text.jpg").write_text("not an image\n")
    with pytest.raises(ImageError, match="text.jpg: not a recognised image"):
        load_rgb(tmp_path / "text.jpg")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_rgb(tmp_path / "trunc.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_rgb(tmp_path / "missing.png")
    Image.fromarray(np.zeros((2, 2), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point"):
        load_rgb(tmp_path / "f.tif")
    assert issubclass(ImageError, ValueError)


def test_rgb_label_rejected(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "colour.png")
    with pytest.raises(ImageError, match="colour map"):
        load_label(tmp_path / "colour.png")


def test_content_hash(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB chunk
    (tmp_path / "b.bin").write_bytes(data)
    assert content_hash(tmp_path / "b.bin") == hashlib.sha256(data).hexdigest()


def test_sample_labels_are_indices(sample_dir: Path) -> None:
    voc = sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    lab = load_label(voc / "SegmentationClass" / "val_crop_0000.png")
    img = load_rgb(voc / "JPEGImages" / "val_crop_0000.jpg")
    assert lab.shape == img.shape[:2] == (513, 513)
    values = set(np.unique(lab).tolist())
    assert values <= set(range(21)) | {255} and len(values - {0, 255}) >= 1


def test_pixel_limit_checked_from_the_header(tmp_path: Path) -> None:
    Image.fromarray(_rgb(30, 40)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((30, 40), np.uint8), mode="L").save(tmp_path / "gt.png")
    assert load_rgb(tmp_path / "x.png", max_pixels=1200).shape == (30, 40, 3)
    assert load_rgb(tmp_path / "x.png", max_pixels=None).shape == (30, 40, 3)
    with pytest.raises(ImageTooLargeError, match=r"x.png: image is 40x30 = 1,200 pixels, over the limit max_pixels=1,199") as e:
        load_rgb(tmp_path / "x.png", max_pixels=1199)
    assert (e.value.width, e.value.height, e.value.max_pixels) == (40, 30, 1199) and isinstance(e.value, ImageError)
    with pytest.raises(ImageTooLargeError, match="gt.png"):
        load_label(tmp_path / "gt.png", max_pixels=100)
    for bad in (0, -5, 1.5, True, "1000"):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            check_max_pixels(bad)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


def test_pillow_limit_restored_under_concurrent_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads decoding images over and under Pillow's limit all succeed; the global is restored."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64x64 = 4096 > 2 * 500: Pillow alone would raise
    big, small = _rgb(64, 64), _rgb(8, 8)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(small).save(tmp_path / "small.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")
    jobs = [tmp_path / ("big.png" if i % 2 else "small.png") for i in range(1000)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave save / restore
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            out = list(pool.map(lambda p: load_rgb(p, max_pixels=10_000), jobs))
    finally:
        sys.setswitchinterval(interval)
    for p, a in zip(jobs, out):
        np.testing.assert_array_equal(a, big if p.name == "big.png" else small)
    assert Image.MAX_IMAGE_PIXELS == 500


def test_importing_leaves_pillow_alone() -> None:
    code = "import PIL.Image as I; import storage.images, storage.ingest; print(I.MAX_IMAGE_PIXELS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == str(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default
