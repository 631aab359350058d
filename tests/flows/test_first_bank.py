"""configs/first-bank.yaml, the README's first memory bank: runs from a fresh clone's files with tiny random models."""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.cli import main
from flows.commands.bank import bank_rows
from storage.store import Store
from storage.tables import read_table

REPO = Path(__file__).resolve().parents[2]
CONFIG = "first-bank.yaml"


def _clone(tmp_path: Path) -> Path:
    """The files of a fresh clone that the experiment reads: the embedded data and the config."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "examples", clone / "examples")
    (clone / "configs").mkdir()
    shutil.copy(REPO / "configs" / CONFIG, clone / "configs")
    return clone


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every stored file but the key's last-use stamp (rewritten by each run that uses the key)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.name != "last-used.json"}


def test_the_first_bank_builds_serves_and_extends_from_a_clone(tmp_path, capsys):
    clone = _clone(tmp_path)
    exp_file = str(clone / "configs" / CONFIG)
    assert main(["run", exp_file, "--no-prefect"]) == 0
    assert "RANDOM" in capsys.readouterr().out.upper()
    store = Store(clone / "ovseg-store")
    (bank,) = bank_rows(store)
    # the bank's images: the first 8 JPEGs of the VOC sample folder, sorted by path (the config's limit)
    assert (bank["bank"], bank["images"], bank["kind"], bank["random_weights"]) == ("sample", 8, "flat", True)
    assert bank["regions"] > 8
    metrics = read_table(store, "metrics").to_pylist()
    assert {(m["dataset"], m["method"]) for m in metrics} == {("ade20k-sample", "v2-bank"), ("ade20k-sample", "v2")}
    assert all(m["random_weights"] for m in metrics)
    assert main(["bank", "ls", "--store", str(clone / "ovseg-store")]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[1].split()[:4] == ["sample", bank["key"], "8", str(bank["regions"])]
    assert "random-weight" in listing

    # the README's extension: raise the limit and rerun; the first 8 images' bank outputs are not rewritten
    values = clone / "ovseg-store" / "stages" / "bank_values"
    before = _files(values)
    assert main(["run", exp_file, "--no-prefect", "--set", "banks.0.limit=10"]) == 0
    grown = [r for r in bank_rows(store) if r["images"] == 10]
    assert len(grown) == 1 and grown[0]["regions"] > bank["regions"]
    after = _files(values)
    assert {f: after.get(f) for f in before} == before, "an old image's bank output was rewritten"
    assert len(after) > len(before)
