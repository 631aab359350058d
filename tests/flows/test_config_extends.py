"""``extends:`` between experiment files: deep merge, list replacement, paths per file, cycles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import ExperimentError, load_experiment, parse_experiment

BASE = {
    "name": "base",
    "store": "store",
    "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": "data/voc"}],
    "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "weights_dir": "weights"},
    "regions": {"source": "slic", "params": {"n_segments": 40, "compactness": 10.0}},
    "methods": [{"name": "corrclip", "method": "corrclip"}, {"name": "scclip", "method": "scclip"}],
    "runner": {"kind": "local", "workers": 2},
}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_child_wins_mappings_merge_lists_replace(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {
        "extends": "base.yaml",
        "name": "child",
        "models": {"clip": "clip:ViT-B-16@random:1"},
        "regions": {"params": {"n_segments": 80}},
        "methods": [{"name": "tau3", "method": "corrclip", "params": {"tau": 3.0}}],
    })
    exp = load_experiment(child)
    assert exp.name == "child"
    assert exp.models.clip == "clip:ViT-B-16@random:1"
    assert exp.models.dino == "dino:tiny8@random:0"  # kept from the base
    assert exp.regions.source == "slic"
    assert exp.regions.params == {"n_segments": 80, "compactness": 10.0}
    assert [m.name for m in exp.methods] == ["tau3"]  # list replaced whole
    assert exp.runner.workers == 2
    assert exp.provenance.files == (str(child.resolve()), str((tmp_path / "base.yaml").resolve()))


def test_delete_replaces_an_inherited_mapping(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "regions": {"_delete_": True, "source": "sam"}})
    assert load_experiment(child).regions.params == {}
    bad = write(tmp_path / "bad.yaml", {"extends": "base.yaml", "regions": {"_delete_": "yes"}})
    with pytest.raises(ExperimentError, match=r"bad\.yaml: regions\._delete_ must be true or false, got 'yes'"):
        load_experiment(bad)


def test_chains_and_several_bases(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", BASE)
    write(tmp_path / "b.yaml", {"extends": "a.yaml", "runner": {"workers": 3}, "device": "cuda"})
    write(tmp_path / "extra.yaml", {"device": "cpu", "window_batch": 2})
    top = write(tmp_path / "c.yaml", {"extends": ["b.yaml", "extra.yaml"], "name": "c"})
    exp = load_experiment(top)
    assert (exp.name, exp.runner.workers, exp.device, exp.window_batch) == ("c", 3, "cpu", 2)  # later base wins
    assert exp.runner.kind == "local"
    assert [Path(f).name for f in exp.provenance.files] == ["c.yaml", "b.yaml", "a.yaml", "extra.yaml"]


def test_relative_paths_resolve_against_the_file_that_wrote_them(tmp_path: Path) -> None:
    base_dir = tmp_path / "shared"
    write(base_dir / "base.yaml", BASE)
    child = write(tmp_path / "exps" / "child.yaml", {
        "extends": "../shared/base.yaml",
        "datasets": [{"name": "mine", "layout": "folder", "root": "imgs", "gt_dir": "gt", "classes": ["cat"]}],
    })
    exp = load_experiment(child)
    assert exp.datasets[0].root == str((tmp_path / "exps" / "imgs").resolve())
    assert exp.datasets[0].gt_dir == str((tmp_path / "exps" / "gt").resolve())
    assert exp.store == str((base_dir / "store").resolve())
    assert exp.models.weights_dir == str((base_dir / "weights").resolve())


def test_cycles_are_detected_and_named(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", dict(BASE, extends="b.yaml"))
    write(tmp_path / "b.yaml", {"extends": "c.yaml"})
    write(tmp_path / "c.yaml", {"extends": "a.yaml"})
    a, b, c = (str((tmp_path / f"{n}.yaml").resolve()) for n in "abc")
    with pytest.raises(ExperimentError, match=rf"extends cycle: {a} -> {b} -> {c} -> {a}"):
        load_experiment(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", dict(BASE, extends="self.yaml"))
    with pytest.raises(ExperimentError, match=r"extends cycle: .*self\.yaml -> .*self\.yaml"):
        load_experiment(tmp_path / "self.yaml")


def test_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", BASE)
    write(tmp_path / "l.yaml", {"extends": "root.yaml", "device": "cuda"})
    write(tmp_path / "r.yaml", {"extends": "root.yaml", "window_batch": 7})
    exp = load_experiment(write(tmp_path / "top.yaml", {"extends": ["l.yaml", "r.yaml"]}))
    assert (exp.device, exp.window_batch) == ("cuda", 7)


def test_extends_errors(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", {"extends": "missing.yaml"})
    with pytest.raises(ExperimentError, match=r"missing\.yaml not found \(extended by .*child\.yaml\)"):
        load_experiment(child)
    bad = write(tmp_path / "bad.yaml", {"extends": 3})
    with pytest.raises(ExperimentError, match="extends must be a file path or a list of them, got 3"):
        load_experiment(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ExperimentError, match="the top level must be a mapping, got list"):
        load_experiment(write(tmp_path / "c2.yaml", {"extends": "list.yaml"}))
    with pytest.raises(ExperimentError, match="extends is resolved when reading files; use load_experiment"):
        parse_experiment(dict(BASE, extends="x.yaml"))
    with pytest.raises(ExperimentError, match="provenance is recorded by ovseg; remove the key"):
        load_experiment(write(tmp_path / "p.yaml", dict(BASE, provenance={"files": []})))


def test_a_partial_base_error_names_the_missing_key(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", {"models": {"clip": "clip:tiny"}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "x"})
    with pytest.raises(ExperimentError, match=r"invalid experiment .*child\.yaml \(extends .*base\.yaml\):\n  datasets: Field required"):
        load_experiment(child)


def test_a_dumped_experiment_is_a_valid_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    exp = load_experiment(write(tmp_path / "child.yaml", {"extends": "base.yaml"}), overrides=["device=cuda"])
    dumped = exp.model_dump(mode="json")
    assert "provenance" not in dumped
    again = load_experiment(write(tmp_path / "dumped.yaml", dumped))
    assert again.model_dump() == exp.model_dump()
    assert again.provenance.files == (str((tmp_path / "dumped.yaml").resolve()),) and again.provenance.overrides == ()
