"""An item's outputs do not depend on the items it is computed with, bit for bit (issue 18, item 8).

A rerun recomputes only the missing items, in other groups than the first run did: the guarantee
"bit-identical to an uninterrupted run" needs every windowed stage's outputs of an image to be a
function of that image alone. Real tiny random-init networks on real VOC images, with images of
different window counts and region counts and a ``window_batch`` that does not divide them, at one
and two torch threads (Dask workers run with one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core.backbones import patch_size
from ovseg_core.features.clip import normalize_clip
from tasks.common import image_tensor, image_windows, run_windows
from tasks.params import ClipParams, DinoParams, SemanticParams, WindowParams
from tasks.runtime import RunSettings, StageContext, StageNode
from tasks.stages import STAGES

CLIP = "clip:tiny@random:0"
DINO = "dino:tiny8@random:0"
WINDOW = WindowParams(112, 56, 56, 56)  # 4, 6 and 8 windows on the images of _rows
WINDOW_BATCH = 3  # divides no image's window count: the old grouping split images across forwards


@pytest.fixture
def threads(request):
    """Run the test body with ``request.param`` torch threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _rows(sample_dir: Path) -> list[dict]:
    """Real images of three aspect ratios: 4, 6 and 8 windows."""
    paths = [sample_dir / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "val_crop_0000.jpg",
             sample_dir / "ade20k-sample" / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg",
             next((sample_dir / "cityscapes-sample" / "leftImg8bit").rglob("*.png"))]
    rows = []
    for p in paths:
        w, h = Image.open(p).size
        rows.append({"image_id": p.stem, "abs_path": str(p), "width": w, "height": h})
    return rows


def _semantic_inputs(rows: list[dict]) -> list[dict]:
    """mask_class_tokens inputs: each image's CLIP crops and a merged map with its own region count (2, 5, 8, ...)."""
    out = []
    for k, row in enumerate(rows):
        crops, plan = image_windows(image_tensor(row), WINDOW, normalize_clip)
        n = crops.shape[0]
        cells = torch.arange(n * 7 * 7).reshape(n, 7, 7)
        out.append({"win": {"crops": crops, "merged": (cells * 7919 % (2 + 3 * k)).long()}, "plan": plan,
                    "image_id": str(row["image_id"])})
    return out


def _stage_case(stage: str, rows: list[dict], tmp_path: Path) -> tuple[StageContext, list[dict]]:
    params = {
        "dino_features": DinoParams(DINO, WINDOW, "float32", "float32"),
        "clip_layers": ClipParams(CLIP, WindowParams(112, 56, 56, patch_size(CLIP)), ("block:1", "mean:1-2"),
                                  "float32", "float32"),
        "mask_class_tokens": SemanticParams(CLIP, WINDOW, "float32", "float32"),
    }[stage]
    ctx = StageContext(StageNode(stage, params, "1"), RunSettings(str(tmp_path / "store"), window_batch=WINDOW_BATCH))
    spec = STAGES[stage]
    inputs = _semantic_inputs(rows) if stage == "mask_class_tokens" else [spec.load(ctx, r) for r in rows]
    return ctx, inputs


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("stage", ["mask_class_tokens", "clip_layers", "dino_features"])
def test_an_item_computed_alone_equals_it_computed_in_a_group_bit_for_bit(sample_dir, tmp_path, stage, threads):
    ctx, inputs = _stage_case(stage, _rows(sample_dir), tmp_path)
    spec = STAGES[stage]
    counts = [spec.windows(i) for i in inputs]
    assert len(set(counts)) > 1 and any(c % WINDOW_BATCH for c in counts)  # the case that used to split images
    models = spec.models(ctx)
    grouped = spec.compute(ctx, models, inputs)
    for i, inp in enumerate(inputs):
        (alone, _), = spec.compute(ctx, models, [inp])
        assert alone.keys() == grouped[i][0].keys()
        for name in alone:
            np.testing.assert_array_equal(alone[name], grouped[i][0][name], err_msg=f"{stage} {name} image {i}")
    # and the item's place in the group does not matter either
    (last, _) = spec.compute(ctx, models, inputs[::-1])[-1]
    for name in last:
        np.testing.assert_array_equal(last[name], grouped[0][0][name], err_msg=f"{stage} {name} image 0 last")


def test_run_windows_never_puts_two_images_in_one_call():
    inputs = [{"x": torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * i} for i, n in enumerate((5, 1, 2))]
    calls: list[tuple[float, int]] = []
    got: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def fn(b):
        calls.append((float(b["x"][0, 0]), b["x"].shape[0]))
        return b["x"] * 2

    run_windows(inputs, fn, 4, lambda i, start, part: got.setdefault(i, []).append((start, part)))
    # image 0: windows 0-3 then 4; image 1 alone (not after image 0's last window); image 2 alone
    assert calls == [(0.0, 4), (8.0, 1), (100.0, 1), (200.0, 2)]
    assert {i: [s for s, _ in parts] for i, parts in got.items()} == {0: [0, 4], 1: [0], 2: [0]}
    for i, inp in enumerate(inputs):
        torch.testing.assert_close(torch.cat([p for _, p in got[i]]), inp["x"] * 2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        run_windows(inputs, fn, 0, lambda *a: None)
