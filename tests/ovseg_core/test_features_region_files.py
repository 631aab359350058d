"""Tests for ovseg_core.features.region_files: pre-generated masks (.npz / PNG) as region maps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_core.features.region_files import RegionFileConfig, decode_label_map, regions_from_label_map
from storage.keys import to_jsonable

VOC_SEG = Path("voc2012-sample/VOCdevkit/VOC2012/SegmentationClass")


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def assert_monotone_dense(raw: np.ndarray, ids: np.ndarray) -> None:
    """ids are a dense 0..Z relabelling of raw that keeps every order relation (smallest -> 0)."""
    order = np.argsort(raw.ravel(), kind="stable")
    assert np.all(np.diff(ids.ravel()[order]) >= 0)  # never decreases where raw increases
    assert np.array_equal(np.diff(raw.ravel()[order]) == 0, np.diff(ids.ravel()[order]) == 0)  # equal iff equal
    assert np.array_equal(np.unique(ids), np.arange(ids.max() + 1))  # dense, starting at 0


def test_reference_npz_with_unsegmented_zero() -> None:
    # A reference-style map: 0 = unsegmented, ids 1..4 painted by ascending area, id 2 fully overwritten.
    raw = np.array([[0, 0, 1, 1], [3, 3, 4, 4], [3, 3, 4, 4], [0, 4, 4, 4]], dtype=np.int64)
    labels = decode_label_map(npz_bytes(instance_mask=raw), RegionFileConfig())
    regions = regions_from_label_map(labels, (4, 4))
    expected = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3], [0, 3, 3, 3]], dtype=np.int32)  # 3 -> 2, 4 -> 3
    assert np.array_equal(regions.ids, expected) and regions.ids.dtype == np.int32
    np.testing.assert_array_equal(regions.areas, [2, 4, 7])
    np.testing.assert_array_equal(regions.scores, np.ones(3, np.float32))


def test_smallest_value_is_unsegmented_even_when_not_zero() -> None:
    raw = np.array([[7, 7, -3], [100, 7, 5]], dtype=np.int32)  # -3 is the smallest: unsegmented
    regions = regions_from_label_map(raw, (2, 3))
    assert regions.ids[0, 2] == 0 and regions.num_regions == 3
    assert_monotone_dense(raw, regions.ids)
    np.testing.assert_array_equal(regions.areas, [1, 3, 1])  # values 5, 7, 100


def test_order_is_kept_on_a_real_label_png(sample_dir: Path) -> None:
    """A VOC label PNG (palette indices; 255 = void boundary) read as a label map."""
    path = sorted((sample_dir / VOC_SEG).glob("*.png"))[0]
    raw = np.asarray(Image.open(path))
    labels = decode_label_map(path.read_bytes(), RegionFileConfig(pattern="{stem}.png"))
    assert np.array_equal(labels, raw)
    regions = regions_from_label_map(labels, raw.shape)
    assert_monotone_dense(raw, regions.ids)
    np.testing.assert_array_equal(regions.areas, [int((raw == v).sum()) for v in np.unique(raw)[1:]])


@pytest.mark.parametrize(("dtype", "mode"), [(np.uint8, "L"), (np.uint8, "P"), (np.uint16, "I;16")])
def test_png_label_modes(dtype, mode) -> None:
    raw = np.random.default_rng(0).integers(0, 200, size=(9, 13)).astype(dtype) * (300 if mode == "I;16" else 1)
    if mode == "P":  # palette indices are the ids, whatever colours the palette gives them
        image = Image.frombytes("P", (13, 9), raw.tobytes())
        image.putpalette(list(range(256)) * 3)
    else:
        image = Image.fromarray(raw)
    data = png_bytes(image)
    assert Image.open(io.BytesIO(data)).mode == mode
    labels = decode_label_map(data, RegionFileConfig(pattern="masks/{stem}_id.png"))
    assert np.array_equal(labels.astype(np.int64), raw.astype(np.int64))


def test_config_file_names_and_validation() -> None:
    assert RegionFileConfig().file_name("2007_000033") == "2007_000033.npz"
    assert RegionFileConfig(pattern="sam2_32/{stem}.PNG").file_format == ".png"
    with pytest.raises(ValueError, match=r"pattern must contain \{stem\} exactly once"):
        RegionFileConfig(pattern="masks.npz")
    with pytest.raises(ValueError, match=r"pattern must end with one of \('.npz', '.png'\)"):
        RegionFileConfig(pattern="{stem}.npy")
    with pytest.raises(ValueError, match="key must name the array"):
        RegionFileConfig(key="")


def test_decode_errors() -> None:
    with pytest.raises(ValueError, match=r"mask file has no array 'instance_mask' \(it holds \['masks'\]\); set regions.params.key"):
        decode_label_map(npz_bytes(masks=np.zeros((2, 2), np.int32)), RegionFileConfig())
    with pytest.raises(ValueError, match="cannot read the mask file as .npz"):
        decode_label_map(b"not a zip", RegionFileConfig())
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="single .npy array, not an .npz archive"):
        decode_label_map(buf.getvalue(), RegionFileConfig())
    with pytest.raises(ValueError, match="PNG mask must be a single-channel label map .* got mode RGB"):
        decode_label_map(png_bytes(Image.new("RGB", (2, 2))), RegionFileConfig(pattern="{stem}.png"))
    with pytest.raises(ValueError, match="cannot read the mask file as PNG"):
        decode_label_map(b"\x89PNG broken", RegionFileConfig(pattern="{stem}.png"))


def test_label_map_errors() -> None:
    with pytest.raises(ValueError, match=r"region mask has size \(4, 5\) \(H, W\) but the image is \(5, 4\); masks must be at the image's original resolution"):
        regions_from_label_map(np.zeros((4, 5), np.int32), (5, 4))
    with pytest.raises(ValueError, match="region mask must hold integer ids, got dtype float32"):
        regions_from_label_map(np.zeros((2, 2), np.float32), (2, 2))
    with pytest.raises(ValueError, match=r"region mask must be a non-empty 2-D \(H, W\) label array, got \(2, 2, 1\)"):
        regions_from_label_map(np.zeros((2, 2, 1), np.int32), (2, 2))


def test_authors_entityseg_npz_2d_int32_reads_as_their_loader() -> None:
    """CorrCLIPv2's released masks: ``np.savez_compressed(instance_mask=...)`` of a 2-D int32 map (EntitySeg paints
    kept masks in ascending score order, id = index + 1 in its kept list, so ids need not be dense), read by the
    authors as ``np.load(path)['instance_mask'].astype(int)``: ovseg's regions are its monotone relabelling."""
    raw = np.array([[0, 0, 5, 5, 5], [2, 2, 5, 5, 0], [2, 9, 9, 0, 0]], dtype=np.int32)
    data = npz_bytes(instance_mask=raw)
    authors = np.load(io.BytesIO(data))["instance_mask"].astype(int)
    regions = regions_from_label_map(decode_label_map(data, RegionFileConfig()), authors.shape)
    # hand-written: 0 -> 0 (unsegmented), 2 -> 1, 5 -> 2, 9 -> 3
    assert np.array_equal(regions.ids, [[0, 0, 2, 2, 2], [1, 1, 2, 2, 0], [1, 3, 3, 0, 0]])
    assert_monotone_dense(authors, regions.ids)
    np.testing.assert_array_equal(regions.areas, [3, 5, 2])


