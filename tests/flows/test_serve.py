"""``ovseg serve``: a Prefect deployment served by a child process against the session's Prefect server.

The deployment exists with its cron schedule; a triggered run computes the folder's images; after
one image is added, the next triggered run computes only that image.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from storage.store import Store
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect

REPO = Path(__file__).resolve().parents[2]
JPEGS = SAMPLE / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"


def _wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float = 300.0):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + timeout
    with get_client(sync_client=True) as c:
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "serve exited"
            try:
                return c.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(2)
    raise AssertionError(f"deployment {name} did not appear within {timeout} s")


def _flow_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as c:
        (run,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return run


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _all_flow_runs() -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_runs()


def _newest_journal(store: Path) -> dict:
    runs, _ = Store(store).runs()
    return max(runs, key=lambda r: r.run_id).data


def _done(journal: dict) -> dict[str, int]:
    """Items computed per stage in a run (stages that computed nothing left out)."""
    out: dict[str, int] = {}
    for ident, progress in journal["stages"].items():
        stage = ident.split("/")[1]
        out[stage] = out.get(stage, 0) + int(progress["done"])
    return {k: v for k, v in out.items() if v}


def test_served_deployment_runs_on_trigger_and_computes_only_an_added_image(tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("val_crop_0000.jpg", "val_crop_0001.jpg"):
        shutil.copy(JPEGS / name, photos / name)
    exp = tiny_experiment(tmp_path / "store", name="nightly", text_templates="single",
                          datasets=[{"name": "photos", "layout": "folder", "root": str(photos),
                                     "classes": ["sky", "person", "grass"]}],
                          methods=[{"name": "scclip", "method": "scclip"}])
    exp_file = tmp_path / "nightly.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(exp_file), "--cron", "0 1 * * *",
                             "--name", "servetest", "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        dep = _wait_for_deployment("ovseg-scheduled/servetest", proc)
        assert [s.schedule.cron for s in dep.schedules] == ["0 1 * * *"]
        assert dep.parameters["experiment_file"] == str(exp_file) and dep.parameters["overrides"] == []
        assert {"experiment:nightly", "dataset:photos", "method:scclip"} <= set(dep.tags)

        first = run_deployment("ovseg-scheduled/servetest", timeout=900)
        assert first.state.is_completed(), first.state
        journal = _newest_journal(tmp_path / "store")
        assert _done(journal) == {"text_embeddings": 1, "clip_layers": 2, "reconstruction": 2}
        # a scheduled run is one flow run: named like any run, holding the work's task runs, no sub-flow run
        assert first.name == f"nightly {journal['run_id']}" and first.parent_task_run_id is None
        assert first.state.name == "Completed"
        assert {"experiment:nightly", "dataset:photos", "method:scclip"} <= set(first.tags)
        tasks = _task_runs(first.id)
        assert "photos:clip_layers+reconstruction[scclip] batch 1/1" in {t.name for t in tasks}  # one fused chain
        assert not [r for r in _all_flow_runs() if r.parent_task_run_id in {t.id for t in tasks}]
        assert _flow_run(f"nightly {journal['run_id']}").id == first.id
        # a new image arrives (mirrored, so its content and id are new)
        img = np.asarray(Image.open(JPEGS / "val_crop_0008.jpg"))[:, ::-1]
        Image.fromarray(img).save(photos / "new.png")
        second = run_deployment("ovseg-scheduled/servetest", timeout=900)
        assert second.state.is_completed(), second.state
        journal = _newest_journal(tmp_path / "store")
        assert _done(journal) == {"clip_layers": 1, "reconstruction": 1}
        assert journal["status"] == "complete" and journal["experiment_file"] == str(exp_file)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
