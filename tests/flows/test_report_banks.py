"""The HTML report says which memory bank each prediction used (issue 22): a bank of sample images built with tiny
random models (DMCE with a second tiny CLIP), two corrclipv2 methods (with and without the bank), the report of the
real store. The expected figures are read here from the stored attrs, not through the report's code. Random
weights: the numbers check the machinery, none is a method result."""

from __future__ import annotations

import html
import re
import shutil

import pytest

from flows.config import parse_experiment
from flows.pipeline import run_experiment
from flows.report import write_report
from flows.report_banks import BankUsed
from storage.store import Store
from tests.flows.conftest import SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOC = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
CLIPS = ["clip:tiny@random:0", "clip:tiny@random:1"]  # main and DMCE's auxiliary (random: not DFN2B)
WINDOW = {"short_side": 224, "crop": 112, "stride": 112}  # small windows: a fast bank


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-bank")
    folder = tmp / "bank-images"
    folder.mkdir()
    for n in ("val_crop_0000.jpg", "val_crop_0001.jpg"):
        shutil.copy(VOC / n, folder / n)
    data = {"name": "bankrep", "store": str(tmp / "store"),
            "models": {"clip": CLIPS[0], "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"},
            "regions": {"source": "slic"}, "text_templates": "single", "feature_dtype": "float32",
            "banks": [{"name": "sample", "root": str(folder), "window": WINDOW, "clips": CLIPS,
                       "index": {"kind": "flat"}}],
            "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                          "limit": 2}],
            "methods": [{"name": "v2bank", "method": "corrclipv2", "params": {"bank": "sample", "bank_k": 5,
                                                                                  "bank_alpha": 0.25}},
                        {"name": "v2plain", "method": "corrclipv2"}]}
    summary = run_experiment(parse_experiment(data, source="test"), progress=False, orchestrate=False)
    assert summary.failed == 0
    index = write_report(str(tmp / "store"), tmp / "report", samples=2)
    return Store(tmp / "store"), html.unescape(index.read_text())


def _bank_cell(page: str, method: str) -> str:
    (row,) = [r for r in page.split("<tr") if f'<td class="l">{method}' in r and 'class="l bank"' in r]
    return re.search(r'<td class="l bank">(.*?)</td>', row, re.S).group(1).strip()


@pytest.mark.slow
def test_the_scores_table_shows_the_bank_and_its_support_from_the_store(reported):
    store, page = reported
    # independently: the index item's attrs, and the bank record of every reconstruction item that has one
    (index_key,) = [k for s, k in store.stage_sets() if s == "bank_index"]
    index_attrs = store.item_attrs("bank_index", index_key, "bank")
    queried = without = images = 0
    per_image: dict[str, tuple[int, int]] = {}
    for stage, key in store.stage_sets():
        if stage != "reconstruction":
            continue
        for iid in store.complete_items(stage, key):
            rec = store.item_attrs(stage, key, iid).get("bank")
            if rec is not None:
                assert rec["name"] == "sample"
                queried, without, images = queried + rec["regions"], without + rec["without_support"], images + 1
                per_image[iid] = (rec["regions"], rec["without_support"])
    assert images == 2 and queried > 0
    cell = _bank_cell(page, "v2bank")
    assert cell.startswith(f"sample ({index_attrs['images']} images, {index_attrs['regions']} regions; "
                           f"index {index_key[:12]})")
    assert "K 5" in cell and "α 0.25" in cell and f"aux 0.5 ({CLIPS[1]})" in cell
    assert f"without support {100.0 * without / queried:.1f}% ({without}/{queried} regions, 2 images)" in cell
    assert _bank_cell(page, "v2plain") == "–"
    # per sample image: the bank and that image's regions without support
    for iid, (q, w) in per_image.items():
        assert f"v2bank: bank sample: {w} of {q} regions without support ({100.0 * w / q:.1f}%)" in page, iid
    assert "v2plain: bank" not in page


def test_an_imported_bank_is_shown_by_its_regions_not_as_zero_images():
    bank = BankUsed("coco", "0123456789abcdef", 0, 2_940_000, 20, 0.5, 0.5, "clip:ViT-B-16@dfn2b", 25, 1, 1,
                    imported=True)
    assert bank.summary() == ("coco (imported, 2940000 regions; index 0123456789ab) · K 20 · α 0.5 · "
                              "aux 0.5 (clip:ViT-B-16@dfn2b) · without support 4.0% (1/25 regions, 1 images)")
