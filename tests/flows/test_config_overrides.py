"""KEY=VALUE overrides on experiment files (flows.config.apply_overrides / load_experiment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import ExperimentError, apply_overrides, load_experiment, parse_override

RAW = {
    "name": "exp",
    "datasets": [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": "data/voc"}],
    "methods": [{"name": "a", "method": "corrclip"}, {"name": "b", "method": "scclip", "params": {"beta": 1.2}}],
}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_values_are_yaml() -> None:
    assert parse_override("methods.0.params.tau=3") == (("methods", "0", "params", "tau"), 3)
    assert parse_override("x=[a, b]") == (("x",), ["a", "b"])
    assert parse_override("x=null") == (("x",), None)
    assert parse_override("x=true") == (("x",), True)
    assert parse_override("x=0.25") == (("x",), 0.25)
    assert parse_override("x=1e-3") == (("x",), 0.001)  # YAML 1.1 alone would give the string '1e-3'
    assert parse_override("x=''") == (("x",), "")
    assert parse_override("x=cat; dog, puppy") == (("x",), "cat; dog, puppy")
    assert parse_override("x=a=b") == (("x",), "a=b")  # split at the first '='


def test_apply_sets_nested_keys_list_items_and_creates_mappings() -> None:
    out = apply_overrides(RAW, ["methods.0.params.tau=3", "datasets.0.limit=5", "methods.1.params.beta=2",
                                "runner.workers=2", "methods.1.window.crop=224"])
    assert out["methods"][0]["params"] == {"tau": 3}
    assert out["methods"][1]["params"] == {"beta": 2}
    assert out["methods"][1]["window"] == {"crop": 224}
    assert out["datasets"][0]["limit"] == 5
    assert out["runner"] == {"workers": 2}
    assert "params" not in RAW["methods"][0] and RAW["methods"][1]["params"] == {"beta": 1.2}  # input untouched


def test_later_overrides_win_and_whole_lists_can_be_replaced() -> None:
    out = apply_overrides(RAW, ["methods=[{name: c, method: clip}]", "methods.0.name=d", "device=cuda", "device=cpu"])
    assert out["methods"] == [{"name": "d", "method": "clip"}]
    assert out["device"] == "cpu"


def test_null_on_the_way_becomes_a_mapping() -> None:
    out = apply_overrides(dict(RAW, models=None), ["models.weights_dir=/w"])
    assert out["models"] == {"weights_dir": "/w"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods.2.name=x", r"override 'methods\.2\.name=x': index 2 is out of range: methods has 2 entries \(0\.\.1\)"),
        ("name.first=x", r"override 'name\.first=x': name is a str \('exp'\), not a mapping or a list; set it directly"),
        ("datasets.0.root.x=1", r"datasets\.0\.root is a str"),
        ("methods.first.name=x", r"methods is a list; the part after it must be an index 0\.\.1, got 'first'"),
        ("methods.-1.name=x", r"must be an index"),
        ("tau3", r"override 'tau3': expected KEY=VALUE"),
        ("=3", r"expected KEY=VALUE"),
        ("methods..name=x", r"empty part in key 'methods\.\.name'"),
        ("name=", r"override 'name=': no value after '='; write name=null for None"),
        ("name=[a", r"the value is not valid YAML"),
        ("extends=base.yaml", r"'extends' cannot be overridden"),
        ("provenance.files=[]", r"'provenance' cannot be overridden"),
    ],
)
def test_bad_overrides_name_the_override(override: str, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        apply_overrides(RAW, [override])


def test_overrides_must_be_a_list_not_one_string() -> None:
    with pytest.raises(ExperimentError, match="got one string 'name=x'; wrap it in a list"):
        apply_overrides(RAW, "name=x")


def test_empty_list_index_error() -> None:
    with pytest.raises(ExperimentError, match=r"index 0 is out of range: runner\.x is empty"):
        apply_overrides(dict(RAW, runner={"x": []}), ["runner.x.0=1"])


def test_load_experiment_applies_and_records_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", RAW)
    overrides = ["methods.0.params.tau=3", "datasets.0.limit=5", "methods.1.prob_thd=0.3"]
    exp = load_experiment(path, overrides=overrides)
    assert exp.methods[0].params == {"tau": 3} and isinstance(exp.methods[0].params["tau"], int)
    assert exp.datasets[0].limit == 5
    assert exp.methods[1].prob_thd == 0.3
    assert exp.provenance.overrides == tuple(overrides)
    assert exp.provenance.files == (str(path.resolve()),)
    assert load_experiment(path).provenance.overrides == ()


def test_invalid_value_from_an_override_names_it(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", RAW)
    with pytest.raises(ExperimentError, match=r"datasets\.0\.limit: .*greater than or equal to 1 \[set by override 'datasets\.0\.limit=0'\]"):
        load_experiment(path, overrides=["datasets.0.limit=0"])
    with pytest.raises(ExperimentError, match=r"methods\.0\.parms: unknown key \(did you mean 'params'\?\).*\[set by override 'methods\.0\.parms\.tau=3'\]"):
        load_experiment(path, overrides=["methods.0.parms.tau=3"])


def test_relative_paths_in_overrides_resolve_against_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "work").mkdir()
    path = write(tmp_path / "configs" / "exp.yaml", RAW)
    monkeypatch.chdir(tmp_path / "work")
    exp = load_experiment(path, overrides=["datasets.0.root=voc2", "store=st", "models.weights_dir=w"])
    assert exp.datasets[0].root == str((tmp_path / "work" / "voc2").resolve())
    assert exp.store == str((tmp_path / "work" / "st").resolve())
    assert exp.models.weights_dir == str((tmp_path / "work" / "w").resolve())
    # paths written in the file still resolve against the file
    exp = load_experiment(path, overrides=["datasets.0.limit=1"])
    assert exp.datasets[0].root == str((tmp_path / "configs" / "data" / "voc").resolve())


def test_errors_elsewhere_are_not_blamed_on_an_override(tmp_path: Path) -> None:
    raw = dict(RAW, datasets=[{"name": "voc", "layout": "voc", "root": "data/voc"}])  # neither spec nor classes
    path = write(tmp_path / "exp.yaml", raw)
    with pytest.raises(ExperimentError, match=r"datasets\.0: give a dataset spec") as info:
        load_experiment(path, overrides=["datasets.0.limit=5"])
    assert "set by override" not in str(info.value)
