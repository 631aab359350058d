"""Dataset specs: class counts, special lines, presets of the methods.md table, validation."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import pytest

from ovseg_core.datasets import (
    CLASS_SEPARATORS,
    DATASETS,
    METHOD_VARIANTS,
    DatasetSpec,
    MethodPreset,
    class_lines,
    get_dataset,
)
from ovseg_core.vocabulary import parse_class_lines

STUFF_WORDS = (
    "sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; lamp; "
    "door; window; wardrobe; ceiling; shelf; curtain; stair; floor; hill; rail; fence"
).split("; ")

COUNTS = {
    "VOC21": 21, "VOC20": 20, "PC60": 60, "PC59": 59, "COCO-Object": 81,
    "COCO-Stuff": 171, "ADE20K": 150, "Cityscapes": 19, "CamVid": 11, "ADE847": 847, "PC459": 459,
}  # fmt: skip


def test_all_datasets_present() -> None:
    assert set(DATASETS) == set(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("variant", METHOD_VARIANTS)
def test_class_counts(name: str, variant: str) -> None:
    lines = class_lines(name, variant)
    assert len(lines) == COUNTS[name] == get_dataset(name).num_classes
    vocab = parse_class_lines(lines, CLASS_SEPARATORS[variant])
    assert vocab.num_classes == COUNTS[name]
    assert sorted(set(vocab.query_to_class.tolist())) == list(range(COUNTS[name]))
    assert all(q.strip() for q in vocab.queries)
    # no duplicated class line within a file
    assert len(set(lines)) == len(lines)


def test_voc_special_lines() -> None:
    cc21, sc21 = class_lines("VOC21", "corrclip"), class_lines("VOC21", "scclip")
    assert cc21[0].split("; ") == STUFF_WORDS and sc21[0].split(", ") == STUFF_WORDS
    assert len(STUFF_WORDS) == 26
    assert cc21[15] == "people" and cc21[20] == "tvmonitor"
    person = sc21[15].split(", ")
    assert person[0] == "person" and len(person) == 7 and "person in jacket" in person
    assert sc21[20].split(", ") == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    # VOC20 = VOC21 without the background line, per variant
    assert class_lines("VOC20", "corrclip") == cc21[1:]
    assert class_lines("VOC20", "scclip") == sc21[1:]
    q2c = parse_class_lines(sc21, CLASS_SEPARATORS["scclip"]).query_to_class.tolist()
    assert len(q2c) == 26 + 18 + 7 + 5 and q2c.count(15) == 7 and q2c.count(0) == 26
    q2c = parse_class_lines(cc21, CLASS_SEPARATORS["corrclip"]).query_to_class.tolist()
    assert len(q2c) == 26 + 20 and q2c.count(0) == 26


def test_other_special_lines() -> None:
    for variant in METHOD_VARIANTS:
        pc60, pc59 = class_lines("PC60", variant), class_lines("PC59", variant)
        assert pc60[0] == "background" and pc60[1:-1] == pc59[:-1]
        assert (pc60[-1], pc59[-1]) == ("wood ", "wood")  # the references' PC60 file keeps a trailing space
    coco = class_lines("COCO-Object", "corrclip")
    assert coco[0].split("; ")[:3] == ["sky", "wall", "tree"] and len(coco[0].split("; ")) == 16
    assert coco[1] == "people" and coco[10] == "traffic light" and coco[-1] == "toothbrush"
    sc_coco = class_lines("COCO-Object", "scclip")
    assert sc_coco[0].split(", ") == STUFF_WORDS and sc_coco[1].split(", ")[-1] == "body"
    assert class_lines("COCO-Stuff", "scclip")[9] == "trafficlight"
    assert class_lines("COCO-Stuff", "corrclip")[0] == "people"
    assert class_lines("COCO-Stuff", "scclip")[-1] == "wood"
    assert class_lines("Cityscapes", "corrclip")[6:8] == ["trafficlight", "trafficsign"]
    assert class_lines("Cityscapes", "corrclip")[11] == "people"
    assert class_lines("Cityscapes", "scclip")[11] == "person"
    city_v2 = class_lines("Cityscapes", "corrclipv2")
    assert city_v2[11] == "people, person" and city_v2[:11] + city_v2[12:] == (
        class_lines("Cityscapes", "corrclip")[:11] + class_lines("Cityscapes", "corrclip")[12:])
    # CorrCLIPv2 reads "people, person" as ONE query (its reader splits on "; ")
    assert parse_class_lines(city_v2, CLASS_SEPARATORS["corrclipv2"]).queries[11] == "people, person"
    ade847, pc459 = class_lines("ADE847", "corrclipv2"), class_lines("PC459", "corrclipv2")
    assert (ade847[0], ade847[1], ade847[-1]) == ("wall", "building, edifice", ade847[846])
    assert len(parse_class_lines(ade847, "; ").queries) == 847  # no "; " synonyms
    assert len(pc459) == 459 and len(parse_class_lines(pc459, "; ").queries) == 459
    for variant in METHOD_VARIANTS:  # the new benchmarks have only the CorrCLIPv2 file
        assert class_lines("ADE847", variant) == ade847 and class_lines("PC459", variant) == pc459
    for name in set(COUNTS) - {"Cityscapes", "ADE847", "PC459"}:  # every other v2 file is v1's
        assert class_lines(name, "corrclipv2") == class_lines(name, "corrclip")
    for variant in METHOD_VARIANTS:
        assert class_lines("CamVid", variant) == [
            "sky", "building", "pole", "road", "pavement", "tree", "signsymbol",
            "fence", "car", "pedestrian", "bicyclist",
        ]  # fmt: skip


# Benchmark -> file stem of the authors' class files (cls_<stem>.txt in the repositories).
AUTHORS_STEMS = {
    "VOC21": "voc21", "VOC20": "voc20", "PC60": "context60", "PC59": "context59",
    "COCO-Object": "coco_object", "COCO-Stuff": "coco_stuff", "Cityscapes": "city_scapes", "ADE20K": "ade20k",
    "ADE847": "ade20k847", "PC459": "context459",
}  # fmt: skip
# Benchmarks only CorrCLIPv2 evaluates: every variant ships its file.
V2_ONLY = ("ADE847", "PC459")


def _authors_file(name: str, variant: str) -> Path:
    """The authors' file a shipped file must equal (../shared/data/class-names/README.md): ``corrclipv2/``
    holds only the files that differ from ``corrclip/``; the v2-only benchmarks exist only there."""
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "class-names"
    folder = "corrclipv2" if name in V2_ONLY else variant
    path = shared / folder / f"cls_{AUTHORS_STEMS[name]}.txt"
    if variant == "corrclipv2" and not path.is_file() and (shared / "corrclipv2").is_dir():
        path = shared / "corrclip" / f"cls_{AUTHORS_STEMS[name]}.txt"  # byte-identical to v1's
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(AUTHORS_STEMS))
@pytest.mark.parametrize("variant", METHOD_VARIANTS)
def test_shipped_class_files_equal_the_authors_files(name: str, variant: str) -> None:
    shipped = resources.files("ovseg_core").joinpath("data", "classes", get_dataset(name).class_files[variant])
    assert shipped.read_bytes() == _authors_file(name, variant).read_bytes()


def _reference_get_cls_idx(path: Path, separator: str) -> tuple[list[str], list[int]]:
    """The references' get_cls_idx: readlines, split each line on the separator, drop newlines."""
    with open(path) as f:
        name_sets = f.readlines()
    names, indices = [], []
    for idx, line in enumerate(name_sets):
        parts = line.split(separator)
        names += parts
        indices += [idx] * len(parts)
    return [n.replace("\n", "") for n in names], indices


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(AUTHORS_STEMS))
@pytest.mark.parametrize(("variant", "separator"), [("corrclip", "; "), ("scclip", ", "), ("corrclipv2", "; ")])
def test_queries_equal_the_reference_reader(name: str, variant: str, separator: str) -> None:
    names, indices = _reference_get_cls_idx(_authors_file(name, variant), separator)
    vocab = parse_class_lines(class_lines(name, variant), CLASS_SEPARATORS[variant])
    assert list(vocab.queries) == names
    assert vocab.query_to_class.tolist() == indices


