"""CorrCLIP stages: ``mask_clustering``, ``mask_class_tokens``, ``map_correction``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from ovseg_core import clip_ops
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.map_correction import map_correction
from ovseg_core.corrclip.mask_class_tokens import mask_class_tokens
from ovseg_core.corrclip.mask_clustering import cluster_masks, resize_regions
from ovseg_core.features.clip import normalize_clip
from tasks.common import chunks, image_windows, plan_for, region_windows, store_dtype, torch_dtype
from tasks.runtime import ItemResult, StageContext, run_items


def _clustering_config(params: Mapping[str, Any]) -> CorrCLIPConfig:
    return CorrCLIPConfig(**params["clustering"])


def compute_mask_clustering(ctx: StageContext, item: Mapping[str, Any]):
    """Merged region ids of every window on the DINO grid, ``(n_win, hd, wd) int32``."""
    cfg = _clustering_config(ctx.params)
    qk = torch.from_numpy(ctx.read_upstream("dino_features", item["image_id"], ["qk"])["qk"]).float()
    ids = ctx.read_upstream("sam_masks", item["image_id"], ["ids"])["ids"]
    plan = plan_for(ctx.params["window"], (int(item["height"]), int(item["width"])))
    regions = region_windows(ids, plan)
    merged = cluster_masks(qk, resize_regions(regions, (qk.shape[1], qk.shape[2])), cfg)
    return {"merged": merged.numpy().astype(np.int32)}, {"windows": len(plan.windows)}


def compute_mask_class_tokens(ctx: StageContext, item: Mapping[str, Any]):
    """Semantic-branch tokens ``(n_win, gh, gw, D)``: each patch's region MCT output of the last block."""
    bb = ctx.backbone(ctx.params["backbone"])
    visual = bb.model.visual
    merged = torch.from_numpy(ctx.read_upstream("mask_clustering", item["image_id"], ["merged"])["merged"]).long()
    crops, plan = image_windows(item, ctx.params["window"], normalize_clip)
    grid = clip_ops.token_grid(visual, crops.shape[-2], crops.shape[-1])
    region_grid = resize_regions(merged, grid)
    cfg = CorrCLIPConfig()
    out = []
    with torch.inference_mode():
        for sl in chunks(crops.shape[0], int(ctx.extra.get("window_batch", 4))):
            tokens_in, _ = clip_ops.embed_tokens(visual, crops[sl].to(ctx.device, torch_dtype(ctx)))
            out.append(mask_class_tokens(visual, tokens_in, region_grid[sl].to(ctx.device), cfg).float().cpu())
    return {"semantic": torch.cat(out).numpy().astype(store_dtype(ctx))}, {"windows": len(plan.windows)}


def compute_map_correction(ctx: StageContext, item: Mapping[str, Any]):
    """Every original region takes the mode of the predicted labels inside it (ties -> smallest label)."""
    pred = ctx.read_upstream("reconstruction", item["image_id"], ["labels", "prob"])
    ids = ctx.read_upstream("sam_masks", item["image_id"], ["ids"])["ids"]
    labels = map_correction(torch.from_numpy(pred["labels"].astype(np.int64)), torch.from_numpy(ids.astype(np.int64)),
                            m0_quirk=bool(ctx.params.get("m0_quirk", True)))
    return {"labels": labels.numpy().astype(pred["labels"].dtype), "prob": pred["prob"]}, {}


@task(name="mask_clustering", cache_policy=NO_CACHE)
def mask_clustering_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """DBSCAN merging of regions for a batch of images."""
    return run_items(ctx, items, compute_mask_clustering, chunk_first_axis=("merged",))


@task(name="mask_class_tokens", cache_policy=NO_CACHE)
def mask_class_tokens_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Semantic-branch CLIP forward with region attention for a batch of images."""
    return run_items(ctx, items, compute_mask_class_tokens, chunk_first_axis=("semantic",))


@task(name="map_correction", cache_policy=NO_CACHE)
def map_correction_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Map correction for a batch of images."""
    return run_items(ctx, items, compute_map_correction)
