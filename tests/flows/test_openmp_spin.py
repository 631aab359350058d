"""The ``ovseg`` command sets GNU OpenMP's spin count before torch loads (flows/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Records GOMP_SPINCOUNT at the moment torch starts loading (libgomp reads it then), whoever imports it.
PROBE = """
import importlib.abc, os, sys
seen = []
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Probe())
import flows.cli  # what the ``ovseg`` entry point imports first
import torch  # loaded here at the latest (by the command that runs)
print(seen[0])
"""


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_spin_count_is_set_before_torch_loads():
    assert _probe() == "10000"


def test_a_spin_count_in_the_environment_is_kept():
    assert _probe(GOMP_SPINCOUNT="300000") == "300000"
