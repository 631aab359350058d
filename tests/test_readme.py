"""The README's API example and first experiment run as written, and the README's links point at files that exist."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.slow  # builds a real-size CLIP ViT-B/16 (random weights)
def test_the_api_example_runs_as_written():
    section = README[README.index("## API"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    namespace: dict = {}
    exec(compile(code, "README.md (API)", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert tuple(namespace["feats"].shape) == (1, 14, 14, 512)
    assert tuple(namespace["labels"].shape) == (1, 224, 224) and int(namespace["labels"].max()) <= 2


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\]\(((?:docs|configs)/[^)#]*)", README))))
def test_readme_links_exist(target):
    assert (REPO / target).exists(), target


FIRST = README[README.index("## Your first experiment"):README.index("## Commands")]
FIRST_YAML = re.findall(r"```yaml\n(.*?)```", FIRST, flags=re.S)[0]
FIRST_COMMANDS = re.findall(r"```bash\n(.*?)```", FIRST, flags=re.S)[0]


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, trailing comments dropped, ``source`` (venv activation) skipped."""
    out, line = [], ""
    for raw in block.splitlines():
        line += raw.rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        cmd = re.sub(r"\s+#.*$", "", line).strip()
        line = ""
        if cmd and not cmd.startswith("source "):
            out.append(cmd)
    return out


def test_the_first_experiment_is_the_shipped_file():
    shipped = (REPO / "configs" / "first.yaml").read_text()
    assert "".join(ln for ln in shipped.splitlines(keepends=True) if not ln.startswith("#")) == FIRST_YAML
    assert "@random" in FIRST_YAML and "meaningless" in FIRST  # random weights, said so


def test_the_first_experiment_dry_run_plans_the_sample(monkeypatch, capsys):
    from flows.cli import main

    dry = _commands(FIRST_COMMANDS)[0]
    assert dry == "ovseg run configs/first.yaml --dry-run"
    monkeypatch.chdir(REPO)
    assert main(shlex.split(dry)[1:]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    todo = {(r[0], r[1]): int(r[3]) for r in rows if len(r) >= 5 and r[0] in ("street", "voc21-sample")}
    assert todo[("street", "reconstruction")] == 2 and todo[("voc21-sample", "scoring")] == 4


@pytest.mark.slow  # the README's commands, each a process of its own: about 4 minutes on 2 cores
def test_the_first_experiment_runs_as_written_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "examples", clone / "examples")
    (clone / "configs").mkdir()
    shutil.copy(REPO / "configs" / "first.yaml", clone / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    outputs = {}
    for cmd in _commands(FIRST_COMMANDS):
        done = subprocess.run(cmd, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs[cmd] = done.stdout
    tau = next(out for cmd, out in outputs.items() if "--set methods.1.params.tau=2.5" in cmd)
    recomputed = {r[1] for r in (ln.split() for ln in tau.splitlines()) if len(r) > 5 and r[0] in ("street", "voc21-sample")
                  and r[4].isdigit() and int(r[4]) > 0}
    assert recomputed == {"reconstruction", "map_correction", "scoring"}
    assert len(list((clone / "labels" / "street" / "corrclip").glob("*.png"))) == 2
    report = (clone / "report" / "index.html").read_text(encoding="utf-8")
    assert "first — street" in report and "has no ground truth" in report and "RANDOM WEIGHTS" in report
    assert (clone / "overlay.png").is_file() and (clone / "overlay_labels.png").is_file()
