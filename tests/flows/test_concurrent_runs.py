"""Two ``ovseg run`` processes started at once on one local store compute each output exactly once: every
(stage, key, item) is listed by exactly one completion record, and both runs end complete."""

from __future__ import annotations

import pytest

from tests.flows.concurrent_runs import experiment, finish, records_per_item, spawn, write_yaml

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # two whole runs of 8 images: about 60 s


def test_two_runs_at_once_compute_each_output_exactly_once(tmp_path):
    store = tmp_path / "store"
    exp = experiment(store, ttl=60.0)  # a lease outlives any stall of a loaded machine: no take-over, no excuse
    procs = [spawn(write_yaml(exp, tmp_path / name / "exp.yaml")) for name in ("a", "b")]
    outs = [finish(p) for p in procs]
    for rc, out in outs:
        assert rc == 0, out[-3000:]
    counts = records_per_item(store)
    assert len(counts) > 8 * 5  # every per-image stage of the 8 images, and the vocabulary items
    twice = {k: n for k, n in counts.items() if n != 1}
    assert not twice, f"{len(twice)} of {len(counts)} outputs computed more than once: {sorted(twice)[:10]}"
