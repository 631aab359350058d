"""CLI behaviour: verbosity flags anywhere, usage errors that list what exists, read-only commands
that create nothing and never start Prefect, dry runs that write nothing, journals with overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser, main
from storage.store import Store
from tasks.stages import STAGES
from tests.flows.conftest import SAMPLE, tiny_experiment

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Path, Path]:
    """An SC-CLIP experiment file on two VOC images, computed once without Prefect."""
    base = tmp_path_factory.mktemp("cli")
    exp = tiny_experiment(base / "store", methods=[{"name": "scclip", "method": "scclip"}], text_templates="single")
    exp_file = base / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["run", str(exp_file), "-q", "--no-prefect", "--set", "runner.batch_size=1"]) == 0
    return exp_file, base / "store"


@pytest.mark.parametrize("argv", [
    ["-v", "runs"], ["runs", "-v"], ["-q", "cache", "ls"], ["cache", "-q", "ls"], ["cache", "ls", "-q"],
    ["report", "-q"], ["segment", "x.jpg", "--classes", "a; b", "-q"], ["demo", "-v"], ["backbones", "-q"],
    ["run", "e.yaml", "-v"], ["-q", "export", "e.yaml", "--out", "d"], ["serve", "e.yaml", "--cron", "0 1 * * *", "-q"],
])
def test_verbosity_flags_on_every_command_before_or_after_it(argv):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == ("-v" in argv, "-q" in argv)


def test_verbose_and_quiet_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-v", "runs", "-q"])
    assert e.value.code == 2 and "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["cache", "ls"], ["cache", "verify"], ["cache", "gc"], ["runs"],
                                  ["runs", "--failures", "x"], ["report"]])
def test_read_only_commands_on_a_missing_store_exit_2_and_create_nothing(tmp_path, capsys, argv):
    typo = tmp_path / "typo"
    rc = main([*argv, "--store", str(typo), *(["--out", str(tmp_path / "r")] if argv == ["report"] else [])])
    assert rc == 2
    assert f"no ovseg store at {typo}" in capsys.readouterr().err
    assert not typo.exists() and not (tmp_path / "r").exists()


HEAVY = ("torch", "prefect", "open_clip", "zarr")


@pytest.mark.slow
def test_read_only_commands_import_no_torch_prefect_open_clip_or_zarr(done, tmp_path):
    """Each read-only command in a fresh interpreter: what it imported (issue 21: seconds of imports before anything
    happened). ``export`` needs the stage graph, whose keys hold backbone geometry (torch, open_clip): no Prefect, no
    scikit-learn (CorrCLIP's clustering imports it where it runs)."""
    exp_file, store = done
    commands = {"help": (["--help"], HEAVY), "export-help": (["export", "--help"], HEAVY),
                "stage-help": (["stage", "--help"], HEAVY),
                "runs": (["runs", "--store", str(store)], HEAVY), "ls": (["cache", "ls", "--store", str(store)], HEAVY),
                "verify": (["cache", "verify", "--store", str(store)], HEAVY),
                "gc": (["cache", "gc", "--dry-run", "--store", str(store)], HEAVY),
                "report": (["report", "--store", str(store), "--out", str(tmp_path / "r"), "--samples", "1"], HEAVY),
                "export": (["export", str(exp_file), "--out", str(tmp_path / "x"), "-q"],
                           ("prefect", "zarr", "sklearn"))}
    script = """
import sys
import time
from flows.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("RC", rc, "MODULES", " ".join(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for name, (argv, absent) in commands.items():
        proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("RC ")]
        rc, modules = line.split()[1], set(line.split(" MODULES ")[1].split())
        assert rc == "0", (name, proc.stderr[-3000:])
        assert not modules & set(absent), (name, sorted(modules & set(absent)))


def test_stage_help_lists_every_stage_with_what_it_computes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for stage in STAGES.values():
        assert re.search(rf"^  {stage.name} +{re.escape(stage.description)}$", out, flags=re.M), stage.name


@pytest.mark.slow
def test_read_only_commands_never_start_prefect(done, tmp_path):
    """With PREFECT_API_URL on a closed port every read-only command works and no Prefect server module is imported."""
    exp_file, store = done
    script = f"""
import sys, time
from flows.cli import main
store = {str(store)!r}
out = {str(tmp_path)!r}
commands = [["cache", "ls", "--store", store], ["cache", "verify", "--store", store],
            ["cache", "gc", "--dry-run", "--store", store], ["runs", "--store", store],
            ["report", "--store", store, "--out", out + "/report", "--samples", "0"], ["backbones"],
            ["ingest", {str(SAMPLE / "camvid-sample")!r}, "--layout", "camvid", "--store", out + "/s2", "-q"]]
for argv in commands:
    t0 = time.perf_counter()
    rc = main(argv)
    print("RC", "_".join(argv[:2]), rc, round(time.perf_counter() - t0, 2), file=sys.stderr)
print("SERVER", sorted(m for m in sys.modules if m.startswith(("prefect.server", "prefect.testing"))), file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln.split() for ln in proc.stderr.splitlines() if ln.startswith("RC ")]
    assert len(lines) == 7, proc.stderr[-3000:]
    assert all(cols[2] == "0" for cols in lines), proc.stderr[-3000:]
    assert "SERVER []" in proc.stderr
    assert not list(tmp_path.glob("prefect-home/*.db"))  # no ephemeral server database was created


def test_unknown_force_stage_is_a_usage_error_listing_the_stages(done, capsys):
    exp_file, _ = done
    assert main(["run", str(exp_file), "--force", "dino_feature", "--no-prefect", "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'dino_feature' (did you mean 'dino_features'?)" in err
    assert "text_embeddings, sam_masks, dino_features, clip_layers" in err


def test_an_image_folder_without_images_is_a_usage_error_naming_what_it_holds(tmp_path, capsys):
    empty = tmp_path / "photos"
    (empty / "notes").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    exp = tiny_experiment(tmp_path / "store", datasets=[{"name": "mine", "layout": "folder", "root": str(empty),
                                                         "classes": ["sky", "tree"]}],
                          methods=[{"name": "clip", "method": "clip"}])
    exp_file = tmp_path / "e.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["run", str(exp_file), "--no-prefect", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"dataset 'mine': no images found under {empty} (layout 'folder'); {empty} holds: notes/, readme.txt" in err
    assert main(["ingest", str(empty), "--layout", "folder", "--store", str(tmp_path / "s"), "-q"]) == 2
    assert "holds: notes/, readme.txt" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_stage_without_its_inputs_is_incomplete(tmp_path, capsys):
    exp = tiny_experiment(tmp_path / "store", methods=[{"name": "scclip", "method": "scclip"}], text_templates="single")
    exp_file = tmp_path / "e.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["stage", "reconstruction", str(exp_file), "--no-prefect", "-q"]) == 3
    out = capsys.readouterr().out
    assert "its text_embeddings output is missing" in out and "0 outputs computed" in out


def test_dry_run_writes_nothing(done, tmp_path, capsys):
    exp_file, store = done
    before = _tree(store)
    assert main(["run", str(exp_file), "--dry-run", "--set", "methods.0.logit_scale=60", "--force", "scoring"]) == 0
    out = capsys.readouterr().out
    assert "nothing was written" in out and "to compute" in out
    assert _tree(store) == before
    fresh = tmp_path / "fresh"
    assert main(["run", str(exp_file), "--dry-run", "--store", str(fresh)]) == 0
    assert not fresh.exists()


def test_dry_run_does_not_need_weight_files(done, tmp_path, capsys):
    exp_file, _ = done
    assert main(["run", str(exp_file), "--dry-run", "--set", "models.clip=clip:ViT-B-16@openai",
                 "--set", f"models.weights_dir={tmp_path}"]) == 0
    assert "missing: weights of clip:ViT-B-16@openai" in capsys.readouterr().out


def test_runs_lists_wall_time_and_overrides_from_the_journal(done, capsys):
    exp_file, store = done
    assert main(["runs", "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[0], next(ln for ln in out if " tiny " in ln)
    (journal,) = [r.data for r in Store(store).runs()[0] if r.data.get("overrides") == ["runner.batch_size=1"]]
    wall = journal["ended"] - journal["started"]
    assert wall > 0  # the journal's own start and end, never the 0 s of per-stage rows
    cells = row.split()
    assert f"{wall:.0f}s" in cells and "complete" in cells
    assert row[header.index("overrides"):].strip() == "runner.batch_size=1"
    assert journal["experiment_files"] == [str(exp_file)]


def test_report_of_an_unknown_experiment_lists_the_stored_ones(done, tmp_path, capsys):
    _, store = done
    assert main(["report", "--store", str(store), "--experiment", "tiyn", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no scores of experiment 'tiyn' (did you mean 'tiny'?)" in err and "experiments with scores: tiny" in err
    assert not (tmp_path / "r").exists()


def test_runs_failures_of_an_unknown_run_lists_recent_runs(done, capsys):
    _, store = done
    assert main(["runs", "--failures", "nope", "--store", str(store)]) == 2
    (run,) = [r.run_id for r in Store(store).runs()[0]][:1]
    assert run in capsys.readouterr().err


def test_set_changes_only_the_keys_it_touches_and_a_bad_one_names_the_override(done, capsys):
    exp_file, _ = done
    assert main(["run", str(exp_file), "--dry-run", "--set", "methods.0.logit_scale=60"]) == 0
    plan = {cols[1]: cols[3:5] for cols in (ln.split() for ln in capsys.readouterr().out.splitlines()[2:]) if cols}
    # a new logit scale is a new reconstruction key (and scoring downstream); the CLIP dump and text stay cached
    assert plan["clip_layers"] == ["0", "2"] and plan["text_embeddings"] == ["0", "1"]
    assert plan["reconstruction"] == ["2", "0"] and plan["scoring"] == ["2", "0"]
    assert main(["run", str(exp_file), "--dry-run", "--set", "methods.0.logit_scal=50"]) == 2
    err = capsys.readouterr().err
    assert "methods.0.logit_scal: unknown key (did you mean 'logit_scale'?)" in err
    assert "[set by override 'methods.0.logit_scal=50']" in err


@pytest.mark.slow
def test_segment_without_a_prefect_server_starts_none_and_reports_its_overhead(tmp_path):
    """No Prefect API configured: no server, no flow; the command reports its wall and stage time (the <= 5 s
    overhead target is measured by docs/cli.md's command, not asserted here: timings are not tests)."""
    img = SAMPLE / "ade20k-sample" / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg"
    script = f"""
import sys
import time
from flows.cli import main
rc = main(["segment", {str(img)!r}, "--classes", "sky; building, house; tree; road", "--clip", "clip:tiny@random:0",
           "--dino", "dino:tiny8@random:0", "--regions", "slic", "--store", {str(tmp_path / "store")!r},
           "--out", {str(tmp_path / "overlay.png")!r}, "-q"])
print("RC", rc, sorted(m for m in sys.modules if m.startswith(("prefect.server", "prefect.testing"))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "RC 0 []" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("done in "))
    total, stages = float(line.split()[2]), float(line.split("(")[1].split()[0])
    assert 0 < stages < total, line
    assert (tmp_path / "overlay_labels.png").is_file()
    assert not list(tmp_path.glob("prefect-home/*.db"))


def test_a_missing_dataset_root_is_a_usage_error_naming_it_and_creates_no_store(tmp_path, capsys):
    gone = tmp_path / "no-such-data"
    base = tiny_experiment(tmp_path / "store")
    exp = tiny_experiment(tmp_path / "store", datasets=[{**base.datasets[0].model_dump(), "root": str(gone)}])
    exp_file = tmp_path / "e.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    for argv in (["--no-prefect"], [], ["--dry-run"]):  # without Prefect, as a flow run, and its dry run
        assert main(["run", str(exp_file), "-q", *argv]) == 2
        err = capsys.readouterr().err
        assert f"dataset 'voc' (datasets[0].root = {gone}): the dataset root does not exist" in err
        assert "Fix datasets[0].root in the experiment file, or pass --set datasets.0.root=PATH" in err
        assert "Traceback" not in err
        assert not (tmp_path / "store").exists()  # a bad plan touches no store


def test_a_store_path_under_a_file_fails_cleanly_without_rewriting_anything(tmp_path, capsys, caplog):
    (tmp_path / "afile").write_text("not a folder")
    exp = tiny_experiment(tmp_path / "afile" / "store")
    exp_file = tmp_path / "e.yaml"
    exp_file.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["run", str(exp_file), "--no-prefect", "-q"]) == 2
    err = capsys.readouterr().err + caplog.text
    assert f"cannot open the store {tmp_path / 'afile' / 'store'}: NotADirectoryError" in err
    assert "unreadable" not in err and "rewriting" not in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_gc_budget_and_age_without_experiment_files_keep_the_newest_run(done, tmp_path, capsys):
    import shutil

    _, store = done
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    sets = set(Store(copy).stage_sets())
    time.sleep(1.1)  # every set was last used more than 1 s ago
    for argv in (["--max-bytes", "1"], ["--older-than", "1"]):
        assert main(["cache", "gc", "--store", str(copy), *argv]) == 0
        assert set(Store(copy).stage_sets()) == sets  # the newest run of the experiment keeps all of its outputs
    assert "over the budget of 1 B" in capsys.readouterr().out
    assert main(["cache", "gc", "--store", str(copy), "--older-than", "1", "--only-experiments"]) == 0
    assert Store(copy).stage_sets() == []  # asked for explicitly: nothing but live runs is protected
