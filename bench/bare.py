"""Bare model forwards of the benchmark: the model stages' ``ovseg_core`` calls without store or Prefect.

For one stage node of a finished run, every image's inputs are prepared untimed (image decode,
resize, window crops, upstream outputs read from the store), then only the library calls the
stage task makes are timed: the same windows, the same chunking by ``window_batch``, the same
``ovseg_core`` functions, the same cached model objects (``tasks.runtime.get_backbone``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flows.graph import StageNode
from storage.store import Store

MODEL_STAGES = ("sam_masks", "dino_features", "clip_layers", "mask_class_tokens", "reconstruction")

Unit = tuple[Callable[[], object], int]  # (timed work of one image, number of windows it covers)


@dataclass(frozen=True)
class BareResult:
    """Timed bare work of one stage node over a set of images."""

    seconds: float  # summed wall time of the timed calls
    cpu_seconds: float  # summed process CPU time (all threads) of the timed calls
    images: int  # images measured
    windows: int  # model windows measured (images for sam_masks: SAM sees the whole image)
    flops_per_window: float | None  # FLOPs per window, counted on the first image (None when not counted)


def _backbone(node: StageNode, name: str):
    from tasks.runtime import get_backbone

    return get_backbone(name, node.device, node.dtype, node.extra.get("weights_dir"))


def _chunks(n: int, node: StageNode) -> list[slice]:
    from tasks.common import chunks

    return list(chunks(n, int(node.extra.get("window_batch", 4))))


def _sam_unit(node: StageNode, row: Mapping[str, Any], store: Store) -> Unit:
    from ovseg_core.features.regions import region_map
    from storage.images import load_rgb
    from tasks.features import region_config

    params = node.stage_key.params
    cfg = region_config(params)
    model = _backbone(node, params["backbone"]).model if params["source"] == "sam" else None
    image = load_rgb(row["abs_path"])
    return (lambda: region_map(model, image, cfg)), 1


def _dino_unit(node: StageNode, row: Mapping[str, Any], store: Store) -> Unit:
    from ovseg_core.features.dino import dino_qk_features, normalize_imagenet
    from tasks.common import image_windows

    params = node.stage_key.params
    model = _backbone(node, params["backbone"]).model
    crops, _ = image_windows(row, params["window"], normalize_imagenet)
    crops = crops.to(node.device, getattr(torch, node.dtype))
    slices = _chunks(crops.shape[0], node)
    return (lambda: [dino_qk_features(model, crops[sl]) for sl in slices]), crops.shape[0]


def _clip_unit(node: StageNode, row: Mapping[str, Any], store: Store) -> Unit:
    from ovseg_core.features.clip import clip_block_outputs, normalize_clip
    from tasks.common import image_windows

    params = node.stage_key.params
    visual = _backbone(node, params["backbone"]).model.visual
    crops, _ = image_windows(row, params["window"], normalize_clip)
    crops = crops.to(node.device, getattr(torch, node.dtype))
    slices = _chunks(crops.shape[0], node)
    names = list(params["blocks"])
    return (lambda: [clip_block_outputs(visual, crops[sl], names) for sl in slices]), crops.shape[0]


def _mct_unit(node: StageNode, row: Mapping[str, Any], store: Store) -> Unit:
    from ovseg_core import clip_ops
    from ovseg_core.corrclip.config import CorrCLIPConfig
    from ovseg_core.corrclip.mask_class_tokens import mask_class_tokens
    from ovseg_core.corrclip.mask_clustering import resize_regions
    from ovseg_core.features.clip import normalize_clip
    from tasks.common import image_windows

    params = node.stage_key.params
    visual = _backbone(node, params["backbone"]).model.visual
    up = node.upstream["mask_clustering"]
    merged = torch.from_numpy(store.read_item(up.stage, up.key, row["image_id"], ["merged"])["merged"]).long()
    crops, _ = image_windows(row, params["window"], normalize_clip)
    crops = crops.to(node.device, getattr(torch, node.dtype))
    region_grid = resize_regions(merged, clip_ops.token_grid(visual, crops.shape[-2], crops.shape[-1])).to(node.device)
    slices = _chunks(crops.shape[0], node)
    cfg = CorrCLIPConfig()

    def work() -> list[torch.Tensor]:
        return [mask_class_tokens(visual, clip_ops.embed_tokens(visual, crops[sl])[0], region_grid[sl], cfg)
                for sl in slices]

    return work, crops.shape[0]


def _reconstruction_unit(node: StageNode, row: Mapping[str, Any], store: Store) -> Unit | None:
    """CorrCLIP reconstruction (window features, logits, merge, prediction); None for other methods."""
    from ovseg_core.corrclip.config import CorrCLIPConfig
    from ovseg_core.corrclip.pipeline import corrclip_window_features
    from ovseg_core.features.clip import normalize_clip
    from ovseg_core.postprocess import predict, window_logits
    from ovseg_core.windows import merge_window_logits
    from tasks.common import array_name, image_windows, region_windows

    params = node.stage_key.params
    if params["method"] != "corrclip":
        return None
    cfg = CorrCLIPConfig(**params["config"])
    visual = _backbone(node, params["backbone"]).model.visual
    iid = row["image_id"]
    ups = node.upstream

    def read(stage: str, names: Sequence[str] | None = None, item: str = iid) -> dict[str, Any]:
        return store.read_item(ups[stage].stage, ups[stage].key, item, names)

    text = read("text_embeddings", item="vocab")
    emb = torch.from_numpy(text["embeddings"]).float()
    q2c = torch.from_numpy(text["query_to_class"]).long()
    cached = read("clip_layers")
    blocks = {n: torch.from_numpy(cached[array_name(n)]).float() for n in ups["clip_layers"].params["blocks"]}
    qk = torch.from_numpy(read("dino_features", ["qk"])["qk"]).float()
    crops, plan = image_windows(row, params["window"], normalize_clip)
    regions = region_windows(read("sam_masks", ["ids"])["ids"], plan)
    merged = torch.from_numpy(read("mask_clustering", ["merged"])["merged"]).long()
    semantic = None
    if "mask_class_tokens" in ups:
        semantic = torch.from_numpy(read("mask_class_tokens", ["semantic"])["semantic"]).float()
    slices = _chunks(crops.shape[0], node)

    def work() -> object:
        logits = []
        for sl in slices:
            feats = corrclip_window_features(
                visual, crops[sl], qk[sl], regions[sl], cfg, blocks={k: v[sl] for k, v in blocks.items()},
                semantic=semantic[sl] if semantic is not None else None, merged=merged[sl])
            logits.append(window_logits(feats.float(), emb, plan.padded_hw))
        full = merge_window_logits(torch.cat(logits), plan)
        return predict(full, q2c, float(params["logit_scale"]), params["prob_thd"], params["area_thd"])

    return work, crops.shape[0]


_UNITS: Mapping[str, Callable[[StageNode, Mapping[str, Any], Store], Unit | None]] = {
    "sam_masks": _sam_unit,
    "dino_features": _dino_unit,
    "clip_layers": _clip_unit,
    "mask_class_tokens": _mct_unit,
    "reconstruction": _reconstruction_unit,
}


def bare_stage(node: StageNode, rows: Sequence[Mapping[str, Any]], store: Store,
               count_flops_fn: Callable[[Callable[[], object]], int] | None = None) -> BareResult | None:
    """Time the bare ``ovseg_core`` work of ``node`` on ``rows`` (inputs prepared untimed).

    Args:
        node: a model stage node of a run that completed in ``store`` (its upstream outputs are read).
        rows: manifest rows of the images to measure.
        store: the run's store (read only, outside the timed calls).
        count_flops_fn: when given, counts the FLOPs of the first image's work (run once more, untimed).
    Returns:
        the timing, or None when the stage has no bare equivalent here (reconstruction of non-CorrCLIP methods).
    """
    if node.stage not in _UNITS:
        raise ValueError(f"stage {node.stage!r} is not a model stage; model stages: {MODEL_STAGES}")
    seconds, cpu, images, windows = 0.0, 0.0, 0, 0
    flops_per_window = None
    with torch.inference_mode():
        for i, row in enumerate(rows):
            unit = _UNITS[node.stage](node, row, store)
            if unit is None:
                return None
            work, n_win = unit
            t0, c0 = time.perf_counter(), time.process_time()
            work()
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            images += 1
            windows += n_win
            if i == 0 and count_flops_fn is not None:
                flops_per_window = count_flops_fn(work) / n_win
    return BareResult(seconds, cpu, images, windows, flops_per_window)