def test_ade20k_names_match_object_info(sample_dir: Path) -> None:
    # objectInfo150.csv writes spaces and synonym separators both as ';': compare first words
    with open(sample_dir / "ade20k-sample" / "objectInfo150.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    for variant in METHOD_VARIANTS:
        for row, name in zip(rows, class_lines("ADE20K", variant)):
            first = row["Name"].split(";")[0]
            # the authors' files write some multi-word names without spaces ("chestofdrawers")
            assert name.split(" ")[0] == first or name.startswith(first) or (first, name) == ("person", "people"), (row, name)


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
    # CorrCLIPv2 (CorrCLIPv2/configs/cfg_*.py): v1's settings, Cityscapes at S = 784, the two new benchmarks
    v2 = {n: s.presets["corrclipv2"] for n, s in DATASETS.items()}
    assert v2["Cityscapes"] == MethodPreset(784, 224, 112, 40, None, None)
    assert v2["VOC21"] == MethodPreset(336, 336, 112, 40, 0.2, None)
    assert (v2["PC60"].prob_thd, v2["COCO-Object"].prob_thd) == (0.15, 0.25)
    assert v2["ADE20K"] == v2["ADE847"] == MethodPreset(448, 336, 112, 40, None, None)
    assert v2["PC459"] == MethodPreset(336, 336, 112, 40, None, None)
    for name in ("VOC20", "PC59", "COCO-Stuff", "CamVid"):
        assert v2[name] == MethodPreset(336, 336, 112, 40, None, None)
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
        "Cityscapes": "none", "CamVid": "camvid", "ADE847": "none", "PC459": "none",
    }  # fmt: skip
    assert {n for n, s in DATASETS.items() if s.has_background} == {"VOC21", "PC60", "COCO-Object"}


def test_catseg_benchmarks_score_as_the_reference() -> None:
    for name, k in (("ADE847", 847), ("PC459", 459)):
        spec = get_dataset(name)
        assert (spec.num_classes, spec.has_background, spec.reduce_zero_label) == (k, False, False)
        # the reference evaluator ignores 255 (a real class here); 65535 is the labels' own unlabelled value
        assert (spec.ignore_index, spec.unlabelled_index) == (255, 65535)
    assert all(s.unlabelled_index is None for n, s in DATASETS.items() if n not in V2_ONLY)
    p = MethodPreset(336, 336, 112, 40, None, None)
    presets = dict.fromkeys(METHOD_VARIANTS, p)
    files = dict.fromkeys(METHOD_VARIANTS, "a")
    with pytest.raises(ValueError, match="unlabelled_index must be in 500..65535"):
        DatasetSpec("x", 500, False, False, presets, files, "none", 255, 300)
    with pytest.raises(ValueError, match=r"ignore_index must be in 500\.\.65535 \(outside the classes\)"):
        DatasetSpec("x", 500, False, False, presets, files, "none", 255)


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
