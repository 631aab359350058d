"""The feature stages with random-init REAL architectures (CLIP ViT-B/16, DINO ViT-B/8, SAM vit_b) on a real image."""

from __future__ import annotations

import numpy as np
import pytest

from flows.graph import build_plan
from flows.pipeline import run_experiment
from storage.store import Store
from tests.flows.conftest import SAMPLE, computed, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

FEATURE_STAGES = ["text_embeddings", "sam_masks", "dino_features", "clip_layers"]


def test_feature_stages_with_real_architectures(tmp_path):
    exp = tiny_experiment(
        tmp_path / "store",
        datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"), "limit": 1}],
        models={"clip": "clip:ViT-B-16@random:0", "dino": "dino:vitb8@random:0", "sam": "sam:vit_b@random:0"},
        regions={"source": "sam"},
        methods=[{"name": "corrclip", "method": "corrclip"}],
        text_templates="single",
    )
    first = run_experiment(exp, only_stages=FEATURE_STAGES, progress=False)
    assert first.failed == 0
    assert computed(first) == {"text_embeddings": 1, "sam_masks": 1, "dino_features": 1, "clip_layers": 1}
    st = Store(tmp_path / "store")
    nodes = {n.stage: n for n in build_plan(exp)[0].nodes.values()}
    (iid,) = st.complete_items("sam_masks", nodes["sam_masks"].key)
    ids = st.read_item("sam_masks", nodes["sam_masks"].key, iid)["ids"]
    assert ids.shape == (513, 513) and ids.dtype == np.int32 and ids.min() >= 0
    qk = st.read_item("dino_features", nodes["dino_features"].key, iid)["qk"]
    assert qk.shape == (1, 42, 42, 768) and qk.dtype == np.float16  # ViT-B/8 on the 336 crop
    np.testing.assert_allclose(np.linalg.norm(qk.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    clip = st.read_item("clip_layers", nodes["clip_layers"].key, iid)
    assert set(clip) == {"block_11", "mean_6-10"} and clip["block_11"].shape == (1, 1 + 21 * 21, 768)
    emb = st.read_item("text_embeddings", nodes["text_embeddings"].key, "vocab")["embeddings"]
    assert emb.shape[1] == 512 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert st.item_attrs("dino_features", nodes["dino_features"].key, iid)["random_weights"] is True
    # a second run computes nothing; a DINO change recomputes that stage only
    assert computed(run_experiment(exp, only_stages=FEATURE_STAGES, progress=False)) == {}
    other = exp.model_copy(update={"models": exp.models.model_copy(update={"dino": "dino:vits16@random:0"})})
    assert computed(run_experiment(other, only_stages=FEATURE_STAGES, progress=False)) == {"dino_features": 1}
