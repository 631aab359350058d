"""The experiment file (``ovseg run EXPERIMENT.yaml``), validated with pydantic.

Unknown keys and bad values are errors that name the key (with a did-you-mean). One file may list several
datasets and several methods / parameter sets (a sweep); they share every upstream stage whose key matches. A
file may ``extends:`` other files (mappings deep-merged, the extending file wins, lists replaced whole), and
``KEY=VALUE`` overrides (``methods.0.params.tau=3``) are applied on top before validation. Relative paths
resolve against the file that wrote them (overrides: the current directory); ``~`` is expanded. Reference:
docs/experiment-files.md.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from flows.experiment_files import (  # noqa: F401 - re-exported (tests, docs)
    EXTENDS_KEY,
    ExperimentError,
    _read_file,
    apply_overrides,
    parse_override,
    resolve_paths,
)
from ovseg_core.datasets import DATASETS, FAMILY_MODELS, METHOD_VARIANTS
from ovseg_core.metrics import IGNORE_MODES
from ovseg_core.names import did_you_mean
from ovseg_core.vocabulary import parse_vocabulary_string
from storage.images import DEFAULT_MAX_PIXELS
from storage.layouts import LAYOUT_NAMES
from tasks.params import COMPUTE_DTYPES, FEATURE_DTYPES
from tasks.progress import PLAIN_PROGRESS_SECONDS
from tasks.stages import STAGES, check_persist, get_stage

Layout = Literal[LAYOUT_NAMES]  # type: ignore[valid-type] - the names of storage.layouts.LAYOUTS
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _class_lines(value: Any, dataset: str) -> Any:
    """``classes`` as canonical class lines ("dog, puppy"); a string uses the CLI syntax."""
    where = f"dataset {dataset!r}"
    if isinstance(value, str):
        try:
            vocab = parse_vocabulary_string(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return [", ".join(synonyms) for synonyms in vocab.classes]
    if not isinstance(value, (list, tuple)):
        return value  # pydantic reports the type
    if not value:
        raise ValueError(f"{where}: classes is empty; list at least one class or remove the key")
    lines = []
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise ValueError(f"{where}: classes[{i}] must be a string (synonyms comma-separated), got {entry!r}")
        if ";" in entry:
            raise ValueError(f"{where}: classes[{i}] {entry!r} contains ';': a list takes one class per entry "
                             "(or write all classes as one string 'cat; dog, puppy')")
        names = [part.strip() for part in entry.split(",")]
        if not all(names):
            raise ValueError(f"{where}: classes[{i}] {entry!r} has an empty class name or synonym; "
                             "separate synonyms with single commas")
        lines.append(", ".join(names))
    return lines


class DatasetEntry(_Strict):
    """One dataset to process."""

    name: str = Field(description="label used in tables and reports, e.g. voc21-val")
    spec: str | None = Field(default=None, description="dataset spec (classes, presets, label conversion): VOC21, VOC20, PC60, PC59, COCO-Object, COCO-Stuff, ADE20K, Cityscapes, CamVid, ADE847, PC459 (case-insensitive); None = custom vocabulary (classes)")
    classes: list[str] | None = Field(default=None, description="custom vocabulary: a list (one class per entry, synonyms comma-separated) or one string 'cat; dog, puppy; grass'; stored as class lines 'dog, puppy' (overrides the spec's class file)")
    background: bool = Field(default=False, description="with a custom vocabulary: class 0 is background (enables prob_thd)")
    layout: Layout
    root: str = Field(description="dataset root on disk (relative paths are relative to the experiment file)")
    split: str = "val"
    gt_dir: str | None = Field(default=None, description="ground-truth folder for the 'folder' layout (relative to the experiment file)")
    limit: int | None = Field(default=None, ge=1, description="process only the first N images (sorted by path)")
    max_pixels: int | None = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="images with more pixels are error rows of the manifest (null = no limit)")
    follow_symlinks: bool = Field(default=False, description="accept images and split entries whose real path leaves root (symlinks, ../)")
    strict_labels: bool = Field(default=False, description="ground-truth labels outside the class range are an error instead of being dropped as MMSegmentation does")
    ignore_mode: Literal[IGNORE_MODES] = Field(default="reference", description="ground-truth value scoring ignores: 'reference' = 255 on every dataset, as the authors' evaluator (on ADE847 / PC459 real class 255 is dropped and unlabelled 65535 pixels count in the union); 'unlabelled' = the dataset's own unlabelled value (ADE847 / PC459: 65535; class 255 scored)")  # type: ignore[valid-type]

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("dataset name must be non-empty, without '/', not starting with '.'")
        return v

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in {k.lower() for k in DATASETS}:
            raise ValueError(f"unknown dataset spec {v!r}{did_you_mean(v, DATASETS)}; valid specs: {', '.join(DATASETS)}")
        return v

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_ok(cls, v: Any, info: ValidationInfo) -> Any:
        return None if v is None else _class_lines(v, str(info.data.get("name", "?")))

    @model_validator(mode="after")
    def _spec_or_classes(self) -> "DatasetEntry":
        if self.spec is None and not self.classes:
            raise ValueError("give a dataset spec (e.g. spec: VOC21) or a custom vocabulary (classes: [...])")
        return self


class ModelsEntry(_Strict):
    """Backbones (see README 'Backbones'); '@random[:seed]' builds random weights (scores meaningless)."""

    clip: str | None = Field(default=None, description=f"CLIP of every method; None: each method's paper default, {FAMILY_MODELS['corrclip'].clip} (CorrCLIP's; SC-CLIP and the baselines too) or for corrclipv2 {FAMILY_MODELS['corrclipv2'].clip} (ovseg_core.datasets.FAMILY_MODELS)")
    dino: str = FAMILY_MODELS["corrclip"].dino
    sam: str = FAMILY_MODELS["corrclip"].sam
    vfm: str | None = Field(default=None, description=f"VFM of CorrCLIPv2's correlation (vfm_features stage); None: {FAMILY_MODELS['corrclipv2'].vfm} (C-RADIOv3-L, the authors' default)")
    vfm_max_side: int | None = Field(default=None, ge=1, description="cap on an image's longer side before the VFM's own resize (huge images); None: native resolution, as the reference")
    sam2: str = Field(default="sam2:hiera_l", description="SAM 2 backbone (regions.source: sam2); the CorrCLIP reference's on-the-fly generator is hiera_l")
    dino_pos: Literal["dino", "timm"] = Field(default="dino", description="DINO position-embedding interpolation: 'dino' = DINO's own (g + 0.1) / G bicubic rule (reference), 'timm' = timm's resize")
    weights_dir: str | None = Field(default=None, description="folder with checkpoints under their official names, relative to the experiment file (default $OVSEG_WEIGHTS)")


class RegionsEntry(_Strict):
    """Region source for CorrCLIP: SAM / SAM 2 automatic masks, pre-generated mask files, or weight-free superpixels."""

    source: Literal["sam", "sam2", "files", "slic", "felzenszwalb"] = "sam"
    params: dict[str, Any] = Field(default_factory=dict, description="SamRegionConfig / Sam2RegionConfig / SuperpixelConfig fields; for files: dir (relative to the experiment file), pattern ('{stem}.npz' or '{stem}.png'), key ('instance_mask')")


class WindowEntry(_Strict):
    """Overrides of the dataset preset's resize and sliding window (None = preset)."""

    short_side: int | None = Field(default=None, ge=8)
    crop: int | None = Field(default=None, ge=8)
    stride: int | None = Field(default=None, ge=1)


