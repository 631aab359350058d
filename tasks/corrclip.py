"""CorrCLIP stages: ``mask_clustering``, ``mask_class_tokens``, ``map_correction`` (v1 and CorrCLIPv2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovseg_core import clip_ops
from ovseg_core.backbones import patch_size
from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.map_correction import map_correction
from ovseg_core.corrclip.mask_class_tokens import mask_class_tokens
from ovseg_core.corrclip.mask_clustering import cluster_masks, resize_regions
from ovseg_core.corrclip.vfm_correlation import correlation_grid
from ovseg_core.features.clip import normalize_clip
from ovseg_core.windows import WindowPlan
from tasks.common import (
    embedded_windows,
    region_windows,
    row_plan,
    row_region_windows,
    row_windows,
    run_windows_at,
    to_store,
)
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]


# ----------------------------------------------------------------------------- mask_clustering
def clustering_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    plan = row_plan(ctx.params.window, row)
    return {"qk": torch.from_numpy(ctx.read_upstream("dino_features", row, ["qk"])["qk"]).float(),
            "regions": row_region_windows(ctx, row, "sam_masks", plan), "plan": plan}


def clustering_compute(ctx: StageContext, _: None, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Merged region ids of every window on the DINO grid, ``(n_win, hd, wd) int32``."""
    out = []
    for inp in inputs:
        qk = inp["qk"]
        merged = cluster_masks(qk, resize_regions(inp["regions"], (qk.shape[1], qk.shape[2])), ctx.params.config)
        out.append(({"merged": merged.numpy().astype(np.int32)}, {"windows": len(inp["plan"].windows)}))
    return out


# ----------------------------------------------------------------------------- mask_class_tokens
def semantic_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype).model.visual


def semantic_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    p = ctx.params
    crops, plan = row_windows(ctx, row, p.window, normalize_clip)
    if p.relabel is None:  # v1: the mask_clustering stage's merged map (on the DINO grid)
        merged = torch.from_numpy(ctx.read_upstream("mask_clustering", row, ["merged"])["merged"]).long()
    else:  # CorrCLIPv2: the sam_masks regions on the correlation grid, renumbered (m0 rule) as its reconstruction does
        merged = relabelled_regions(ctx.read_upstream("mask_clustering", row, ["ids"])["ids"], plan,
                                    patch_size(p.backbone), p.relabel)
    return {"win": {"crops": crops, "merged": merged}, "plan": plan, "image_id": str(row["image_id"])}


def relabelled_regions(ids: np.ndarray, plan: WindowPlan, clip_patch: int, cfg: CorrCLIPConfig) -> torch.Tensor:
    """CorrCLIPv2's merged map without DBSCAN: ``(n_win, hc, wc) int64`` on the correlation grid.

    The region ids at original resolution, nearest-resized to the network input and cropped per window
    (``-1`` padding), nearest-resized to twice the CLIP grid (``correlation_grid``) and renumbered by
    ``cluster_masks(None, ..., cfg)`` (``cfg.mask_clustering`` is False): what ``corrclip_window_features``
    computes from the same regions, so its mask class tokens equal the ones it would compute.
    """
    regions = region_windows(ids, plan)
    return cluster_masks(None, resize_regions(regions, correlation_grid(plan.padded_hw, clip_patch)), cfg)


def semantic_compute(ctx: StageContext, visual, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Semantic-branch tokens ``(n_win, gh, gw, D)``: each patch's region MCT output of the last block."""
    dtype = getattr(torch, ctx.params.dtype)
    cfg = CorrCLIPConfig()
    parts: list[list[torch.Tensor]] = [[] for _ in inputs]

    def forward(i: int, start: int, b: dict[str, torch.Tensor]) -> torch.Tensor:
        crops = b["crops"].to(dtype)
        grid = clip_ops.token_grid(visual, crops.shape[-2], crops.shape[-1])
        # in a fused chain: the tokens clip_layers embedded for the same windows and model (computed here otherwise)
        tokens_in = embedded_windows(ctx, inputs[i]["image_id"], ctx.params.window, start, visual, crops)
        return mask_class_tokens(visual, tokens_in, resize_regions(b["merged"], grid), cfg).float().cpu()

    with torch.inference_mode():
        run_windows_at([i["win"] for i in inputs], forward, ctx.settings.window_batch,
                       lambda i, start, x: parts[i].append(x), ctx.device)
    return [({"semantic": to_store(torch.cat(p), ctx.params.feature_dtype)}, {"windows": len(inp["plan"].windows)})
            for p, inp in zip(parts, inputs)]


# ----------------------------------------------------------------------------- map_correction
def correction_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    return {"pred": ctx.read_upstream("reconstruction", row, ["labels", "prob"]),
            "ids": ctx.read_upstream("sam_masks", row, ["ids"])["ids"]}


def correction_compute(ctx: StageContext, _: None, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Every original region takes the mode of the predicted labels inside it (ties -> smallest label)."""
    out = []
    for inp in inputs:
        labels = inp["pred"]["labels"]
        corrected = map_correction(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(inp["ids"].astype(np.int64)),
                                   m0_quirk=ctx.params.m0_quirk)
        out.append(({"labels": corrected.numpy().astype(labels.dtype), "prob": inp["pred"]["prob"]}, {}))
    return out
