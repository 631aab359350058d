"""Feature stages: ``sam_masks``, ``dino_features``, ``clip_layers``, ``text_embeddings``.

Each Prefect task takes a batch of items, skips those complete in the store, loads its model
once per worker and writes float16 (configurable) per-window outputs laid out by the window
plan. Stage parameters (hashed into the stage key) are documented in ``flows.graph``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from ovseg_core.features.clip import clip_block_outputs, normalize_clip
from ovseg_core.features.dino import dino_qk_features, normalize_imagenet
from ovseg_core.features.regions import SamRegionConfig, SuperpixelConfig, region_map
from ovseg_core.features.text import TEMPLATE_SETS, parse_class_lines, text_embeddings
from tasks.common import array_name, chunks, image_windows, store_dtype, torch_dtype
from storage.images import load_rgb
from tasks.runtime import ItemResult, StageContext, run_items


def region_config(params: Mapping[str, Any]) -> SamRegionConfig | SuperpixelConfig:
    """The region-source config of a ``sam_masks`` stage."""
    if params["source"] == "sam":
        return SamRegionConfig(**params["config"])
    return SuperpixelConfig(method=params["source"], **params["config"])


def compute_sam_masks(ctx: StageContext, item: Mapping[str, Any]):
    """Region ids at original resolution (ascending-area painting, 0 = unsegmented) + scores."""
    cfg = region_config(ctx.params)
    image = load_rgb(item["abs_path"])
    model = None
    if ctx.params["source"] == "sam":
        model = ctx.backbone(ctx.params["backbone"]).model
    with torch.inference_mode():
        rm = region_map(model, image, cfg)
    return {"ids": rm.ids, "scores": rm.scores, "areas": rm.areas}, {"num_regions": int(rm.scores.shape[0])}


def compute_dino_features(ctx: StageContext, item: Mapping[str, Any]):
    """Last-block q+k of every window, ``(n_win, hd, wd, C)``."""
    bb = ctx.backbone(ctx.params["backbone"])
    crops, plan = image_windows(item, ctx.params["window"], normalize_imagenet)
    out = []
    with torch.inference_mode():
        for sl in chunks(crops.shape[0], int(ctx.extra.get("window_batch", 4))):
            out.append(dino_qk_features(bb.model, crops[sl].to(ctx.device, torch_dtype(ctx))).float().cpu())
    qk = torch.cat(out).numpy().astype(store_dtype(ctx))
    return {"qk": qk}, {"windows": len(plan.windows), "resized_hw": list(plan.resized_hw)}


def compute_clip_layers(ctx: StageContext, item: Mapping[str, Any]):
    """The requested block aggregates of every window, each ``(n_win, 1 + N, D)``."""
    bb = ctx.backbone(ctx.params["backbone"])
    names: Sequence[str] = ctx.params["blocks"]
    crops, plan = image_windows(item, ctx.params["window"], normalize_clip)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.inference_mode():
        for sl in chunks(crops.shape[0], int(ctx.extra.get("window_batch", 4))):
            res = clip_block_outputs(bb.model.visual, crops[sl].to(ctx.device, torch_dtype(ctx)), names)
            for n in names:
                parts[n].append(res[n].float().cpu())
    dt = store_dtype(ctx)
    arrays = {array_name(n): torch.cat(parts[n]).numpy().astype(dt) for n in names}
    return arrays, {"windows": len(plan.windows), "resized_hw": list(plan.resized_hw), "blocks": list(names)}


def compute_text_embeddings(ctx: StageContext, item: Mapping[str, Any]):
    """Prompt-ensembled query embeddings of a vocabulary (synonyms are separate queries)."""
    bb = ctx.backbone(ctx.params["backbone"])
    vocab = parse_class_lines(ctx.params["classes"])
    name = ctx.params.get("templates", "imagenet80")
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; valid: {sorted(TEMPLATE_SETS)}")
    with torch.inference_mode():
        emb = text_embeddings(bb.model, bb.tokenizer, vocab, TEMPLATE_SETS[name])
    return (
        {"embeddings": emb.float().cpu().numpy(), "query_to_class": vocab.query_to_class.astype(np.int64)},
        {"queries": list(vocab.queries), "class_names": list(vocab.class_names)},
    )


@task(name="sam_masks", cache_policy=NO_CACHE)
def sam_masks_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Region maps for a batch of images."""
    return run_items(ctx, items, compute_sam_masks)


@task(name="dino_features", cache_policy=NO_CACHE)
def dino_features_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """DINO q+k features for a batch of images."""
    return run_items(ctx, items, compute_dino_features, chunk_first_axis=("qk",))


@task(name="clip_layers", cache_policy=NO_CACHE)
def clip_layers_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """CLIP block dumps for a batch of images."""
    names = tuple(array_name(n) for n in ctx.params["blocks"])
    return run_items(ctx, items, compute_clip_layers, chunk_first_axis=names)


@task(name="text_embeddings", cache_policy=NO_CACHE)
def text_embeddings_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Text embeddings of one vocabulary (item id ``vocab``)."""
    return run_items(ctx, items, compute_text_embeddings)
