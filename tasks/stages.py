"""The stage table: the only place a stage exists.

Like ``sam_model_registry``, ``STAGES`` maps each stage name to everything about it: what it
reads, its typed parameters, its code version, and its three steps (``models`` loaded once per
worker, ``load`` one item's inputs, pure ``compute`` over a group of items). The graph
(``flows.graph``), the CLI's stage choices, dry-run, the report and the benchmark iterate it;
the table's order is a topological order of the graph. The steps are named here and imported
on first use, so reading the table costs no torch import.

Bump a stage's ``code_version`` when its output for the same inputs changes.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks import params as P

LoadFn = Callable[[Any, Mapping[str, Any]], Any]
ComputeFn = Callable[[Any, Any, Sequence[Any]], list[tuple[dict, dict]]]


class Step:
    """A stage step named ``"module:function"`` under ``tasks``, imported when first called."""

    def __init__(self, ref: str):
        self.ref = ref
        self._fn: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            module, name = self.ref.split(":")
            self._fn = getattr(importlib.import_module(f"tasks.{module}"), name)
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"Step({self.ref!r})"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: stage name (store folder, CLI choice, report label).
        description: one line for ``--help``, dry-run and docs.
        per: ``"image"`` (one item per image) or ``"vocabulary"`` (one item, id ``vocab``).
        reads: roles of the upstream outputs it may read (``prediction``: the method's final labels).
        params: its typed parameter class (hashed into its key).
        code_version: bumped when its output for the same inputs changes.
        models: ``ctx -> models`` loaded once per worker (None when it needs none).
        load: ``(ctx, manifest row) -> inputs`` (I/O only).
        compute: ``(ctx, models, [inputs]) -> [(arrays, attrs)]`` (pure ovseg_core calls).
        windows: ``inputs -> window count`` for stages that batch windows across images.
        arrays: names of the arrays each item stores (clip_layers: one per block aggregate).
        scored_only: only images with ground truth are items.
    """

    name: str
    description: str
    per: str
    reads: tuple[str, ...]
    params: type
    code_version: str
    models: Callable[[Any], Any]
    load: LoadFn
    compute: ComputeFn
    windows: Callable[[Any], int] | None = None
    arrays: tuple[str, ...] = ()
    scored_only: bool = False


def _stage(name: str, description: str, per: str, reads: tuple[str, ...], params: type, code_version: str,
           steps: str, models: str | None = None, windows: bool = False, **kw: Any) -> Stage:
    """A stage whose steps are ``<steps>_models`` / ``_load`` / ``_compute`` (``models``: another models step)."""
    module, prefix = steps.split(":")
    return Stage(name, description, per, reads, params, code_version,
                 Step(models or f"{module}:{prefix}_models"), Step(f"{module}:{prefix}_load"),
                 Step(f"{module}:{prefix}_compute"), Step("features:windows_of") if windows else None, **kw)


STAGES: dict[str, Stage] = {s.name: s for s in (
    _stage("text_embeddings", "prompt-ensembled query embeddings of a vocabulary", "vocabulary", (), P.TextParams, "2",
           "features:text", arrays=("embeddings", "query_to_class")),
    _stage("sam_masks", "region ids at original resolution (SAM automatic masks or superpixels)", "image", (),
           P.RegionParams, "1", "features:sam", arrays=("ids", "scores", "areas")),
    _stage("dino_features", "last-block DINO q+k of every window", "image", (), P.DinoParams, "2", "features:dino",
           windows=True, arrays=("qk",)),
    _stage("clip_layers", "CLIP block aggregates of every window", "image", (), P.ClipParams, "1", "features:clip",
           windows=True),
    _stage("mask_clustering", "DBSCAN-merged region ids per window on the DINO grid", "image",
           ("dino_features", "sam_masks"), P.ClusteringParams, "2", "corrclip:clustering", models="corrclip:no_models",
           arrays=("merged",)),
    _stage("mask_class_tokens", "CorrCLIP semantic-branch tokens per window", "image", ("mask_clustering",),
           P.SemanticParams, "1", "corrclip:semantic", windows=True, arrays=("semantic",)),
    _stage("reconstruction", "a method's label map and winning probability", "image",
           ("text_embeddings", "clip_layers", "dino_features", "sam_masks", "mask_clustering", "mask_class_tokens"),
           P.ReconstructionParams, "2", "reconstruction:reconstruction", windows=True, arrays=("labels", "prob")),
    _stage("map_correction", "CorrCLIP map correction (region-mode labels)", "image", ("reconstruction", "sam_masks"),
           P.MapCorrectionParams, "1", "corrclip:correction", models="corrclip:no_models", arrays=("labels", "prob")),
    _stage("scoring", "per-image confusion matrix against the ground truth", "image", ("prediction",),
           P.ScoringParams, "2", "scoring:scoring", models="corrclip:no_models", arrays=("confusion",),
           scored_only=True),
)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str) -> Stage:
    """The stage ``name``; an unknown name raises ``ValueError`` listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        close = difflib.get_close_matches(name, STAGE_ORDER, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown stage {name!r}{hint}; stages are: {', '.join(STAGE_ORDER)}") from None
