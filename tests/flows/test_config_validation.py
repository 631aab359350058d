"""Experiment-file validation: did-you-mean errors, class-list syntax, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import ExperimentError, load_experiment, parse_experiment

DATASET = {"name": "voc", "spec": "VOC21", "layout": "voc", "root": "data/voc"}
RAW = {"name": "exp", "datasets": [DATASET], "methods": [{"name": "a", "method": "corrclip"}]}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def custom(classes) -> dict:
    return dict(RAW, datasets=[{"name": "mine", "layout": "folder", "root": "imgs", "classes": classes}])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (dict(RAW, dataset=[DATASET]), r"  dataset: unknown key \(did you mean 'datasets'\?\); valid keys here: name, store, datasets"),
        (dict(RAW, models={"weight_dir": "w"}), r"models\.weight_dir: unknown key \(did you mean 'weights_dir'\?\)"),
        (dict(RAW, methods=[{"name": "a", "method": "corrclip", "windw": {}}]), r"methods\.0\.windw: unknown key \(did you mean 'window'\?\)"),
        (dict(RAW, methods=[{"name": "a", "method": "corrclip", "tau": 3}]),
         r"methods\.0\.tau: unknown key \(method parameters go under params: methods\.0\.params\.tau\)"),
        # map correction is set in one place, the method's params (a CorrCLIPConfig field)
        (dict(RAW, methods=[{"name": "a", "method": "corrclip", "map_correction": False}]),
         r"methods\.0\.map_correction: unknown key \(method parameters go under params: "
         r"methods\.0\.params\.map_correction\)"),
        (dict(RAW, methods=[{"name": "a", "method": "sc-clip"}]),
         r"methods\.0\.method: .*unknown method 'sc-clip' \(did you mean 'scclip'\?\); valid methods: corrclip, scclip"),
        (dict(RAW, methods=[{"name": "a", "method": "corrclip", "classes": "scclp"}]),
         r"methods\.0\.classes: unknown class-file variant 'scclp' \(did you mean 'scclip'\?\)"),
        (dict(RAW, datasets=[dict(DATASET, spec="ADE20")]), r"datasets\.0\.spec: unknown dataset spec 'ADE20' \(did you mean 'ADE20K'\?\); valid specs: VOC21"),
        (dict(RAW, datasets=[dict(DATASET, layout="pascal-context")]), r"datasets\.0\.layout: 'pascal-context' is not allowed \(did you mean 'pascal_context'\?\)"),
        (dict(RAW, text_templates="imagenet"), r"text_templates: 'imagenet' is not allowed \(did you mean 'imagenet80'\?\); choose one of imagenet80, single"),
        (dict(RAW, regions={"source": "slick"}), r"regions\.source: 'slick' is not allowed \(did you mean 'slic'\?\)"),
        (dict(RAW, runner={"kind": "slurm"}), r"runner\.kind: 'slurm' is not allowed; choose one of local, dask"),
    ],
)
def test_errors_suggest_the_valid_name(raw: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(raw)


def test_dataset_spec_is_case_insensitive() -> None:
    assert parse_experiment(dict(RAW, datasets=[dict(DATASET, spec="voc21")])).datasets[0].spec == "voc21"


def test_class_list_and_class_string_give_the_same_lines() -> None:
    expected = ["cat", "dog, puppy", "grass"]
    from_list = parse_experiment(custom(["cat", "dog,puppy", " grass "])).datasets[0].classes
    from_string = parse_experiment(custom("cat; dog, puppy; grass")).datasets[0].classes
    assert from_list == expected and from_string == expected
    assert parse_experiment(custom("cat; dog;")).datasets[0].classes == ["cat", "dog"]  # trailing ';' as in the CLI


def test_class_string_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: e\ndatasets:\n  - {name: mine, layout: folder, root: imgs, classes: 'cat; dog, puppy'}\n"
                    "methods: [{name: a, method: scclip}]\n")
    assert load_experiment(path).datasets[0].classes == ["cat", "dog, puppy"]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["cat", ""], r"datasets\.0\.classes: dataset 'mine': classes\[1\] '' has an empty class name or synonym"),
        (["cat", "dog,,puppy"], r"dataset 'mine': classes\[1\] 'dog,,puppy' has an empty class name or synonym"),
        (["cat", "dog, "], r"classes\[1\] 'dog, ' has an empty class name"),
        (["cat; dog"], r"classes\[0\] 'cat; dog' contains ';': a list takes one class per entry"),
        (["cat", 3], r"classes\[1\] must be a string \(synonyms comma-separated\), got 3"),
        ([], r"dataset 'mine': classes is empty; list at least one class or remove the key"),
        ("cat;; dog", r"dataset 'mine': class 2 of 'cat;; dog' is empty"),
        ("cat; dog,, puppy", r"dataset 'mine': class 2: empty class name in ' dog,, puppy'"),
        ("  ", r"dataset 'mine': no classes in vocabulary string"),
    ],
)
def test_empty_class_names_are_rejected(classes, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(custom(classes))


def test_weights_dir_store_and_roots_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    path = write(tmp_path / "cfg" / "exp.yaml", dict(
        RAW, store="st", models={"weights_dir": "../weights"},
        datasets=[{"name": "mine", "layout": "folder", "root": "imgs", "gt_dir": "gt", "classes": ["cat"]}]))
    monkeypatch.chdir(tmp_path)  # not the file's folder
    exp = load_experiment(path)
    assert exp.models.weights_dir == str((tmp_path / "weights").resolve())
    assert exp.store == str((tmp_path / "cfg" / "st").resolve())
    assert exp.datasets[0].root == str((tmp_path / "cfg" / "imgs").resolve())
    assert exp.datasets[0].gt_dir == str((tmp_path / "cfg" / "gt").resolve())


def test_absolute_paths_and_store_urls_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", dict(RAW, store="s3://bucket/store", models={"weights_dir": "/opt/w/"}))
    exp = load_experiment(path)
    assert exp.store == "s3://bucket/store"
    assert exp.models.weights_dir == "/opt/w/"


def test_home_is_expanded_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    raw = dict(RAW, store="~/store", models={"weights_dir": "~/weights"},
               datasets=[{"name": "mine", "layout": "folder", "root": "~/imgs", "gt_dir": "~/gt", "classes": ["cat"]}])
    for exp in (parse_experiment(raw), load_experiment(write(tmp_path / "exp.yaml", raw))):
        assert exp.store == str(home / "store")
        assert exp.models.weights_dir == str(home / "weights")
        assert (exp.datasets[0].root, exp.datasets[0].gt_dir) == (str(home / "imgs"), str(home / "gt"))
    (home / "cfg").mkdir(parents=True)
    write(home / "cfg" / "exp.yaml", RAW)
    assert load_experiment("~/cfg/exp.yaml").datasets[0].root == str((home / "cfg" / "data" / "voc").resolve())


def test_parse_without_base_dir_keeps_relative_paths() -> None:
    assert parse_experiment(RAW).datasets[0].root == "data/voc"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=r"nope\.yaml not found; see configs/ for examples"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ExperimentError, match=r"bad\.yaml is not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")


def test_model_dump_round_trips() -> None:
    exp = parse_experiment(custom("cat; dog, puppy"))
    assert parse_experiment(exp.model_dump()) == exp
