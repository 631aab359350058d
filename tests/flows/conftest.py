"""Flow tests: one Prefect test harness per session, tiny real-architecture experiments on the embedded sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.cli import configure_prefect
from flows.config import Experiment, parse_experiment

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(request):
    """A temporary Prefect server and database shared by every flow test of the session.

    Not started when no selected test is marked ``slow`` (``make test-fast``): the fast tests run
    no Prefect flow (their runs use ``--no-prefect``), and the server costs 15-25 s to start.
    """
    configure_prefect()
    if not any(item.get_closest_marker("slow") for item in request.session.items):
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))):
        yield


def tiny_experiment(store: Path, **overrides: Any) -> Experiment:
    """Two VOC sample images, tiny random CLIP/DINO, superpixel regions, CorrCLIP + SC-CLIP."""
    data: dict[str, Any] = {
        "name": "tiny",
        "store": str(store),
        "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"), "limit": 2}],
        "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0"},
        "regions": {"source": "slic", "params": {"n_segments": 40}},
        "methods": [{"name": "corrclip", "method": "corrclip"}, {"name": "scclip", "method": "scclip"}],
        "runner": {"kind": "local", "workers": 1, "batch_size": 8},
    }
    data.update(overrides)
    return parse_experiment(data, source="test")


def computed(summary) -> dict[str, int]:
    """Outputs computed per stage name in a run."""
    out: dict[str, int] = {}
    for s in summary.stages:
        out[s.stage] = out.get(s.stage, 0) + s.done
    return {k: v for k, v in out.items() if v}


def store_snapshot(store: Path) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """Every complete item of every stage output in ``store``: ``{(stage, key, item): arrays}``."""
    from storage.store import Store

    st = Store(store)
    return {(s, k, i): st.read_item(s, k, i) for s, k in st.stage_sets() for i in st.complete_items(s, k)}


def assert_same_outputs(a: dict, b: dict) -> None:
    """Two :func:`store_snapshot` results hold the same items, arrays and values, bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys(), k
        for name in a[k]:
            np.testing.assert_array_equal(a[k][name], b[k][name], err_msg=str((k, name)))
