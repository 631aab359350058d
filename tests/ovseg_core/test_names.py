"""Did-you-mean suggestions (ovseg_core.names) and their use in the backbone name error."""

from __future__ import annotations

import pytest

from ovseg_core.backbones import parse_backbone
from ovseg_core.names import closest_name, did_you_mean

KEYS = ["tau", "beta", "map_correction", "spatial_branch", "semantic_branch"]


def test_suggests_the_closest_valid_name() -> None:
    assert did_you_mean("tua", KEYS) == " (did you mean 'tau'?)"
    assert did_you_mean("spatial_brnch", KEYS) == " (did you mean 'spatial_branch'?)"
    assert closest_name("semantic-branch", KEYS) == "semantic_branch"


def test_no_suggestion_when_nothing_is_close_or_the_name_is_valid() -> None:
    assert did_you_mean("window_batch", KEYS) == ""
    assert did_you_mean("tau", KEYS) == ""
    assert did_you_mean("anything", []) == ""


def test_case_is_ignored_and_the_valid_spelling_returned() -> None:
    specs = ["VOC21", "VOC20", "COCO-Object", "ADE20K"]
    assert did_you_mean("ade20k", specs) == " (did you mean 'ADE20K'?)"
    assert did_you_mean("coco-objects", specs) == " (did you mean 'COCO-Object'?)"


def test_non_string_names_and_choices() -> None:
    assert closest_name(12, [121, 5000]) == "121"


def test_cutoff_is_checked_and_applied() -> None:
    # difflib ratio of "abcd" vs "abxy" is 2*2/8 = 0.5: kept at cutoff 0.5, dropped at 0.6.
    assert closest_name("abcd", ["abxy"], cutoff=0.5) == "abxy"
    assert closest_name("abcd", ["abxy"]) is None
    with pytest.raises(ValueError, match=r"cutoff must be in \[0, 1\]"):
        closest_name("a", ["a"], cutoff=1.5)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("dino:vit_b8", "dino:vitb8"),
        ("clip:ViT-B16@openai", "clip:ViT-B-16@openai"),
        ("sam:vit_b@random:3", None),  # valid: no error
        ("dinov2:vits16@random", "dino:vits16@random"),
    ],
)
def test_backbone_error_suggests_a_name(name: str, suggestion: str | None) -> None:
    if suggestion is None:
        parse_backbone(name)
        return
    with pytest.raises(ValueError, match=rf"unknown backbone '{name}' \(did you mean '{suggestion}'\?\).*valid names"):
        parse_backbone(name)
