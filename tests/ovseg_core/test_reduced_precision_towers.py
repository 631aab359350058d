"""SC-CLIP and the baselines on a bfloat16 CLIP tower (``dtype: bfloat16``): they run, and agree with float32.

The float32 path is the one checked against the authors' code elsewhere; here a bfloat16 copy of
the same random tower must give features pointing the same way (bfloat16 keeps 8 bits of
mantissa, so per-token cosine similarity, not equality, is the expectation). Before the fix the
last block received float32 tokens and stopped with "mixed dtype (CPU)".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.backbones import load_backbone
from ovseg_core.baselines import baseline_window_features
from ovseg_core.scclip.config import SCCLIPConfig
from ovseg_core.scclip.pipeline import scclip_window_features


@pytest.fixture(scope="module")
def towers():
    f32 = load_backbone("clip:tiny@random:0", dtype=torch.float32).model.visual
    b16 = load_backbone("clip:tiny@random:0", dtype=torch.bfloat16).model.visual
    crops = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    return f32, b16, crops


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    cos = F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)
    assert float(cos.min()) > 0.97, float(cos.min())


@pytest.mark.parametrize("cfg", [SCCLIPConfig(), SCCLIPConfig(dynamic_detection=True, boundary_aware_repair=True)],
                         ids=["paper", "extensions"])
def test_scclip_runs_on_a_bfloat16_tower(towers, cfg):
    f32, b16, crops = towers
    _agree(scclip_window_features(b16, crops.to(torch.bfloat16), cfg), scclip_window_features(f32, crops, cfg))


@pytest.mark.parametrize("method", ["clip", "maskclip", "clearclip"])
def test_baselines_run_on_a_bfloat16_tower(towers, method):
    f32, b16, crops = towers
    _agree(baseline_window_features(b16, crops.to(torch.bfloat16), method), baseline_window_features(f32, crops, method))
