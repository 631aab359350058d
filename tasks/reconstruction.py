"""``reconstruction``: window features -> logits -> merged full-image prediction.

Methods: ``corrclip``, ``corrclip+scclip``, ``scclip``, ``clip``, ``maskclip``, ``clearclip``.
The CLIP block outputs come from ``clip_layers`` (no CLIP re-run except for the last block
that each method applies with its own weights). Outputs are compact: the label map
``(H, W) uint16`` and the winning probability ``(H, W) float16``, not ``K x H x W`` logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from ovseg_core import clip_ops
from ovseg_core.features.clip import normalize_clip
from ovseg_core.postprocess import predict, window_logits
from ovseg_core.windows import accumulate_window_logits, finish_merge
from tasks.common import array_name, chunks, image_windows, region_windows
from tasks.runtime import ItemResult, StageContext, run_items

WindowFn = Callable[[slice], torch.Tensor]


def _method_config(method: str, config: Any):
    if method == "corrclip":
        from ovseg_core.corrclip.config import CorrCLIPConfig

        return CorrCLIPConfig(**config)
    if method == "corrclip+scclip":
        from ovseg_core.combined import CombinedConfig
        from ovseg_core.corrclip.config import CorrCLIPConfig

        return CorrCLIPConfig(**config[0]), CombinedConfig(**config[1])
    if method == "scclip":
        from ovseg_core.scclip.config import SCCLIPConfig

        return SCCLIPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return None


def _window_features(ctx: StageContext, item: Mapping[str, Any], visual: torch.nn.Module, crops: torch.Tensor,
                     plan) -> WindowFn:
    """A function computing the method's dense features for a slice of the image's windows."""
    method = ctx.params["method"]
    cfg = _method_config(method, ctx.params["config"])
    iid = item["image_id"]
    cached = ctx.read_upstream("clip_layers", iid)
    blocks_all = {name: torch.from_numpy(cached[array_name(name)]) for name in ctx.upstream["clip_layers"].params["blocks"]}

    def blocks(sl: slice) -> dict[str, torch.Tensor]:
        return {k: v[sl].float().to(ctx.device) for k, v in blocks_all.items()}

    if method in ("corrclip", "corrclip+scclip"):
        from ovseg_core.corrclip.pipeline import corrclip_window_features

        qk = torch.from_numpy(ctx.read_upstream("dino_features", iid, ["qk"])["qk"])
        regions = region_windows(ctx.read_upstream("sam_masks", iid, ["ids"])["ids"], plan)
        merged = torch.from_numpy(ctx.read_upstream("mask_clustering", iid, ["merged"])["merged"]).long()
        semantic = None
        if "mask_class_tokens" in ctx.upstream:
            semantic = torch.from_numpy(ctx.read_upstream("mask_class_tokens", iid, ["semantic"])["semantic"])
        corr_cfg = cfg[0] if isinstance(cfg, tuple) else cfg

        def fn(sl: slice) -> torch.Tensor:
            b = blocks(sl)
            transform = None
            if isinstance(cfg, tuple):
                from ovseg_core.combined import combined_token_transform

                transform = combined_token_transform(cfg[1], b, num_blocks=clip_ops.num_blocks(visual))
            return corrclip_window_features(
                visual, crops[sl], qk[sl].float().to(ctx.device), regions[sl].to(ctx.device), corr_cfg, blocks=b,
                semantic=semantic[sl].float().to(ctx.device) if semantic is not None else None, token_transform=transform,
                merged=merged[sl].to(ctx.device))
        return fn
    if method == "scclip":
        from ovseg_core.scclip.pipeline import scclip_window_features

        return lambda sl: scclip_window_features(visual, crops[sl], cfg, blocks=blocks(sl))
    from ovseg_core.baselines import baseline_window_features

    return lambda sl: baseline_window_features(visual, crops[sl], method, blocks=blocks(sl))


def compute_reconstruction(ctx: StageContext, item: Mapping[str, Any]):
    """Label map and winning probability at original resolution for one image."""
    bb = ctx.backbone(ctx.params["backbone"])
    visual = bb.model.visual
    text = ctx.read_upstream("text_embeddings", "vocab")
    emb = torch.from_numpy(text["embeddings"]).float().to(ctx.device)
    q2c = torch.from_numpy(text["query_to_class"]).long()
    crops, plan = image_windows(item, ctx.params["window"], normalize_clip)
    crops = crops.to(ctx.device)
    features = _window_features(ctx, item, visual, crops, plan)
    canvas = torch.zeros((emb.shape[0], *plan.resized_hw))  # windows are merged chunk by chunk: bounded memory
    with torch.inference_mode():
        for sl in chunks(crops.shape[0], int(ctx.extra.get("window_batch", 4))):
            feats = features(sl).float()
            accumulate_window_logits(canvas, window_logits(feats, emb, plan.padded_hw).cpu(), plan, sl.start)
        merged = finish_merge(canvas, plan)
        labels, prob = predict(merged, q2c, float(ctx.params["logit_scale"]), ctx.params["prob_thd"], ctx.params["area_thd"])
    dtype = np.uint16 if int(q2c.max()) < 65535 else np.int32
    return {"labels": labels.numpy().astype(dtype), "prob": prob.numpy().astype(np.float16)}, {
        "windows": len(plan.windows), "method": ctx.params["method"]}


@task(name="reconstruction", cache_policy=NO_CACHE)
def reconstruction_task(ctx: StageContext, items: list[dict[str, Any]]) -> list[ItemResult]:
    """Predictions for a batch of images."""
    return run_items(ctx, items, compute_reconstruction)