class MethodEntry(_Strict):
    """One method and parameter set."""

    name: str = Field(description="label of this method run in tables and reports")
    method: str = Field(description="registered method (ovseg_core.methods.METHODS): corrclip, scclip, clip, maskclip, clearclip, corrclip+scclip, corrclipv2")
    params: dict[str, Any] = Field(default_factory=dict, description="method config fields (CorrCLIPConfig / SCCLIPConfig / CombinedConfig)")
    classes: str | None = Field(default=None, description="class-file variant 'corrclip' | 'scclip' | 'corrclipv2' (default: the method's own)")
    clip: str | None = Field(default=None, description="override models.clip for this method")
    vfm: str | None = Field(default=None, description="override models.vfm for this method (corrclipv2)")
    window: WindowEntry = Field(default_factory=WindowEntry)
    logit_scale: float | None = Field(default=None, gt=0)
    prob_thd: float | None = Field(default=None, ge=0, le=1, description="None = preset; only used on datasets with background")
    area_thd: float | None = Field(default=None, ge=0, le=1)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("method name must be non-empty and without '/'")
        return v

    @field_validator("method")
    @classmethod
    def _method_ok(cls, v: str) -> str:
        from ovseg_core.methods import get_method  # torch: only validating a file imports it, not every command

        get_method(v)  # the registry is the only source of method names; its error suggests the closest
        return v

    @field_validator("classes")
    @classmethod
    def _variant_ok(cls, v: str | None) -> str | None:
        if v is not None and v not in METHOD_VARIANTS:
            raise ValueError(f"unknown class-file variant {v!r}{did_you_mean(v, METHOD_VARIANTS)}; "
                             f"choose one of {', '.join(METHOD_VARIANTS)}")
        return v


