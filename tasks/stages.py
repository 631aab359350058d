"""The stage table: the only place a stage exists.

Like ``sam_model_registry``, ``STAGES`` maps each stage name to everything about it: what it
reads, its typed parameters, its code version, and its three steps (``models`` loaded once per
worker, ``load`` one item's inputs, pure ``compute`` over a group of items). The graph
(``flows.graph``), the CLI's stage choices, dry-run, the report and the benchmark iterate it;
the table's order is a topological order of the graph.

Bump a stage's ``code_version`` when its output for the same inputs changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import corrclip, features, reconstruction, scoring
from tasks import params as P
from tasks.runtime import BatchResult, StageContext

LoadFn = Callable[[StageContext, Mapping[str, Any]], Any]
ComputeFn = Callable[[StageContext, Any, Sequence[Any]], list[tuple[dict, dict]]]


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
    models: Callable[[StageContext], Any]
    load: LoadFn
    compute: ComputeFn
    windows: Callable[[Any], int] | None = None
    arrays: tuple[str, ...] = ()
    scored_only: bool = False


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("text_embeddings", "prompt-ensembled query embeddings of a vocabulary", "vocabulary", (), P.TextParams, "2",
          features.text_models, features.text_load, features.text_compute, arrays=("embeddings", "query_to_class")),
    Stage("sam_masks", "region ids at original resolution (SAM automatic masks or superpixels)", "image", (),
          P.RegionParams, "1", features.sam_models, features.sam_load, features.sam_compute,
          arrays=("ids", "scores", "areas")),
    Stage("dino_features", "last-block DINO q+k of every window", "image", (), P.DinoParams, "2",
          features.dino_models, features.dino_load, features.dino_compute, features.windows_of, arrays=("qk",)),
    Stage("clip_layers", "CLIP block aggregates of every window", "image", (), P.ClipParams, "1",
          features.clip_models, features.clip_load, features.clip_compute, features.windows_of),
    Stage("mask_clustering", "DBSCAN-merged region ids per window on the DINO grid", "image",
          ("dino_features", "sam_masks"), P.ClusteringParams, "2", corrclip.no_models, corrclip.clustering_load,
          corrclip.clustering_compute, arrays=("merged",)),
    Stage("mask_class_tokens", "CorrCLIP semantic-branch tokens per window", "image", ("mask_clustering",),
          P.SemanticParams, "1", corrclip.semantic_models, corrclip.semantic_load, corrclip.semantic_compute,
          features.windows_of, arrays=("semantic",)),
    Stage("reconstruction", "a method's label map and winning probability", "image",
          ("text_embeddings", "clip_layers", "dino_features", "sam_masks", "mask_clustering", "mask_class_tokens"),
          P.ReconstructionParams, "2", reconstruction.reconstruction_models, reconstruction.reconstruction_load,
          reconstruction.reconstruction_compute, features.windows_of, arrays=("labels", "prob")),
    Stage("map_correction", "CorrCLIP map correction (region-mode labels)", "image", ("reconstruction", "sam_masks"),
          P.MapCorrectionParams, "1", corrclip.no_models, corrclip.correction_load, corrclip.correction_compute,
          arrays=("labels", "prob")),
    Stage("scoring", "per-image confusion matrix against the ground truth", "image", ("prediction",),
          P.ScoringParams, "2", corrclip.no_models, scoring.scoring_load, scoring.scoring_compute,
          arrays=("confusion",), scored_only=True),
)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str) -> Stage:
    """The stage ``name``; an unknown name raises ``ValueError`` listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, STAGE_ORDER, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown stage {name!r}{hint}; stages are: {', '.join(STAGE_ORDER)}") from None


@task(name="stage-batch", cache_policy=NO_CACHE)
def stage_batch(ctx: StageContext, rows: list[dict[str, Any]]) -> BatchResult:
    """One batch of one stage output set (one Prefect task per batch, never per image)."""
    from tasks.executor import run_batch

    return run_batch(ctx, rows)