def test_a_3d_mask_stack_is_refused_by_default_and_painted_on_request() -> None:
    """The bank builder's other form, a bool ``[n, H, W]`` stack (overlapping masks), which the authors' evaluation
    loader cannot use: refused naming the option; ``stacked: paint`` paints mask i as id i + 1 in stack order."""
    stack = np.zeros((3, 3, 4), dtype=bool)
    stack[0, :2, :2] = True
    stack[1, 1:, 1:3] = True  # overlaps mask 0 at (1, 1): painted later, it wins
    stack[2, 0, 3] = True
    data = npz_bytes(instance_mask=stack)
    with pytest.raises(ValueError, match=r"stack of 3 masks \(3, 3, 4\), not an \(H, W\) label map .* set "
                                         r"regions.params.stacked: paint"):
        decode_label_map(data, RegionFileConfig())
    painted = decode_label_map(data, RegionFileConfig(stacked="paint"))
    assert np.array_equal(painted, [[1, 1, 0, 3], [1, 2, 2, 0], [0, 2, 2, 0]])
    assert regions_from_label_map(painted, (3, 4)).num_regions == 3
    with pytest.raises(ValueError, match=r"stacked must be one of \('error', 'paint'\), got 'merge'"):
        RegionFileConfig(stacked="merge")


def test_the_stack_option_moves_no_existing_key() -> None:
    assert to_jsonable(RegionFileConfig()) == {"pattern": "{stem}.npz", "key": "instance_mask"}
    assert to_jsonable(RegionFileConfig(stacked="paint"))["stacked"] == "paint"
