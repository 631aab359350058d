"""Dataset specs: class counts, special lines, presets of the methods.md table, validation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ovseg_core.datasets import (
    DATASETS,
    METHOD_VARIANTS,
    DatasetSpec,
    MethodPreset,
    class_lines,
    get_dataset,
)
from ovseg_core.features.text import parse_class_lines

STUFF_WORDS = (
    "sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; lamp; "
    "door; window; wardrobe; ceiling; shelf; curtain; stair; floor; hill; rail; fence"
).split("; ")

COUNTS = {
    "VOC21": 21, "VOC20": 20, "PC60": 60, "PC59": 59, "COCO-Object": 81,
    "COCO-Stuff": 171, "ADE20K": 150, "Cityscapes": 19, "CamVid": 11,
}  # fmt: skip


def test_all_datasets_present() -> None:
    assert set(DATASETS) == set(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("variant", METHOD_VARIANTS)
def test_class_counts(name: str, variant: str) -> None:
    lines = class_lines(name, variant)
    assert len(lines) == COUNTS[name] == get_dataset(name).num_classes
    vocab = parse_class_lines(lines)
    assert vocab.num_classes == COUNTS[name]
    assert sorted(set(vocab.query_to_class.tolist())) == list(range(COUNTS[name]))
    assert all(q == q.strip() and q for q in vocab.queries)
    # no duplicated class line within a file
    assert len(set(lines)) == len(lines)


def test_voc_special_lines() -> None:
    cc21, sc21 = class_lines("VOC21", "corrclip"), class_lines("VOC21", "scclip")
    for lines in (cc21, sc21):
        assert [s.strip() for s in lines[0].split(",")] == STUFF_WORDS
        assert len(STUFF_WORDS) == 26
    assert cc21[15] == "people" and cc21[20] == "tvmonitor"
    person = [s.strip() for s in sc21[15].split(",")]
    assert person[0] == "person" and len(person) == 7 and "person in jacket" in person
    tv = [s.strip() for s in sc21[20].split(",")]
    assert tv == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    # VOC20 = VOC21 without the background line, per variant
    assert class_lines("VOC20", "corrclip") == cc21[1:]
    assert class_lines("VOC20", "scclip") == sc21[1:]
    vocab = parse_class_lines(sc21)
    q2c = vocab.query_to_class.tolist()
    assert len(vocab.queries) == 26 + 18 + 7 + 5 and q2c.count(15) == 7 and q2c.count(0) == 26


def test_other_special_lines() -> None:
    assert class_lines("PC60", "scclip") == ["background"] + class_lines("PC59", "scclip")
    coco = class_lines("COCO-Object", "corrclip")
    assert coco[0] == "background" and coco[1] == "person" and coco[-1] == "toothbrush"
    assert class_lines("COCO-Stuff", "scclip")[:80] == coco[1:]
    assert class_lines("COCO-Stuff", "scclip")[-1] == "wood"
    assert class_lines("Cityscapes", "corrclip")[11] == "people"
    assert class_lines("Cityscapes", "scclip")[11] == "person"
    assert class_lines("CamVid", "scclip") == [
        "sky", "building", "pole", "road", "pavement", "tree", "signsymbol",
        "fence", "car", "pedestrian", "bicyclist",
    ]  # fmt: skip


def test_ade20k_names_match_object_info(sample_dir: Path) -> None:
    # objectInfo150.csv writes spaces and synonym separators both as ';': compare first words
    with open(sample_dir / "ade20k-sample" / "objectInfo150.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    names = class_lines("ADE20K", "scclip")
    for row, name in zip(rows, names):
        assert row["Name"].split(";")[0] == name.split(" ")[0], (row, name)


def test_presets_match_methods_table() -> None:
    voc = get_dataset("voc21")
    assert voc.presets["corrclip"] == MethodPreset(336, 336, 112, 40, 0.2, None)
    assert voc.presets["scclip"] == MethodPreset(336, 224, 112, 50, 0.15, 0.1)
    assert get_dataset("COCO-Object").presets["scclip"].logit_scale == 55
    assert get_dataset("COCO-Object").presets["scclip"].prob_thd == 0.35
    assert get_dataset("COCO-Object").presets["corrclip"].prob_thd == 0.25
    assert get_dataset("PC60").presets["corrclip"].prob_thd == 0.15
    city = get_dataset("Cityscapes")
    assert (city.presets["corrclip"].short_side, city.presets["corrclip"].crop) == (448, 224)
    assert (city.presets["scclip"].short_side, city.presets["scclip"].crop) == (560, 224)
    ade = get_dataset("ADE20K")
    assert (ade.presets["corrclip"].short_side, ade.presets["corrclip"].crop) == (448, 336)
    for spec in DATASETS.values():
        assert spec.presets["corrclip"].logit_scale == 40
        assert spec.ignore_index == 255
        for preset in spec.presets.values():
            assert preset.stride == 112
            # prob_thd only on datasets with a background class
            assert (preset.prob_thd is not None) == spec.has_background
        if spec.name != "VOC21":
            assert spec.presets["scclip"].area_thd is None


def test_label_conversions() -> None:
    conv = {n: s.label_conversion for n, s in DATASETS.items()}
    assert conv == {
        "VOC21": "none", "VOC20": "reduce_zero_label", "PC60": "none", "PC59": "reduce_zero_label",
        "COCO-Object": "coco_object", "COCO-Stuff": "none", "ADE20K": "reduce_zero_label",
        "Cityscapes": "none", "CamVid": "camvid",
    }  # fmt: skip
    assert {n for n, s in DATASETS.items() if s.has_background} == {"VOC21", "PC60", "COCO-Object"}


def test_specs_are_read_only() -> None:
    with pytest.raises(TypeError):
        DATASETS["VOC21"].presets["corrclip"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        DATASETS["VOC21"].num_classes = 3  # type: ignore[misc]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="valid names: VOC21"):
        get_dataset("voc2012")
    with pytest.raises(ValueError, match="variant"):
        class_lines("VOC21", "sclip")
    with pytest.raises(ValueError, match="stride"):
        MethodPreset(336, 224, 300, 40, None, None)
    with pytest.raises(ValueError, match="prob_thd"):
        MethodPreset(336, 224, 112, 40, 1.5, None)
    with pytest.raises(ValueError, match="logit_scale"):
        MethodPreset(336, 224, 112, 0, None, None)
    with pytest.raises(ValueError, match="area_thd"):
        MethodPreset(336, 224, 112, 40, None, -0.1)
    p = MethodPreset(336, 224, 112, 40, None, None)
    with pytest.raises(ValueError, match="label_conversion"):
        DatasetSpec("x", 3, False, False, {"corrclip": p, "scclip": p}, {"corrclip": "a", "scclip": "a"}, "bogus")
    with pytest.raises(ValueError, match="presets keys"):
        DatasetSpec("x", 3, False, False, {"corrclip": p}, {"corrclip": "a", "scclip": "a"}, "none")
    with pytest.raises(ValueError, match="reduce_zero_label"):
        DatasetSpec("x", 3, False, True, {"corrclip": p, "scclip": p}, {"corrclip": "a", "scclip": "a"}, "none")
    with pytest.raises(ValueError, match="ignore_index"):
        DatasetSpec("x", 3, False, False, {"corrclip": p, "scclip": p}, {"corrclip": "a", "scclip": "a"}, "none", 2)
