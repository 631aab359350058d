"""Whole runs: every stage's outputs are the same bit for bit whether each image is computed alone or with others.

A rerun computes only the missing items, in other groups than the first run did (issue 18 item 8): a run
with ``batch_size: 1`` (every item alone) must store exactly what a run with all images in one batch
stores, for every stage of CorrCLIP and SC-CLIP (reconstruction and map correction included), at one
and two torch threads. ``window_batch: 3`` divides neither method's window count per image (1 and 4),
so the old grouping put windows of several images into one forward.
"""

from __future__ import annotations

import pytest
import torch

from flows.pipeline import run_experiment
from tests.flows.conftest import assert_same_outputs, computed, store_snapshot, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # four whole runs


@pytest.mark.parametrize("threads", [1, 2])
def test_each_image_alone_stores_the_same_bits_as_all_images_in_one_batch(tmp_path, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        snapshots = []
        for batch_size in (3, 1):
            store = tmp_path / f"batch{batch_size}"
            exp = tiny_experiment(store, window_batch=3,
                                  runner={"kind": "local", "workers": 1, "batch_size": batch_size})
            exp = exp.model_copy(update={"datasets": [exp.datasets[0].model_copy(update={"limit": 3})]})
            summary = run_experiment(exp, progress=False)
            assert summary.status == "complete" and summary.exit_code == 0
            assert computed(summary)["mask_class_tokens"] == 3 and computed(summary)["reconstruction"] == 6
            snapshots.append(store_snapshot(store))
    finally:
        torch.set_num_threads(before)
    assert_same_outputs(snapshots[1], snapshots[0])