class ImportedBank(_Strict):
    """The authors' prebuilt bank files (``ovseg bank import EXPERIMENT``)."""
    values: list[str] = Field(min_length=1, max_length=2, description="{bank}_{encoder}.pt stores: main CLIP, optionally DMCE's auxiliary")
    index: str = Field(description="{bank}_{vfm}.faiss")


class BankEntry(_Strict):
    """A memory bank (CorrCLIPv2 VISR): unlabeled images whose regions get CLIP values and VFM keys (docs/banks.md)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="the bank's name (letters, digits, - and _); a corrclipv2 method uses it with params.bank")
    root: str | None = Field(default=None, description="folder of the bank's images (relative to the experiment file)")
    imported: ImportedBank | None = Field(default=None, description="the authors' files instead of images (ovseg bank import)")
    layout: Layout = "folder"
    split: str = "train"
    limit: int | None = Field(default=None, ge=1, description="only the first N images (sorted by path)")
    max_pixels: int | None = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    regions: RegionsEntry | None = Field(default=None, description="region source of the bank's images; None: the experiment's regions")
    clips: list[str] | None = Field(default=None, min_length=1, max_length=2, description="value stores: the main CLIP, optionally DMCE's auxiliary CLIP (the authors': clip:ViT-B-16@dfn2b, DFN2B-CLIP ViT-B/16); None: [models.clip], else the authors' pair (CorrCLIPv2's CLIP and DFN2B)")
    vfm: str | None = Field(default=None, description="VFM of the keys; None: models.vfm or CorrCLIPv2's")
    window: WindowEntry = Field(default_factory=lambda: WindowEntry(short_side=448, crop=336, stride=112), description="the values' CorrCLIP windows (the authors' bank: 448 / 336 / 112)")
    index: dict[str, Any] = Field(default_factory=dict, description="ovseg_core.bank.config.IndexConfig fields (kind: ivfpq | flat | hnsw, nlist_factor, pq_m, ...; checked by flows.bank_graph)")
    empty_region: Literal["nan", "zero"] = Field(default="nan", description="an empty region's rows: NaN (reference) or zero")
    batch_size: int | None = Field(default=None, ge=1, description="images per batch of the bank's stages; None: the larger of 32 (flows.bank_graph.BANK_BATCH_SIZE) and runner.batch_size (docs/banks.md, 'Batch size of a bank')")
    persist: dict[str, bool] = Field(default_factory=dict, description="per intermediate stage of the bank (dino_features, clip_layers, vfm_features, mask_clustering, mask_class_tokens): true = store it; by default they are computed in memory and not stored, and the experiment's persist applies on top (docs/banks.md, 'What a bank stores'); regions, values, keys and index are always stored")
    _persist_ok = field_validator("persist")(lambda v: check_persist(v, bank=True))

    @model_validator(mode="after")
    def _root_or_imported(self) -> "BankEntry":
        if (self.root is None) == (self.imported is None):
            raise ValueError(f"bank {self.name!r}: give root (a folder of images) or imported (the authors' files)")
        return self


class RunnerEntry(_Strict):
    """Where tasks run."""

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(default=1, ge=1, description="parallel tasks (threads for local; Dask workers for a temporary cluster)")
    address: str | None = Field(default=None, description="tcp://scheduler:8786 of an existing Dask cluster (kind: dask)")
    batch_size: int = Field(default=8, ge=1, description="images per Prefect task (one task per batch, never per image)")
    lease_ttl: float = Field(default=120.0, gt=0, le=3600, description="seconds without a heartbeat after which a dead run's claim on its items expires (reruns never wait longer)")
    fuse: bool = Field(default=True, description="run a dataset's per-image stages as one chain per batch of images "
                       "(each image decoded once, outputs passed in memory and stored as stage by stage); false: "
                       "stage by stage, one batch task per stage")
    progress_seconds: float = Field(default=PLAIN_PROGRESS_SECONDS, ge=0, le=86400,
                                    description="seconds between the progress lines (done / total, rate, elapsed, "
                                    "time left, ETA) of a stage or a fused chain when stderr is not a terminal (a log "
                                    "file); 0: after every batch")
    io_threads: Literal["auto", "on", "off"] = Field(default="auto", description="on: loader and writer threads beside the compute; off: the compute thread loads and adds items itself (the writer thread only commits packs); auto: on for CUDA or an object store, off on a CPU with a local store (docs/experiment-files.md); outputs are the same")


class Provenance(_Strict):
    """Where a loaded experiment came from (set by ``load_experiment``, never written in files)."""

    files: tuple[str, ...] = Field(default=(), description="absolute paths of the files read: the experiment file, then its bases in reading order")
    overrides: tuple[str, ...] = Field(default=(), description="KEY=VALUE overrides applied on top, in order")


class Experiment(_Strict):
    """A whole experiment: datasets x methods over one store."""

    name: str
    store: str | None = Field(default=None, description="store path or fsspec URL, relative to the experiment file (default $OVSEG_STORE or ./ovseg-store)")
    datasets: list[DatasetEntry] = Field(description="at least one; [] (or left out) only in a file that builds banks only")
    models: ModelsEntry = Field(default_factory=ModelsEntry)
    regions: RegionsEntry = Field(default_factory=RegionsEntry)
    methods: list[MethodEntry] = Field(description="at least one with datasets")
    banks: list[BankEntry] = Field(default_factory=list, description="memory banks built by this experiment (docs/banks.md)")
    runner: RunnerEntry = Field(default_factory=RunnerEntry)
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N, mps, or auto (each worker binds one GPU round-robin when there are GPUs, else the CPU, said once)")
    dtype: Literal[COMPUTE_DTYPES] = "float32"  # type: ignore[valid-type]
    feature_dtype: Literal[FEATURE_DTYPES] = Field(default="float16", description="dtype of stored features")  # type: ignore[valid-type]
    window_batch: int = Field(default=4, ge=1, description="windows of one image per backbone forward (memory bound)")
    persist: dict[str, bool] = Field(default_factory=dict, description="per stage: false = never written, computed on demand inside its consumers (storage budget); default true")
    text_templates: Literal["imagenet80", "single"] = Field(
        default="imagenet80", description="prompt templates: the papers' 80 ImageNet templates, or one (cheap CPU smoke runs only)")
    provenance: Provenance = Field(default_factory=Provenance, exclude=True, description="files read and overrides applied (set by load_experiment; left out of model_dump so a dump is a valid file; not part of any stage key)")

    _persist_ok = field_validator("persist")(check_persist)

    @model_validator(mode="before")
    @classmethod
    def _banks_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("banks") and "datasets" not in data and "methods" not in data:
            return {**data, "datasets": [], "methods": []}  # a file that builds banks only
        return data

    @model_validator(mode="after")
    def _work_and_banks(self) -> "Experiment":
        if not (self.datasets and self.methods) and (self.datasets or self.methods or not self.banks):
            raise ValueError("datasets and methods: list at least one of each (or neither, and banks: to build banks)")
        names = [b.name for b in self.banks]
        for m in self.methods:
            bank = m.params.get("bank")
            if bank is None:
                continue
            if m.method != "corrclipv2":
                raise ValueError(f"methods[{m.name}].params.bank: only corrclipv2 retrieves from a memory bank")
            if bank not in names:
                raise ValueError(f"methods[{m.name}].params.bank: unknown bank {bank!r}{did_you_mean(str(bank), names)}; "
                                 f"banks: {', '.join(names) or 'none (declare it under banks:)'}")
        return self

    @field_validator("methods", "datasets", "banks")
    @classmethod
    def _unique_names(cls, v: list, info) -> list:
        names = [entry.name for entry in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{info.field_name[:-1]} names must be unique; repeated: {dup}")
        return v


# --- error messages -------------------------------------------------------------------------

def _unwrap(t: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _type_at(loc: Sequence[Any]) -> Any:
    """The declared type at an error location of ``Experiment`` (None when it cannot be followed)."""
    t: Any = Experiment
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        elif get_origin(t) in (list, tuple) and isinstance(part, int):
            t = get_args(t)[0]
        else:
            return None
    return _unwrap(t)


def _error_text(e: Mapping[str, Any]) -> str:
    loc = tuple(e["loc"])
    if e["type"] == "extra_forbidden":
        parent = _type_at(loc[:-1])
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            keys = [k for k in parent.model_fields if k != "provenance"]
            hint = did_you_mean(loc[-1], keys)
            if not hint and parent is MethodEntry:
                hint = f" (method parameters go under params: {'.'.join(map(str, loc[:-1]))}.params.{loc[-1]})"
            return f"unknown key{hint}; valid keys here: {', '.join(keys)}"
        return "unknown key (check the spelling; see docs/experiment-files.md)"
    if e["type"] == "literal_error":
        allowed = get_args(_type_at(loc)) or ()
        return (f"{e['input']!r} is not allowed{did_you_mean(e['input'], allowed)}; "
                f"choose one of {', '.join(map(str, allowed))}")
    if e["type"] == "value_error" and "error" in e.get("ctx", {}):
        return str(e["ctx"]["error"])
    return e["msg"]


def _format_errors(err: ValidationError, source: str, origins: Sequence[tuple[tuple[str, ...], str]] = ()) -> str:
    lines = [f"invalid experiment {source}:"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        text = f"  {'.'.join(loc) or '(top level)'}: {_error_text(e)}"
        # the error lies inside an overridden value, or is an unknown key an override created
        hits = [ov for parts, ov in origins if loc[: len(parts)] == parts
                or (loc and parts[: len(loc)] == loc and e["type"] == "extra_forbidden")]
        if hits:
            text += f" [set by override {hits[-1]!r}]"
        lines.append(text)
    return "\n".join(lines)


# --- entry points ---------------------------------------------------------------------------

def _validate(data: Any, source: str, base_dir: str | os.PathLike | None,
              origins: Sequence[tuple[tuple[str, ...], str]] = ()) -> Experiment:
    if not isinstance(data, dict):
        raise ExperimentError(f"invalid experiment {source}: the top level must be a mapping, got {type(data).__name__}")
    if EXTENDS_KEY in data:
        raise ExperimentError(f"invalid experiment {source}: extends is resolved when reading files; use load_experiment")
    try:
        return Experiment.model_validate(resolve_paths(data, base_dir))
    except ValidationError as e:
        raise ExperimentError(_format_errors(e, source, origins)) from None


def parse_experiment(data: dict[str, Any], source: str = "<dict>", base_dir: str | os.PathLike | None = None) -> Experiment:
    """Validate a mapping into an ``Experiment``; relative paths resolve against ``base_dir``, ``~`` is expanded."""
    return _validate(data, source, base_dir)


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
    """Read an experiment YAML file (with its ``extends`` chain), apply overrides, validate.

    Args:
        path: the experiment file; ``~`` is expanded.
        overrides: ``KEY=VALUE`` strings (``methods.0.params.tau=3``), applied in order after
            ``extends`` merging; values are YAML; relative paths in them resolve against the
            current directory.
    Returns:
        the validated experiment; ``provenance`` lists the files read and the overrides.
    Raises:
        ExperimentError: missing / invalid file, extends cycle, bad override, invalid value
            (the message names the file, the key, the override that set it, and the fix).
    """
    p = Path(path).expanduser().resolve()
    files: list[Path] = []
    data = _read_file(p, (), files)
    data = apply_overrides(data, overrides)
    origins = [(parse_override(o)[0], o) for o in overrides]
    read = tuple(dict.fromkeys(map(str, files)))
    source = str(p) + (f" (extends {', '.join(read[1:])})" if len(read) > 1 else "")
    exp = _validate(data, source, Path.cwd(), origins)
    return exp.model_copy(update={"provenance": Provenance(files=read, overrides=tuple(overrides))})
