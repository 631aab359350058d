"""Prefect-native runs, read back from the session's real Prefect server through its API.

A VOC copy with one corrupt image: the flow run's name, parameters, tags, final state, logs
(at the CLI's verbosity), task run names and artifacts are what a user sees in the UI.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.logs import configure_logging
from flows.pipeline import run_experiment
from storage.store import Store
from storage.tables import read_table
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole flows through the pipeline and Prefect

BROKEN = "val_crop_0000.jpg"  # first image of the split: its bytes are replaced by text
GOOD = "val_crop_0001.jpg"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _flow_run(name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with _client() as c:
        (run,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return run


def _logs(flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    with _client() as c:
        return c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _task_tags(flow_run_id) -> list[set[str]]:
    """The distinct tag sets of the flow run's task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [set(t) for t in {frozenset(r.tags) for r in runs}]


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(t.name for t in runs)


def _run_ids(store: Path) -> set[str]:
    return {r.run_id for r in Store(store).runs()[0]} if store.exists() else set()


@pytest.fixture(scope="module")
def broken_voc(tmp_path_factory) -> tuple[Path, Path]:
    """A VOC copy whose first image is not a JPEG, an experiment file on it, and its store."""
    base = tmp_path_factory.mktemp("prefect-runs")
    root = base / "voc"
    shutil.copytree(SAMPLE / "voc2012-sample", root)
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / BROKEN).write_text("not a jpeg")
    exp = tiny_experiment(base / "store", name="broken",
                          datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(root), "limit": 2}],
                          methods=[{"name": "scclip", "method": "scclip"}], text_templates="single")
    exp_file = base / "broken.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    return exp_file, base


def test_failed_image_makes_a_failed_flow_run_with_parameters_tags_logs_and_artifacts(broken_voc):
    exp_file, base = broken_voc
    from flows.config import load_experiment

    configure_logging(0)
    exp = load_experiment(exp_file, overrides=["runner.batch_size=4"])
    summary = run_experiment(exp, progress=False, experiment_file=str(exp_file))
    assert summary.exit_code == 1 and summary.failed == 1
    run = _flow_run(f"broken {summary.run_id}")
    # 1 of 2 images failed: 50 % > the default max_failed of 10 %
    assert run.state.type.value == "FAILED" and summary.state == "Failed"
    assert "1 of 2 image(s) failed (50.0 %)" in run.state.message and "max_failed=0.1" in run.state.message
    # the flow receives what it uses as plain data: the experiment itself (config) and the run's options
    assert run.parameters == {"experiment": "broken", "experiment_file": str(exp_file), "store": str(base / "store"),
                              "run_id": summary.run_id, "overrides": ["runner.batch_size=4"], "force": [],
                              "only_stages": None, "max_failed": 0.1, "config": exp.model_dump(mode="json"),
                              "report_dir": None, "wait": True, "progress": False}
    assert set(run.tags) == {"ovseg", "experiment:broken", "dataset:voc", "method:scclip", "set:runner.batch_size=4"}
    logs = _logs(run.id)
    text = [(lg.level, lg.name, lg.message) for lg in logs]
    error = next(r["error"] for r in read_table(Store(base / "store"), "manifests", ["voc"]).to_pylist() if r["error"])
    assert (logging.WARNING, "ovseg.flows", f"voc: image JPEGImages/{BROKEN} is skipped: {error}") in text
    assert any(m.startswith("voc:reconstruction[scclip] stage ") and "1 computed" in m for _, _, m in text)
    assert any(lvl == logging.INFO for lvl, _, _ in text) and not any(lvl == logging.DEBUG for lvl, _, _ in text)
    names = _task_names(run.id)
    # a cold run: the per-image stages of a batch of images as one fused chain task run (runner.fuse)
    assert "voc:clip_layers+reconstruction+scoring[scclip] batch 1/1" in names
    assert _task_tags(run.id) == [set()]  # untagged: no concurrency-slot round trip per task run
    arts = _artifacts(run.id)
    assert set(arts) == {"ovseg-scores-broken", "ovseg-failures-broken"}
    failures = json.loads(arts["ovseg-failures-broken"].data)
    assert [(f["dataset"], f["stage"], f["image"]) for f in failures] == [
        ("voc", "ingest", f"JPEGImages/{BROKEN}")]
    assert failures[0]["error"].startswith("ImageError: ")
    scores = json.loads(arts["ovseg-scores-broken"].data)
    assert [(s["dataset"], s["method"], s["images scored"]) for s in scores] == [("voc", "scclip", "1/2")]
    # the run journal records the override and the file
    journal = next(r for r in Store(base / "store").runs()[0] if r.run_id == summary.run_id).data
    assert journal["overrides"] == ["runner.batch_size=4"] and journal["experiment_files"] == [str(exp_file)]


