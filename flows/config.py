"""The experiment file (``ovseg run EXPERIMENT.yaml``), validated with pydantic.

Unknown keys and bad values are errors that name the key. One file may list several
datasets and several methods / parameter sets (a sweep); they share every upstream stage
whose key matches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("corrclip", "scclip", "clip", "maskclip", "clearclip", "corrclip+scclip")
LAYOUTS = ("folder", "voc", "pascal_context", "coco_object", "coco_stuff", "ade20k", "cityscapes", "camvid")


class ExperimentError(ValueError):
    """The experiment file is invalid; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetEntry(_Strict):
    """One dataset to process."""

    name: str = Field(description="label used in tables and reports, e.g. voc21-val")
    spec: str | None = Field(default=None, description="dataset spec (classes, presets, label conversion): VOC21, VOC20, PC60, PC59, COCO-Object, COCO-Stuff, ADE20K, Cityscapes, CamVid; None = custom vocabulary (classes)")
    classes: list[str] | None = Field(default=None, description="custom vocabulary: one class per entry, synonyms comma-separated (overrides the spec's class file)")
    background: bool = Field(default=False, description="with a custom vocabulary: class 0 is background (enables prob_thd)")
    layout: Literal["folder", "voc", "pascal_context", "coco_object", "coco_stuff", "ade20k", "cityscapes", "camvid"]
    root: str = Field(description="dataset root on disk (relative paths are relative to the experiment file)")
    split: str = "val"
    gt_dir: str | None = Field(default=None, description="ground-truth folder for the 'folder' layout")
    limit: int | None = Field(default=None, ge=1, description="process only the first N images (sorted by path)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("dataset name must be non-empty, without '/', not starting with '.'")
        return v

    @model_validator(mode="after")
    def _spec_or_classes(self) -> "DatasetEntry":
        if self.spec is None and not self.classes:
            raise ValueError("give a dataset spec (e.g. spec: VOC21) or a custom vocabulary (classes: [...])")
        return self


class ModelsEntry(_Strict):
    """Backbones (see README 'Backbones'); '@random[:seed]' builds random weights (scores meaningless)."""

    clip: str = "clip:ViT-B-16-quickgelu@metaclip_fullcc"
    dino: str = "dino:vitb8"
    sam: str = "sam:vit_b"
    weights_dir: str | None = Field(default=None, description="folder with checkpoints under their official names (default $OVSEG_WEIGHTS)")


class RegionsEntry(_Strict):
    """Region source for CorrCLIP: SAM automatic masks (paper) or weight-free superpixels."""

    source: Literal["sam", "slic", "felzenszwalb"] = "sam"
    params: dict[str, Any] = Field(default_factory=dict, description="SamRegionConfig / SuperpixelConfig fields")


class WindowEntry(_Strict):
    """Overrides of the dataset preset's resize and sliding window (None = preset)."""

    short_side: int | None = Field(default=None, ge=8)
    crop: int | None = Field(default=None, ge=8)
    stride: int | None = Field(default=None, ge=1)


class MethodEntry(_Strict):
    """One method and parameter set."""

    name: str = Field(description="label of this method run in tables and reports")
    method: Literal["corrclip", "scclip", "clip", "maskclip", "clearclip", "corrclip+scclip"]
    params: dict[str, Any] = Field(default_factory=dict, description="method config fields (CorrCLIPConfig / SCCLIPConfig / CombinedConfig)")
    classes: str | None = Field(default=None, description="class-file variant 'corrclip' | 'scclip' (default: the method's own)")
    clip: str | None = Field(default=None, description="override models.clip for this method")
    window: WindowEntry = Field(default_factory=WindowEntry)
    logit_scale: float | None = Field(default=None, gt=0)
    prob_thd: float | None = Field(default=None, ge=0, le=1, description="None = preset; only used on datasets with background")
    area_thd: float | None = Field(default=None, ge=0, le=1)
    map_correction: bool | None = Field(default=None, description="CorrCLIP map correction (None = config default)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("method name must be non-empty and without '/'")
        return v


class RunnerEntry(_Strict):
    """Where tasks run."""

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(default=1, ge=1, description="parallel tasks (threads for local; Dask workers for a temporary cluster)")
    address: str | None = Field(default=None, description="tcp://scheduler:8786 of an existing Dask cluster (kind: dask)")
    batch_size: int = Field(default=8, ge=1, description="images per Prefect task (one task per batch, never per image)")
    lease_ttl: float = Field(default=120.0, gt=0, le=3600, description="seconds without a heartbeat after which a "
                             "dead run's claim on its items expires (reruns never wait longer)")


class Experiment(_Strict):
    """A whole experiment: datasets x methods over one store."""

    name: str
    store: str | None = Field(default=None, description="store path or fsspec URL (default $OVSEG_STORE or ./ovseg-store)")
    datasets: list[DatasetEntry] = Field(min_length=1)
    models: ModelsEntry = Field(default_factory=ModelsEntry)
    regions: RegionsEntry = Field(default_factory=RegionsEntry)
    methods: list[MethodEntry] = Field(min_length=1)
    runner: RunnerEntry = Field(default_factory=RunnerEntry)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    feature_dtype: Literal["float16", "float32"] = Field(default="float16", description="dtype of stored features")
    window_batch: int = Field(default=4, ge=1, description="windows per backbone forward (memory bound)")
    text_templates: Literal["imagenet80", "single"] = Field(
        default="imagenet80", description="prompt templates: the papers' 80 ImageNet templates, or one (cheap CPU smoke runs only)")

    @field_validator("methods", "datasets")
    @classmethod
    def _unique_names(cls, v: list, info) -> list:
        names = [entry.name for entry in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{info.field_name[:-1]} names must be unique; repeated: {dup}")
        return v


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for valid files)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_experiment(data: dict[str, Any], source: str = "<dict>", base_dir: str | os.PathLike | None = None) -> Experiment:
    """Validate a mapping into an ``Experiment``; relative dataset roots resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ExperimentError(f"invalid experiment {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise ExperimentError(_format_errors(e, source)) from e
    if base_dir is not None:
        base = Path(base_dir)
        fixed = []
        for d in exp.datasets:
            upd = {}
            if not Path(d.root).is_absolute():
                upd["root"] = str((base / d.root).resolve())
            if d.gt_dir and not Path(d.gt_dir).is_absolute():
                upd["gt_dir"] = str((base / d.gt_dir).resolve())
            fixed.append(d.model_copy(update=upd) if upd else d)
        exp = exp.model_copy(update={"datasets": fixed})
        if exp.store and "://" not in exp.store and not Path(exp.store).is_absolute():
            exp = exp.model_copy(update={"store": str((base / exp.store).resolve())})
    return exp


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read and validate an experiment YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file {p} not found; see configs/ for examples")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"experiment file {p} is not valid YAML: {e}") from e
    return parse_experiment(data, source=str(p), base_dir=p.parent)