def test_cli_partial_state_report_artifact_and_verbose_run_logs(broken_voc, tmp_path, capfd):
    exp_file, base = broken_voc
    report = tmp_path / "report"
    before = _run_ids(base / "store")
    rc = main(["run", str(exp_file), "-v", "--max-failed", "0.5", "--report", str(report), "--force", "scoring"])
    err = capfd.readouterr().err
    assert rc == 1  # failed images: exit 1 whatever the Prefect state
    # -v: ovseg's debug lines, libraries stay at WARNING
    assert "DEBUG ovseg.flows: voc:scoring[scclip] batch 1/1: 1 item(s) submitted" in err
    assert not [ln for ln in err.splitlines() if ln.startswith(("DEBUG httpcore", "DEBUG httpx", "DEBUG numcodecs",
                                                                  "DEBUG websockets", "DEBUG asyncio", "INFO httpx"))]
    (run_id,) = _run_ids(base / "store") - before
    run = _flow_run(f"broken {run_id}")
    assert run.state.type.value == "COMPLETED" and run.state.name == "Partial"  # 50 % failed <= --max-failed 0.5
    assert run.parameters["max_failed"] == 0.5 and run.parameters["force"] == ["scoring"]
    logs = _logs(run.id)
    assert any(lg.level == logging.DEBUG and "1 item(s) submitted" in lg.message for lg in logs)
    arts = _artifacts(run.id)
    text = arts["ovseg-report-broken"].data
    # the UI shows the scores and the report's path as text; it cannot open a file:// link
    assert arts["ovseg-report-broken"].type == "markdown" and "file://" not in text
    assert f"    {(report / 'index.html').resolve()}\n" in text
    assert "| dataset | method | mIoU | aAcc | images scored |" in text and "| voc | scclip |" in text
    assert "**Random-weight backbones: these scores are NOT method results.**" in text
    assert (report / "index.html").is_file()


def test_task_runs_of_one_stage_are_named_by_dataset_stage_and_methods(tmp_path):
    exp = tiny_experiment(tmp_path / "store", name="names", text_templates="single",
                          methods=[{"name": "scclip", "method": "scclip"}, {"name": "clip", "method": "clip"},
                                   {"name": "maskclip", "method": "maskclip"}],
                          runner={"kind": "local", "workers": 1, "batch_size": 8, "fuse": False})  # stage by stage
    summary = run_experiment(exp, progress=False)
    assert summary.exit_code == 0
    names = _task_names(_flow_run(f"names {summary.run_id}").id)
    # one scoring batch per method, each saying whose it is (they used to read "scoring[voc] batch 1/1" thrice)
    assert [n for n in names if ":scoring[" in n] == ["voc:scoring[clip] batch 1/1", "voc:scoring[maskclip] batch 1/1",
                                                      "voc:scoring[scclip] batch 1/1"]
    # a stage output shared by the three methods is one node, named with all of them
    assert "voc:clip_layers[clip,maskclip,scclip] batch 1/1" in names
    assert len(names) == len(set(names))


def test_quiet_run_sends_only_warnings_to_the_run_logs(broken_voc):
    exp_file, base = broken_voc
    before = _run_ids(base / "store")
    assert main(["-q", "run", str(exp_file), "--max-failed", "1"]) == 1
    (run_id,) = _run_ids(base / "store") - before
    run = _flow_run(f"broken {run_id}")
    assert run.state.name == "Partial"
    levels = {lg.level for lg in _logs(run.id) if lg.name.startswith("ovseg")}
    assert levels == {logging.WARNING}
